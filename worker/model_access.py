"""Who may use the trainer's view model, and when.

Two kinds of use, two locks:
- **exclusive**: a job (training, a merge, a revert), a checkpoint sync, the parity
  gate, log-probabilities for the tests: one at a time, each sees the weights change
  only by its own hand;
- **structure**: a LoRA attached with peft swaps modules in and out of the model. A
  forward that runs beside a job (reward-head scoring reads the trunk as it is, HOGWILD,
  like vLLM itself) takes the structure lock shared, an attach takes it exclusive for as
  long as the adapter is on; so no forward overlaps an attach, the adapter's life, or
  its removal, and scoring still never queues behind plain training. The reward heads'
  trunk LoRA is no attach: hooks add it on the scoring thread only (``reward_heads.ThreadLora``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hogwild.training.lora import attached_lora


class SharedExclusiveLock:
    """Many holders of the shared side, or one of the exclusive side; a waiting
    exclusive holder goes before shared ones that arrive after it."""

    def __init__(self):
        self._cv = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                self._cv.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._writers_waiting += 1
            self._cv.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cv:
                self._writer = False
                self._cv.notify_all()


class ModelAccess:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._exclusive = threading.Lock()
        self._structure = SharedExclusiveLock()

    @contextmanager
    def exclusive(self) -> Iterator[torch.nn.Module]:
        """The model to oneself (jobs, syncs): waits for the running job."""
        with self._exclusive:
            yield self.model

    @contextmanager
    def reading(self) -> Iterator[torch.nn.Module]:
        """The model as it is, beside a running job, never while an adapter is on or moving."""
        with self._structure.shared():
            yield self.model

    @contextmanager
    def restructuring(self) -> Iterator[torch.nn.Module]:
        """The model for code that attaches and removes adapters itself (a circuit-breaker
        run) or changes forward hooks: no reading forward runs meanwhile. Hold ``exclusive``
        around it too when a job's forwards must not see the change (a peft attach)."""
        with self._structure.exclusive():
            yield self.model

    @contextmanager
    def adapter(self, **lora) -> Iterator[torch.nn.Module]:
        """A peft LoRA on the model (``training.lora.attached_lora``) for the block, taken
        off afterwards; hold ``exclusive`` around it."""
        with self.restructuring(), attached_lora(self.model, **lora) as peft_model:
            yield peft_model

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

"""What a training mode is to the trainer: how a request of its kind is admitted, what
memory it will need, and how it runs. One module per mode implements it (the registry
is ``kinds/__init__.py``); the service does everything the modes share. A kind sees the
service through ``Services``: what the kinds use of it, and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from hogwild.contracts.jobs import JobRequestBase

if TYPE_CHECKING:
    from hogwild.training.memory import JobMemory
    from hogwild.training.sft import SFTTrainer

    from ..adapters import AdapterBook
    from ..jobs import Job
    from ..ledger import Ledger
    from ..model_access import ModelAccess
    from ..reward_heads import HeadBook
    from ..served_adapters import ServedAdapters

Outcome = tuple[str, "str | None"]  # (final state, error)


class JobProgress(Protocol):
    def progress(self, job: Job, step: int, total: int) -> None:
        """The running job's step count, as status and the journal show it."""


class CheckpointSchedule(Protocol):
    def schedule(self) -> None:
        """A checkpoint when the trainer falls idle, for a change the weights' version does
        not show (the reward heads)."""


class RankTrainer(Protocol):
    """What ``JobKind.train`` sees of a tensor-parallel rank: the holder of its model and of
    the server's one optimizer. Rank 0's service, or a follower rank (``worker/follower.py``)."""

    trainer: SFTTrainer


@runtime_checkable
class Services(Protocol):
    """What a job kind sees of the trainer service (``TrainerService``); the kinds use nothing
    else of it (``tests/test_job_kinds.py`` checks both)."""

    access: ModelAccess  # the model, and who may use it how (exclusive, reading, adapters)
    jobs: JobProgress
    trainer: SFTTrainer  # holds the server's one optimizer
    ledger: Ledger  # sample ids already trained
    weights_version: int  # one more for each change to the served weights: the kind that makes it adds it
    tensor_parallel_size: int  # trainer ranks (1: alone)
    heads: HeadBook  # the reward heads
    adapters: AdapterBook  # merged circuit-breaker adapters
    served_adapters: ServedAdapters  # adapters trained on the frozen base, served by name
    checkpointer: CheckpointSchedule
    session: Path  # the session directory (the readout's current vectors)
    pad_id: int

    def tokenizer(self):
        """The served model's tokenizer (loaded on first use)."""

    def train_on_ranks(self, kind: JobKind, request, items: list, on_step: Callable, should_stop: Callable[[], bool]):
        """``kind.train`` on ``items`` on every tensor-parallel rank; the caller holds the model."""


@dataclass
class Admission:
    """What the trainer tells the caller when it queues a job."""

    n_samples: int
    skipped_ids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class JobKind:
    """A training mode: the request class it serves (its contract entry) and three steps.

    ``admit`` runs when the request arrives (on the transport thread: cheap checks only;
    raise ``OpError`` to refuse with a reason), ``estimate`` before admission and again
    when the job starts (None: nothing worth checking), ``run`` on the job thread; it
    returns the final state and error, and leaves its numbers in ``job.info.result``.
    Whatever ``run`` raises fails the job with the exception's type and message: the
    service's one guard (``TrainerService._run``), so a kind has no guard of its own.
    """

    request: ClassVar[type[JobRequestBase]]
    tensor_parallel: ClassVar[bool] = False  # runs on every tensor-parallel rank (``TrainerService.train_on_ranks``)

    def admit(self, service: Services, op) -> Admission:
        return Admission(n_samples=op.sample_count())

    def estimate(self, service: Services, op) -> JobMemory | None:
        return None

    def run(self, service: Services, job: Job) -> Outcome:
        raise NotImplementedError

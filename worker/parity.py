"""The parity gate: the trainer's forward must compute what vLLM's does before anything trains.

After the view model is bound, the trainer asks for vLLM's log-probabilities of a
fixed probe prompt (the API server asks the engine, as ``/v1/score`` does) and
compares them with its own, position by position. Beyond the dtype's tolerance
training stays off, with the gap, where it appears, and the first served tensor
that differs from the checkpoint on disk (a wrong mapping shows there). A wrong
mapping therefore cannot train anything.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hogwild.contracts.protocol import ParityOp, ParityReport

if TYPE_CHECKING:
    from .service import TrainerService

logger = logging.getLogger("hogwild.worker")

PROBE_LENGTH = 64
# |trainer - vLLM| <= atol + rtol * |vLLM's log-prob| at a position. fp32: what the two
# implementations' different kernels leave (~1e-6 measured); 16-bit: bf16 activations in both
# (~4e-3 on the tiny hybrid models, 0.1 at log-probs near -15 after training).
TOLERANCE = {"float32": (1e-3, 1e-4), "bfloat16": (0.05, 0.02), "float16": (0.05, 0.02)}
# Positions allowed beyond it: in bf16 a MoE router's top-k can flip between two experts of
# nearly equal score in one implementation and not the other (seen at 1 position of 63 on
# the bench-sized Qwen3-Next). A wrong mapping is off nearly everywhere.
OUTLIER_SHARE = 0.1


def probe_ids(vocab_size: int, length: int = PROBE_LENGTH, seed: int = 0) -> list[int]:
    """A fixed prompt of token ids (the same for every start of the same model)."""
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(length)]


@dataclass
class ParityResult:
    passed: bool
    max_abs_diff: float
    position: int  # where the largest gap is (a position of the probe, from 1)
    tolerance: tuple[float, float]
    beyond: int = 0  # positions beyond the tolerance
    first_differing_tensor: str | None = None  # on failure: the first served tensor unlike the checkpoint's

    def reason(self) -> str:
        atol, rtol = self.tolerance
        where = (f"; the first served tensor that differs from the checkpoint is {self.first_differing_tensor}"
                 if self.first_differing_tensor else "; every served tensor equals the checkpoint's, so the two "
                 "implementations compute this model differently")
        return (f"the trainer's forward does not match vLLM's: log-probabilities of the probe prompt differ by up to "
                f"{self.max_abs_diff:.3g} (at position {self.position}; beyond the tolerance of {atol:g} + {rtol:g} x |log p| "
                f"at {self.beyond} positions){where}. Training is off: a wrong weight mapping must not train anything")


def compare(trainer: list[float], engine: list[float], dtype: str) -> ParityResult:
    """Position by position (``engine`` and ``trainer``: log p of tokens 1..n-1)."""
    if len(trainer) != len(engine):
        raise ValueError(f"{len(engine)} log-probabilities from vLLM, {len(trainer)} from the trainer")
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    gaps = [abs(a - b) for a, b in zip(trainer, engine)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    beyond = sum(g > atol + rtol * abs(e) for g, e in zip(gaps, engine))
    return ParityResult(beyond <= OUTLIER_SHARE * len(gaps), gaps[worst], worst + 1, (atol, rtol), beyond)


def _layer_order(name: str) -> tuple[int, str]:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def first_differing_tensor(served: dict[str, torch.Tensor], model_dir: Path) -> str | None:
    """The first (by layer) of ``served`` (name -> the trainer's tensor) whose values are
    not the checkpoint file's tensor of that name, cast to the served dtype; names the
    checkpoint does not have are skipped. None if all match."""
    from .views import checkpoint_tensor

    if not model_dir.is_dir():
        return None
    for name in sorted(served, key=_layer_order):
        stored = checkpoint_tensor(model_dir, name)
        value = served[name].detach()
        if stored is not None and (tuple(stored.shape) != tuple(value.shape) or not torch.equal(stored.to(value.dtype), value.cpu())):
            return name
    return None


def verify_parity(service: TrainerService, op: ParityOp) -> ParityReport:
    """The gate on the trainer (its ``ParityOp``): ready if its forward matches vLLM's, else training stays off."""
    if service.state != "verifying":
        return service.parity
    result = compare(service._logprobs(service.parity.probe_ids), op.engine_logprobs, service.manifest.dtype)
    if not result.passed:
        result.first_differing_tensor = first_differing_tensor(dict(service.access.model.named_parameters()), service.model_dir())
    service.parity = service.parity.model_copy(update=dict(
        state="passed" if result.passed else "failed", max_abs_diff=result.max_abs_diff, position=result.position,
        tolerance=list(result.tolerance), positions_beyond=result.beyond, first_differing_tensor=result.first_differing_tensor))
    if result.passed:
        service.state = "ready"
        service.gate_done.set()
        logger.info("trainer ready: its forward matches vLLM's (max |d log p| %.3g)", result.max_abs_diff)
    else:
        service._fail("unsupported", result.reason())
    return service.parity

"""The trainer's registry of job kinds: one module per training mode, each serving one
job request of ``hogwild.contracts.jobs``. Adding a mode: its request class there, its
module here, and its ``KIND`` in ``KINDS``."""

from __future__ import annotations

from hogwild.contracts.protocol import OpError

from . import adapter_delete, btrm, circuit_breaker, preference, readout, revert, rl, sft
from .base import Admission, JobKind, Outcome

KINDS: dict[type, JobKind] = {kind.request: kind for kind in (sft.KIND, btrm.KIND, circuit_breaker.KIND, revert.KIND,
                                                            readout.KIND, preference.KIND, rl.KIND,
                                                            adapter_delete.KIND)}


def kind_of(op) -> JobKind:
    kind = KINDS.get(type(op))
    if kind is None:
        raise OpError("invalid", f"no job kind serves {type(op).__name__}")
    return kind


__all__ = ["KINDS", "Admission", "JobKind", "Outcome", "kind_of"]

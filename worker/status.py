"""``GET /train/status`` as the trainer reports it: state, jobs, optimizer, memory, checkpoints."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from hogwild.contracts.protocol import TrainerStatus
from hogwild.training.rounding import default_rounding

from .process_memory import memory_snapshot

if TYPE_CHECKING:
    from .service import TrainerService


RL_STEP_STATS = ("loss", "ratio_mean", "clip_fraction", "truncated_fraction", "kl", "advantage_mean", "logprob_gap_mean",
                 "logprob_gap_max")


class TrainedTotals:
    """What this trainer process has trained (full-weight jobs: their optimizer steps and tokens)."""

    def __init__(self):
        self.values = {"tokens_trained": 0, "optimizer_steps": 0, "last_loss": None, "last_step_at": None}

    def add(self, result: dict) -> None:
        """Add an ended job's result."""
        if result.get("optimizer_step") is None or "tokens" not in result:
            return
        self.values["tokens_trained"] += result["tokens"]
        self.values["optimizer_steps"] += result.get("steps", 0)
        for name in ("last_loss", "last_step_at"):
            if result.get(name) is not None:
                self.values[name] = result[name]
        if "advantages" in result and result.get("history"):  # an RL job: its last step's diagnostics
            last = result["history"][-1]
            self.values["last_rl_step"] = {k: last[k] for k in RL_STEP_STATS if last.get(k) is not None}


def totals(service: TrainerService) -> dict:
    """Everything this trainer process has done, as metrics report it."""
    return {"jobs_submitted": dict(service.jobs.submitted), "jobs_finished": dict(service.jobs.ended),
            **service.trained.values, **service.checkpointer.totals, "journal_unreadable": service.jobs.set_aside}


def trainer_status(service: TrainerService) -> TrainerStatus:
    queued, running, recent = service.jobs.snapshot()
    trainer, manifest, bound = service.trainer, service.manifest, service.bound
    optimizer = {
        "step": trainer.global_step if trainer else 0,
        "structure": trainer.structure.model_dump() if trainer and trainer.structure else None,
        "hyper": trainer.hyper.model_dump() if trainer and trainer.hyper else None,
        "state_bytes": service.optimizer_state_bytes,
        # How updates are written into the weights: the last job's, else the default for their dtype.
        "rounding": (trainer.optimizer.rounding if trainer.optimizer is not None else default_rounding(trainer.model))
        if trainer else None,
        "weight_spacing": trainer.weight_spacing if trainer else None,
    }
    memory = {**memory_snapshot(), "model_bytes": manifest.model_bytes if manifest else 0,
              "param_bytes": bound.param_bytes, "shared_param_bytes": bound.shared_param_bytes,
              "binding_private_bytes": bound.binding_private_bytes, "optimizer_state_bytes": service.optimizer_state_bytes}
    return TrainerStatus(
        trainer_id=service.trainer_id, pid=os.getpid(), state=service.state, reason=service.reason,
        model=manifest.model if manifest else None, architectures=manifest.architectures if manifest else [],
        dtype=manifest.dtype if manifest else None, backend=manifest.backend if manifest else None,
        model_class=manifest.model_class if manifest else None,
        quantization=manifest.quantization if manifest else None, frozen=bound.frozen, parity=service.parity.model_dump(),
        vision_tower=bound.vision_tower, queue=queued, running=running, recent=recent, max_queued_jobs=service.jobs.max_queued,
        weights_version=service.weights_version, ledger_size=len(service.ledger) if service.ledger else 0,
        heads=service.heads.info, adapters=service.adapters.history(),
        served_adapters=service.served_adapters.info(), checkpoint=service.checkpointer.status(),
        optimizer=optimizer, memory=memory, totals=totals(service),
        journal={"unreadable": [vars(u) for u in service.jobs.unreadable]},
        tensor_parallel={"size": service.group.size, "ranks": service.group.ranks} if service.group else {"size": 1},
        group=service.replicas.info().model_dump() if service.replicas else None)

"""Circuit breakers (``mode: circuit_breaker``): a LoRA trained on the live model (its
weights untouched meanwhile), merged in place when its guards and the coherence check
let it, and kept so that ``revert`` can undo the merge bit for bit."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hogwild.contracts.jobs import SubmitCircuitBreakerOp
from hogwild.contracts.protocol import OpError
from hogwild.training.circuit_breaker import CircuitBreakerTrainer
from hogwild.training.circuit_breaker_data import read_jsonl
from hogwild.training.lora import merge_in_place

from ..adapters import Adapter
from .base import Admission, JobKind, Services

logger = logging.getLogger("hogwild.worker")
SUMMARY = ("steps", "target_layers", "lora_layers", "harmful_cos_before", "harmful_cos_after", "retain_l2_relative_after")


class CircuitBreaker(JobKind):
    request = SubmitCircuitBreakerOp

    def admit(self, service: Services, op: SubmitCircuitBreakerOp) -> Admission:
        if op.samples is not None and {s.split for s in op.samples} != {"harmful", "retain"}:
            raise OpError("invalid", "samples: a circuit-breaker run needs both harmful and retain samples")
        return Admission(op.sample_count())

    def run(self, service: Services, job):
        op: SubmitCircuitBreakerOp = job.op
        report = None
        samples = op.samples
        if samples is None:
            samples, report = read_jsonl(Path(op.dataset_path))
            if {s.split for s in samples} != {"harmful", "retain"}:
                return "failed", (f"{op.dataset_path}: a circuit-breaker run needs both harmful and retain samples "
                                  f"({report['rows']} readable rows, {report['bad_rows']} bad)")
        job.info.n_samples, job.info.total_steps = len(samples), op.config.steps
        with service.access.exclusive():
            with service.access.restructuring() as model:  # the run attaches its LoRA and takes it off
                trainer = CircuitBreakerTrainer(model, service.tokenizer(), op.config, pad_id=service.pad_id)
                result, factors = trainer.run(samples, on_step=lambda step, total: service.jobs.progress(job, step, total),
                                              should_stop=lambda: job.cancel_requested,
                                              log=lambda line: logger.info("job %s: %s", job.info.job_id, line))
            record = merge_in_place(service.access.model, factors) if factors else None
            if record is not None:
                service.weights_version += 1
        summary = result.as_dict()
        summary.update(merged=record is not None, dataset=report)
        job.info.result = summary
        if result.tripped == "cancelled":
            return "cancelled", None
        if record is None:
            why = result.tripped and f"tripwire: {result.tripped}; rolled back to step {result.rolled_back_to_step}"
            why = why or "coherence check failed: " + "; ".join(result.coherence.get("reasons", []))
            return "failed", f"{why}; nothing was merged, the served weights are unchanged"
        service.adapters.add(Adapter(job_id=job.info.job_id, merged_at=time.time(), weights_version=service.weights_version,
                                     summary={k: summary[k] for k in SUMMARY}, config=op.config.model_dump()), record)
        return "succeeded", None


KIND = CircuitBreaker()

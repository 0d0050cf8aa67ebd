"""Preference training (``mode: preference``): pairs the ledger has not seen, trained in
place with the server's one optimizer; the reference is the served model as the job
starts (``training.preference``)."""

from __future__ import annotations

import logging
import traceback

from hogwild.contracts.jobs import SubmitPreferenceOp
from hogwild.contracts.protocol import OpError
from hogwild.training.memory import estimate_job_memory
from hogwild.training.preference import Pair, PreferenceTrainer

from .base import Admission, JobKind
from .sft import unseen

logger = logging.getLogger("hogwild.worker")


class Preference(JobKind):
    request = SubmitPreferenceOp

    def admit(self, service, op: SubmitPreferenceOp) -> Admission:
        _, skipped = unseen(op.samples, service.ledger)
        return Admission(len(op.samples), skipped, service.trainer.warnings(len(op.samples), op.options))

    def estimate(self, service, op: SubmitPreferenceOp):
        options = op.options
        pairs = min(options.micro_batch_size, options.batch_size or len(op.samples), len(op.samples))
        seq = max(len(s.context_ids) + max(len(s.chosen_ids), len(s.rejected_ids)) for s in op.samples)
        trainer = service.trainer
        new_optimizer = trainer.optimizer is None or trainer.structure != options.structure()
        # Both replies of each pair in one forward: twice the sequences of an SFT micro-batch.
        return estimate_job_memory(service.access.model, 2 * pairs, seq, options.rank, new_optimizer)

    def run(self, service, job):
        info = job.info
        chosen, skipped = unseen(job.op.samples, service.ledger)
        info.skipped_ids = skipped
        pairs = [Pair(tuple(s.context_ids), tuple(s.chosen_ids), tuple(s.rejected_ids), s.weight, s.id,
                      s.ref_chosen_logprob, s.ref_rejected_logprob) for s in chosen]
        if not pairs:
            info.result = {"steps": 0, "note": "every pair was already trained"}
            return "succeeded", None
        version_before = service.weights_version

        def on_step(step: int, total: int, result) -> None:
            service.weights_version = version_before + result.steps
            service.jobs.progress(job, step, total)

        try:
            with service.access.exclusive():
                result = PreferenceTrainer(service.trainer).run(pairs, job.op.options, on_step=on_step,
                                                                should_stop=lambda: job.cancel_requested)
        except OpError as exc:
            return "failed", str(exc)
        except Exception as exc:
            logger.error("job %s failed:\n%s", info.job_id, traceback.format_exc())
            return "failed", f"{type(exc).__name__}: {exc}"
        info.result = result.as_dict()
        if result.stopped_early:
            return "cancelled", None
        service.ledger.record([p.id for p in pairs if p.id is not None], info.job_id)
        return "succeeded", None


KIND = Preference()

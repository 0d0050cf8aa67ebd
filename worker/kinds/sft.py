"""Supervised full-weight training (``mode: sft``): samples the ledger has not seen,
trained by ``training.sft`` with the server's one optimizer, in place."""

from __future__ import annotations

from hogwild.contracts.jobs import SubmitOp
from hogwild.training.batches import Sample
from hogwild.training.memory import estimate_job_memory

from .base import Admission, JobKind, RankTrainer, Services


def unseen(samples, ledger) -> tuple[list, list[str]]:
    """The samples to train, and the ids skipped: already in the ledger, or repeated in the job."""
    chosen, skipped, seen = [], [], set()
    for s in samples:
        if s.id is not None and (s.id in ledger or s.id in seen):
            if s.id not in skipped:
                skipped.append(s.id)
            continue
        if s.id is not None:
            seen.add(s.id)
        chosen.append(s)
    return chosen, skipped


class SFT(JobKind):
    """Also the base of the other full-weight modes on ledger-tracked samples (preference, rl):
    they differ in what a sample becomes, which trainer runs it and its memory."""

    request = SubmitOp
    noun = "sample"
    tensor_parallel = True

    def admit(self, service: Services, op: SubmitOp) -> Admission:
        _, skipped = unseen(op.samples, service.ledger)
        return Admission(len(op.samples), skipped, service.trainer.warnings(len(op.samples), op.options))

    def estimate(self, service: Services, op: SubmitOp):
        options = op.options
        micro = min(options.micro_batch_size, options.batch_size or len(op.samples), len(op.samples))
        seq = max(length for _, length in op.sequence_lengths())  # the longest sequence a forward reads
        trainer = service.trainer
        new_optimizer = trainer.optimizer is None or trainer.structure != options.structure()
        return estimate_job_memory(service.access.model, micro, seq, options.rank, new_optimizer)

    def items(self, samples) -> list:
        """The request's samples as the trainer takes them."""
        return [Sample(tuple(s.context_ids), tuple(s.continuation_ids), s.weight, s.id) for s in samples]

    def prepare(self, service: Services, op, chosen) -> list:
        """The chosen samples as the trainer takes them, before the model is held (RL scores its
        completions with the reward heads here)."""
        return self.items(chosen)

    def train(self, rank: RankTrainer, items: list, options, **callbacks):
        return rank.trainer.run(items, options, **callbacks)

    def run(self, service: Services, job):
        info = job.info
        chosen, skipped = unseen(job.op.samples, service.ledger)
        info.skipped_ids = skipped
        items = self.prepare(service, job.op, chosen)
        if not items:
            info.result = {"steps": 0, "note": f"every {self.noun} was already trained"}
            return "succeeded", None
        version_before = service.weights_version

        def on_step(step: int, total: int, result) -> None:
            service.weights_version = version_before + result.steps
            service.jobs.progress(job, step, total)

        with service.access.exclusive():
            result = service.train_on_ranks(self, job.op.model_copy(update={"samples": chosen}), items, on_step=on_step,
                                            should_stop=lambda: job.cancel_requested)
        info.result = result.as_dict()
        if result.stopped_early:
            return "cancelled", None  # its completed steps stay applied; its samples are not in the ledger
        service.ledger.record([item.id for item in items if item.id is not None], info.job_id)
        return "succeeded", None


KIND = SFT()

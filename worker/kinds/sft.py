"""Supervised training (``mode: sft``): samples the ledger has not seen, trained by
``training.sft`` with the server's one optimizer on the served weights, in place, or with
the adapter's own optimizer on a served adapter (``worker/served_adapters.py``)."""

from __future__ import annotations

from hogwild.contracts.jobs import SubmitOp
from hogwild.contracts.protocol import OpError
from hogwild.training.batches import Sample
from hogwild.training.memory import estimate_job_memory

from .base import Admission, JobKind, RankTrainer, Services


def ledger_scope(service: Services, op) -> str:
    """What the job's sample ids are prefixed with in the ledger: nothing for the full weights;
    for an adapter, its name and birth, so that each adapter (and one deleted and made anew)
    trains a sample the base or another adapter has trained."""
    adapter = getattr(op, "adapter", None)  # the requests of SFT's kinds have one; a delete does not
    return "" if adapter is None else service.served_adapters.ledger_scope(adapter.name)


def unseen(samples, ledger, scope: str = "") -> tuple[list, list[str]]:
    """The samples to train, and the ids skipped: already in the ledger, or repeated in the job."""
    chosen, skipped, seen = [], [], set()
    for s in samples:
        if s.id is not None and (scope + s.id in ledger or s.id in seen):
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
        if op.adapter is not None:
            if service.tensor_parallel_size > 1:
                raise OpError("unsupported", "adapter training with tensor parallel size "
                              f"{service.tensor_parallel_size} is not built yet: serve with tensor parallel size 1 for it")
            service.served_adapters.resolve(op.adapter)  # refuses a shape unlike the adapter's, unknown targets
        _, skipped = unseen(op.samples, service.ledger, ledger_scope(service, op))
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
        chosen, skipped = unseen(job.op.samples, service.ledger, ledger_scope(service, job.op))
        info.skipped_ids = skipped
        items = self.prepare(service, job.op, chosen)
        if not items:
            info.result = {"steps": 0, "note": f"every {self.noun} was already trained"}
            return "succeeded", None
        train = self.train_weights if job.op.adapter is None else self.train_adapter
        result = train(service, job, chosen, items)
        info.result = result.as_dict()
        if result.stopped_early:
            return "cancelled", None  # its completed steps stay applied; its samples are not in the ledger
        scope = ledger_scope(service, job.op)  # a new adapter's is known now
        service.ledger.record([scope + item.id for item in items if item.id is not None], info.job_id)
        return "succeeded", None


    def train_weights(self, service: Services, job, chosen: list, items: list):
        """The served weights, in place, on every tensor-parallel rank: one weights version per step."""
        version_before = service.weights_version

        def on_step(step: int, total: int, result) -> None:
            service.weights_version = version_before + result.steps
            service.jobs.progress(job, step, total)

        with service.access.exclusive():
            return service.train_on_ranks(self, job.op.model_copy(update={"samples": chosen}), items, on_step=on_step,
                                          should_stop=lambda: job.cancel_requested)

    def train_adapter(self, service: Services, job, chosen: list, items: list):
        """The job's adapter on the frozen base (``ServedAdapters.training``): one adapter version per step."""
        with service.access.exclusive(), service.served_adapters.training(
                job.op.adapter, service.access, service.pad_id, job.op.options.seed) as run:
            def on_step(step: int, total: int, result) -> None:
                run.stepped(result.steps)
                service.jobs.progress(job, step, total)

            return self.train(run, items, job.op.options, on_step=on_step, should_stop=lambda: job.cancel_requested)


KIND = SFT()

"""Reverting a merged circuit-breaker adapter (``POST /train/revert``): a queued job like
training; bit for bit unless the weights were trained after the merge."""

from __future__ import annotations

from hogwild.contracts.jobs import SubmitRevertOp
from hogwild.training.lora import revert_in_place

from .base import Admission, JobKind, Services


class Revert(JobKind):
    request = SubmitRevertOp

    def admit(self, service: Services, op: SubmitRevertOp) -> Admission:
        service.adapters.revertible(op.job_id)  # refuse at once what cannot be reverted
        return Admission(0)

    def run(self, service: Services, job):
        adapter, record = service.adapters.revertible(job.op.job_id)  # still: another revert may have come first
        with service.access.exclusive() as model:
            exact = revert_in_place(model, record)
            service.weights_version += 1
        service.adapters.reverted(adapter.job_id, exact)
        job.info.result = {"reverted": adapter.job_id, "exact": exact,
                           "note": None if exact else "the weights were trained after the merge: the adapter's delta "
                           "was subtracted, but the other changes stay"}
        return "succeeded", None


KIND = Revert()

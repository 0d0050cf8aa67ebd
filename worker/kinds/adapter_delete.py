"""Forgetting a served adapter (``mode: adapter_delete``, ``DELETE /adapters/<name>``): its
live and durable copies deleted once no job trains it; the API server then has vLLM stop
serving it (``plugin/api_server/adapter_registry.py``)."""

from __future__ import annotations

from hogwild.contracts.jobs import SubmitAdapterDeleteOp
from hogwild.contracts.protocol import OpError

from .base import Admission, JobKind, Services


class AdapterDelete(JobKind):
    request = SubmitAdapterDeleteOp

    def admit(self, service: Services, op: SubmitAdapterDeleteOp) -> Admission:
        if op.name not in service.served_adapters.records:
            raise OpError("not_found", f"no adapter named {op.name!r}")
        return Admission(n_samples=0)

    def run(self, service: Services, job):
        with service.access.exclusive():
            record = service.served_adapters.delete(job.op.name)
        job.info.result = {"deleted": record.name, "steps": record.steps, "version": record.version}
        return "succeeded", None


KIND = AdapterDelete()

"""Circuit-breaker adapters merged into the served weights: their history, and
what it takes to revert each one exactly (``training.lora.MergeRecord``).

Kept in the session directory (safetensors + JSON, written atomically) so that a
restarted trainer can still revert what its predecessor merged. A new server
starts a new history: its weights are whatever the model directory holds.
Reverts are last-in, first-out: an adapter can be reverted once every adapter
merged after it has been.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel
from safetensors.torch import load, save

from hogwild.contracts.protocol import OpError
from hogwild.training.lora import MergeRecord, factor_tensors, factors_from_bytes

from .checkpoint import write_atomic


class Adapter(BaseModel):
    job_id: str
    merged_at: float
    weights_version: int
    summary: dict
    config: dict
    reverted_at: float | None = None
    revert_exact: bool | None = None


KEPT = ("choices", "fix_index", "fix_value")  # MergeRecord's per-module tensors besides the factors


def record_to_bytes(record: MergeRecord) -> tuple[bytes, dict]:
    """The factors and what the revert needs in one safetensors file; scalings,
    noise seeds, digests and the rounding as JSON."""
    factors = factor_tensors(record.factors)
    kept = {f"{n}.{k}": getattr(record, k)[n] for n in record.factors for k in KEPT}
    meta = {n: {"scaling": s, "digest": record.digests[n], "seed": record.seeds[n], "rounding": record.rounding}
            for n, (_, _, s) in record.factors.items()}
    return save({**factors, **kept}), meta


def record_from_bytes(data: bytes, meta: dict) -> MergeRecord:
    rounding = next(iter(meta.values()))["rounding"] if meta else "stochastic"
    record = MergeRecord(factors=factors_from_bytes(data, {n: m["scaling"] for n, m in meta.items()}), rounding=rounding)
    t = load(data)
    for name, m in meta.items():
        record.digests[name], record.seeds[name] = m["digest"], m["seed"]
        for k in KEPT:
            getattr(record, k)[name] = t[f"{name}.{k}"]
    return record


class AdapterBook:
    def __init__(self, directory: Path):
        self.directory = directory
        self.adapters: list[Adapter] = []
        self.records: dict[str, MergeRecord] = {}
        for meta_path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            saved = json.loads(meta_path.read_text())
            adapter = Adapter(**saved["adapter"])
            self.adapters.append(adapter)
            if adapter.reverted_at is None:
                self.records[adapter.job_id] = record_from_bytes(meta_path.with_suffix(".safetensors").read_bytes(), saved["modules"])
        self.adapters.sort(key=lambda a: a.merged_at)

    def _save(self, adapter: Adapter, modules: dict) -> None:
        write_atomic(self.directory / f"{adapter.job_id}.json",
                     json.dumps({"adapter": adapter.model_dump(), "modules": modules}).encode())

    def add(self, adapter: Adapter, record: MergeRecord) -> None:
        data, modules = record_to_bytes(record)
        write_atomic(self.directory / f"{adapter.job_id}.safetensors", data)  # before the JSON that points at it
        self._save(adapter, modules)
        self.adapters.append(adapter)
        self.records[adapter.job_id] = record

    def revertible(self, job_id: str | None) -> tuple[Adapter, MergeRecord]:
        """The adapter to revert: ``job_id``'s, which must be the latest still merged."""
        merged = [a for a in self.adapters if a.reverted_at is None]
        if not merged:
            raise OpError("conflict", "no circuit-breaker adapter is merged into the served weights")
        latest = merged[-1]
        if job_id is not None and job_id != latest.job_id:
            if not any(a.job_id == job_id for a in self.adapters):
                raise OpError("not_found", f"no adapter was merged by job {job_id}")
            if any(a.job_id == job_id for a in merged):
                raise OpError("conflict", f"adapter {job_id} was merged before {latest.job_id}: revert that one first")
            raise OpError("conflict", f"adapter {job_id} has already been reverted")
        return latest, self.records[latest.job_id]

    def reverted(self, job_id: str, exact: bool) -> None:
        adapter = next(a for a in self.adapters if a.job_id == job_id)
        adapter.reverted_at, adapter.revert_exact = time.time(), exact
        self._save(adapter, {})
        self.records.pop(job_id, None)
        (self.directory / f"{job_id}.safetensors").unlink(missing_ok=True)

    def history(self) -> list[dict]:
        return [a.model_dump() for a in self.adapters]

"""The job journal: every submitted job on disk until it has ended.

Per job in ``<state dir>/jobs/``: ``<id>.request.json`` (the request, samples and
options), written once, fsynced, when the job is accepted and removed when it ends;
and ``<id>.json``, its ``JobInfo``, small, rewritten as the job moves (fsynced at
submission, start and end; progress is not). A trainer that starts after another one
died reads both back, so no submitted job is silently lost: finished jobs stay
answerable, queued jobs run, and the job that was running is reported failed.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import TypeAdapter

from hogwild.contracts.protocol import JobInfo, JobRequest

REQUEST = TypeAdapter(JobRequest)

KEEP_FINISHED = 256  # finished jobs kept answerable across restarts


def _write(path: Path, data: bytes, durable: bool) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class JobJournal:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def save_request(self, job_id: str, request: JobRequest) -> None:
        """The request, once, durably: before the caller hears "queued"."""
        _write(self.directory / f"{job_id}.request.json", request.model_dump_json().encode(), durable=True)

    def save(self, info: JobInfo, durable: bool = True) -> None:
        """The job's state; ``durable`` fsyncs it (submission, start, end), progress need not."""
        _write(self.directory / f"{info.job_id}.json", info.model_dump_json().encode(), durable)

    def drop_request(self, job_id: str) -> None:
        """The job has ended: its samples are no longer needed."""
        (self.directory / f"{job_id}.request.json").unlink(missing_ok=True)

    def load(self) -> list[tuple[JobInfo, JobRequest | None]]:
        """Every readable record with its request (if still kept), oldest submission first."""
        records = []
        for path in self.directory.glob("job-*.json"):
            if path.name.endswith(".request.json"):
                continue
            try:
                info = JobInfo.model_validate_json(path.read_bytes())
                request_path = path.with_name(f"{info.job_id}.request.json")
                request = REQUEST.validate_json(request_path.read_bytes()) if request_path.exists() else None
                records.append((info, request))
            except (OSError, ValueError):
                continue
        return sorted(records, key=lambda r: r[0].submitted_at)

    def forget(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            (self.directory / f"{job_id}.json").unlink(missing_ok=True)
            self.drop_request(job_id)

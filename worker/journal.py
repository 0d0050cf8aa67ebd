"""The job journal: every submitted job on disk until it has ended.

One JSON file per job in ``<state dir>/jobs/``, written atomically: the request
(samples and options) while the job is pending, and its ``JobInfo`` always. A
trainer that starts after another one died reads it back, so no submitted job
is silently lost: finished jobs stay answerable, queued jobs run, and the job
that was running is reported failed with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import TypeAdapter

from .protocol import JobInfo, JobRequest

REQUEST = TypeAdapter(JobRequest)

KEEP_FINISHED = 256  # finished jobs kept answerable across restarts


class JobJournal:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def save(self, info: JobInfo, request: JobRequest | None, durable: bool = True) -> None:
        """Write the job's record; ``durable`` fsyncs it (submission, end)."""
        path = self.directory / f"{info.job_id}.json"
        tmp = path.with_suffix(".tmp")
        record = {"info": info.model_dump(), "request": request.model_dump() if request is not None else None}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self) -> list[tuple[JobInfo, JobRequest | None]]:
        """Every readable record, oldest submission first."""
        records = []
        for path in self.directory.glob("job-*.json"):
            try:
                raw = json.loads(path.read_text())
                request = REQUEST.validate_python(raw["request"]) if raw.get("request") else None
                records.append((JobInfo.model_validate(raw["info"]), request))
            except (OSError, ValueError, KeyError):
                continue
        return sorted(records, key=lambda r: r[0].submitted_at)

    def forget(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            (self.directory / f"{job_id}.json").unlink(missing_ok=True)

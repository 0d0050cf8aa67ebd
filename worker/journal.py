"""The job journal: every submitted job on disk until it has ended.

Per job in ``<state dir>/jobs/``: ``<id>.request.json`` (the request, samples and
options), written once, fsynced, when the job is accepted and removed when it ends;
and ``<id>.json``, its ``JobInfo``, small, rewritten as the job moves (fsynced at
submission, start and end; progress is not). A trainer that starts after another one
died reads both back, so no submitted job is silently lost: finished jobs stay
answerable, queued jobs run, and the job that was running is reported failed. A
record that no longer parses is moved to ``unreadable/`` with its reason, and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter

from hogwild.contracts.protocol import JobInfo, JobRequest

REQUEST = TypeAdapter(JobRequest)

KEEP_FINISHED = 256  # finished jobs kept answerable across restarts
UNREADABLE = "unreadable"  # records that no longer parse, set aside with their reasons
logger = logging.getLogger("hogwild.worker")


@dataclass(frozen=True)
class Unreadable:
    """A journal file set aside: its name, the job it was of, and why it did not parse."""

    file: str
    job_id: str
    reason: str


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

    def load(self) -> tuple[list[tuple[JobInfo, JobRequest | None]], list[Unreadable]]:
        """Every readable record with its request (if still kept), oldest submission first;
        and the files that no longer parse (a contracts change, a torn write), each moved
        to ``unreadable/`` with the reason beside it, never dropped."""
        records, unreadable = [], []
        for path in sorted(self.directory.glob("job-*.json")):
            if path.name.endswith(".request.json"):
                continue
            try:
                info = JobInfo.model_validate_json(path.read_bytes())
            except (OSError, ValueError) as exc:
                unreadable.append(self._set_aside(path, exc))
                continue
            request_path = path.with_name(f"{info.job_id}.request.json")
            request = None
            if request_path.exists() and not info.done:
                try:
                    request = REQUEST.validate_json(request_path.read_bytes())
                except (OSError, ValueError) as exc:
                    unreadable.append(self._set_aside(request_path, exc, info.job_id))
            records.append((info, request))
        return sorted(records, key=lambda r: r[0].submitted_at), unreadable

    def _set_aside(self, path: Path, exc: Exception, job_id: str | None = None) -> Unreadable:
        aside = self.directory / UNREADABLE
        aside.mkdir(exist_ok=True, mode=0o700)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        os.replace(path, aside / path.name)
        _write(aside / f"{path.name}.reason", reason.encode(), durable=True)
        logger.error("job journal: %s could not be read (%s); kept in %s", path.name, reason, aside)
        return Unreadable(file=path.name, job_id=job_id or path.name.removesuffix(".json"), reason=reason)

    def unreadable(self) -> list[Unreadable]:
        """What ``unreadable/`` holds, with the reasons written beside each file."""
        aside = self.directory / UNREADABLE
        found = []
        for reason in sorted(aside.glob("*.reason")):
            name = reason.name.removesuffix(".reason")
            found.append(Unreadable(file=name, job_id=name.removesuffix(".json").removesuffix(".request"),
                                    reason=reason.read_text(errors="replace")))
        return found

    def forget(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            (self.directory / f"{job_id}.json").unlink(missing_ok=True)
            self.drop_request(job_id)

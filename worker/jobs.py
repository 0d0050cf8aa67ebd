"""The trainer's jobs: the queue, the running one, the finished ones.

Every change of a job's state goes to the journal first, so that a trainer
started after this one died can account for every job (see ``journal.py``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque

from hogwild.contracts.protocol import JobInfo, JobRequest, OpError

from . import faults
from .journal import KEEP_FINISHED, UNREADABLE, JobJournal

logger = logging.getLogger("hogwild.worker")
RECENT_JOBS = 32  # finished jobs listed by status


class Job:
    def __init__(self, op: JobRequest, info: JobInfo):
        self.op = op
        self.info = info
        self.cancel_requested = False
        self.last_saved = 0.0


class JobBook:
    def __init__(self, journal: JobJournal, trainer_id: str, max_queued: int):
        self.journal = journal
        self.trainer_id = trainer_id
        self.max_queued = max_queued
        self.jobs: dict[str, Job] = {}
        self.pending: deque[Job] = deque()
        self.finished: list[str] = []  # oldest first
        self.running: Job | None = None
        self.by_key: dict[str, str] = {}  # idempotency key -> the job admitted under it
        self.cv = threading.Condition()
        # Totals of this trainer process, for metrics: accepted jobs by mode, ended ones by "mode/state".
        self.submitted: dict[str, int] = {}
        self.ended: dict[str, int] = {}
        self.set_aside = 0  # journal records this process found unreadable (and moved aside)
        self.unreadable: list = []  # every record kept in the journal's unreadable/, read once at recovery

    def recover(self, reason: str) -> list[JobInfo]:
        """Read the journal left by earlier trainers: finished jobs stay answerable,
        queued ones run again, the one that was running is failed with ``reason``.
        A job whose request no longer parses is failed saying so (the file is kept aside).
        Returns the jobs failed here."""
        failed = []
        records, unreadable = self.journal.load()
        self.set_aside = len(unreadable)
        self.unreadable = self.journal.unreadable()  # this process's and earlier ones': only recovery adds to it
        lost_requests = {u.job_id: u for u in unreadable}
        for info, request in records:
            job = Job(request, info)
            self.jobs[info.job_id] = job
            if info.idempotency_key is not None:
                self.by_key[info.idempotency_key] = info.job_id
            if info.done:
                self.finished.append(info.job_id)
            elif info.state == "queued" and request is not None:
                self.pending.append(job)
            else:
                info.state, info.finished_at = "failed", time.time()
                if info.job_id in lost_requests:
                    info.error = (f"its request could not be read back from the journal ({lost_requests[info.job_id].reason}); "
                                  f"kept in {self.journal.directory / UNREADABLE}. Resubmit it.")
                else:
                    info.error = (f"{reason} while this job was running; at least {info.step} of {info.total_steps} steps "
                                  "had been applied to the served weights (progress is journaled once a second). "
                                  "Resubmit it to train the rest.")
                self.journal.save(info)
                self.journal.drop_request(info.job_id)
                self.finished.append(info.job_id)
                self.ended[f"{info.mode}/failed"] = self.ended.get(f"{info.mode}/failed", 0) + 1
                logger.warning("job %s was running when the previous trainer died: reported failed", info.job_id)
                failed.append(info)
        return failed

    def admitted(self, op: JobRequest) -> JobInfo | None:
        """The job already admitted under the request's idempotency key (None: none is, or it
        carries no key). The key sent with another request is refused: it names another job."""
        with self.cv:
            job_id = self.by_key.get(op.idempotency_key) if op.idempotency_key is not None else None
            if job_id is None:
                return None
            info = self.jobs[job_id].info
            if info.request_sha256 != op.request_sha256():
                raise OpError("invalid", f"Idempotency-Key {op.idempotency_key!r} was sent with another request, for "
                              f"job {job_id}: use a new key for a new request")
            return info

    def add(self, op: JobRequest, n_samples: int, skipped_ids: list[str], warnings: list[str] | None = None) -> JobInfo:
        with self.cv:
            if len(self.pending) >= self.max_queued:
                raise OpError("busy", f"{len(self.pending)} jobs are queued, the limit is {self.max_queued}; retry later")
            info = JobInfo(job_id=f"job-{secrets.token_hex(6)}", trainer_id=self.trainer_id, mode=op.mode, state="queued",
                           n_samples=n_samples, skipped_ids=skipped_ids, warnings=warnings or [], submitted_at=time.time(),
                           adapter=op.adapter_name(), idempotency_key=op.idempotency_key,
                           request_sha256=op.request_sha256() if op.idempotency_key is not None else None)
            job = Job(op, info)
            self.journal.save_request(info.job_id, op)  # durable before the caller hears "queued"
            self.journal.save(info)
            self.submitted[op.mode] = self.submitted.get(op.mode, 0) + 1
            self.jobs[info.job_id] = job
            if op.idempotency_key is not None:
                self.by_key[op.idempotency_key] = info.job_id
            self.pending.append(job)
            self.cv.notify()
            return info

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise OpError("not_found", f"no job {job_id!r}")
        return job

    def cancel(self, job_id: str) -> JobInfo:
        with self.cv:
            job = self.get(job_id)
            if job.info.done:
                raise OpError("conflict", f"job {job_id} has already ended ({job.info.state})")
            if job is self.running:
                job.cancel_requested = True  # the trainer stops after its current step
                return job.info
            self.pending.remove(job)
            job.info.state, job.info.finished_at = "cancelled", time.time()
            self._finish(job)
            return job.info

    def next(self, stopping, on_idle=None) -> Job | None:
        """Block until a job is queued (None once ``stopping()``); it becomes the
        running one (``started`` marks it so). ``on_idle`` is called about twice a second meanwhile."""
        with self.cv:
            while not self.pending:
                if stopping():
                    return None
                self.cv.wait(timeout=0.5)
                if on_idle is not None and not self.pending:
                    self.cv.release()
                    try:
                        on_idle()
                    finally:
                        self.cv.acquire()
            job = self.pending.popleft()
            self.running = job
        return job

    def started(self, job: Job) -> None:
        """The running job begins its work: journaled as running first."""
        job.info.state, job.info.started_at, job.info.trainer_id = "running", time.time(), self.trainer_id
        self.journal.save(job.info)

    def progress(self, job: Job, step: int, total: int) -> None:
        """Record progress; written to disk at most once a second (not fsynced)."""
        job.info.step, job.info.total_steps = step, total
        if step == total:
            faults.last_step_done(job)
        now = time.monotonic()
        if job.op is not None and now - job.last_saved >= 1.0:  # a replica group's mirrored job is the leader's to journal
            job.last_saved = now
            self.journal.save(job.info, durable=False)

    def end(self, job: Job, journal: bool = True) -> None:
        """The job has ended (its final state set): journaled (``journal``: unless the
        journal has just failed for it), counted, kept answerable among the finished ones."""
        with self.cv:
            if journal:
                self.journal.save(job.info)
            self.running = None
            self._finish(job, save=False)

    def _finish(self, job: Job, save: bool = True) -> None:
        key = f"{job.info.mode}/{job.info.state}"
        self.ended[key] = self.ended.get(key, 0) + 1
        if save:
            self.journal.save(job.info)
        try:
            self.journal.drop_request(job.info.job_id)  # the samples are no longer needed
        except OSError:
            logger.warning("job %s: its request file could not be removed", job.info.job_id)
        self.finished.append(job.info.job_id)
        if len(self.finished) > KEEP_FINISHED:
            old, self.finished = self.finished[:-KEEP_FINISHED], self.finished[-KEEP_FINISHED:]
            self.journal.forget(old)
            for job_id in old:
                key = self.jobs.pop(job_id).info.idempotency_key
                if key is not None and self.by_key.get(key) == job_id:
                    del self.by_key[key]

    def mirror(self, info: JobInfo) -> Job:
        """A replica group's job that the leader admitted and journaled, running on this replica
        too: answerable here, never journaled here."""
        with self.cv:
            job = Job(None, info.model_copy(update={"state": "running", "trainer_id": self.trainer_id,
                                                    "started_at": time.time()}))
            self.jobs[info.job_id] = self.running = job
            return job

    def end_mirror(self, info: JobInfo) -> Job:
        """The leader ended a mirrored job as ``info`` says."""
        with self.cv:
            job = self.jobs.get(info.job_id) or Job(None, info)
            job.info = info
            self.jobs[info.job_id] = job
            if self.running is job:
                self.running = None
            self._finish(job, save=False)
            return job

    def idle(self) -> bool:
        with self.cv:
            return not self.pending

    def snapshot(self) -> tuple[list[JobInfo], JobInfo | None, list[JobInfo]]:
        """(queued, running, recent finished, newest first)."""
        with self.cv:
            return ([j.info for j in self.pending], self.running.info if self.running else None,
                    [self.jobs[i].info for i in reversed(self.finished[-RECENT_JOBS:])])

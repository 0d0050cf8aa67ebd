"""Fault injection for the tests: raise, or kill the trainer, at a named phase of a job.

Off unless ``HOGWILD_TEST_FAULTS`` (``envs.test_faults``) names a file (the test suite sets it on a server of its
own); then every ``point`` reads that file, and when it holds a fault for this phase and
job mode, ``{"phase": ..., "mode": ... | null, "action": "raise" | "kill" | "hang"}``, the file is
renamed to ``<file>.fired`` (with the job's id added: proof that it fired, once) and the
fault happens. Off, a point costs one dictionary look-up.

Phases, in a job's order: ``admission`` (after the kind's checks, before queueing),
``memory_check``, ``before_first_step``, ``mid_step`` (gradients computed, no weight
written: a global optimizer step pre-hook), ``after_last_step`` (the job's last progress
report), ``evaluation`` (the first forward after the last step), ``journal_write`` (the
job's final record), ``event_send`` (the job_finished event), and ``checkpoint`` (the
start of a checkpoint sync, whatever job came before: its ``mode`` is null). In a replica group,
a follower's ``replica_share`` comes before its share of a job's first step (``hang`` there
holds the whole group's job in its first collective, for a test to kill the replica).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hogwild import envs

logger = logging.getLogger("hogwild.worker")
PHASES = ("admission", "memory_check", "before_first_step", "mid_step", "after_last_step", "evaluation", "journal_write",
          "event_send", "checkpoint", "replica_share")


class InjectedFault(RuntimeError):
    """What a ``raise`` fault raises."""


_spec_path = envs.test_faults()
_current: dict = {}  # the job the job thread is running: {"job": ..., "thread": ..., "last_step_done": bool}


def point(phase: str, job=None, mode: str | None = None) -> None:
    """Fire the fault the spec file holds for ``phase`` and this job's mode, if any."""
    if _spec_path is None:
        return
    mode = job.info.mode if job is not None else mode
    try:
        spec = json.loads(_spec_path.read_text())
    except (OSError, ValueError):
        return
    if spec.get("phase") != phase or spec.get("mode") not in (None, mode):
        return
    fired = _spec_path.with_name(_spec_path.name + ".fired")
    fired.write_text(json.dumps({**spec, "job_id": job.info.job_id if job is not None else None}))
    _spec_path.unlink(missing_ok=True)
    logger.error("injected fault: %s at %s (%s)", spec.get("action"), phase, mode)
    if spec.get("action") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.get("action") == "hang":
        threading.Event().wait()
    raise InjectedFault(f"injected fault at {phase}")


@contextmanager
def during(job) -> Iterator[None]:
    """The job's run: the phases that come from inside training (``mid_step``,
    ``evaluation``) fire for it, on its thread only."""
    _current.update(job=job, thread=threading.get_ident(), last_step_done=False)
    try:
        yield
    finally:
        _current.clear()


def last_step_done(job) -> None:
    """The job reported its last step: ``after_last_step`` now, ``evaluation`` at the next forward."""
    point("after_last_step", job)
    if _current.get("job") is job:
        _current["last_step_done"] = True


def _in_job() -> bool:
    return _current.get("thread") == threading.get_ident()


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    if _in_job():
        point("mid_step", _current["job"])


def _before_forward(module, args) -> None:
    if _in_job() and _current["last_step_done"]:
        _current["last_step_done"] = False  # once: the evaluation's first forward
        point("evaluation", _current["job"])


if _spec_path is not None:
    register_optimizer_step_pre_hook(_before_optimizer_step)
    register_module_forward_pre_hook(_before_forward)

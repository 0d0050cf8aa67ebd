"""Waiting on a condition with a deadline, never on a sleep that hopes something happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TRAINER_STARTING = ("starting", "verifying", "unavailable")


def wait_until(condition: Callable[[], T], timeout: float = 120.0, what: str | Callable[[], str] = "the condition",
               interval: float = 0.1) -> T:
    """Call ``condition`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds, naming ``what`` (or what it returns, when a callable) and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what} did not happen within {timeout:.0f} s (last: {value!r})")
        time.sleep(interval)


def wait_job(handle, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 120.0) -> dict:
    """A job's answer once its state is one of ``states`` (503 while the trainer restarts: asked again)."""
    last: dict = {}

    def reached():
        r = handle.http.get(f"/train/{job_id}")
        last.clear()
        last.update(r.json())
        return dict(last) if r.status_code == 200 and last.get("state") in states else None

    return wait_until(reached, timeout, lambda: f"{job_id} reaching {states} (it is {last})")


def wait_idle(handle, timeout: float = 300.0) -> dict:
    """``/train/status`` once no job runs or waits (a trainer that is down is not idle)."""

    def idle():
        r = handle.http.get("/train/status")
        status = r.json() if r.status_code == 200 else {}
        return status if status and status.get("running") is None and not status.get("queue") else None

    return wait_until(idle, timeout, "the trainer falling idle")


def wait_new_trainer(handle, old_trainer_id: str, timeout: float = 180.0) -> dict:
    """``/train/status`` once a trainer other than ``old_trainer_id`` has started (past the
    parity gate; answers 503 meanwhile)."""

    def started():
        r = handle.http.get("/train/status")
        if r.status_code != 200:
            return None
        status = r.json()
        new = status.get("trainer_id") not in (None, old_trainer_id)
        return status if new and status.get("state") not in TRAINER_STARTING else None

    return wait_until(started, timeout, "a new trainer starting", interval=0.2)

"""Inside the API server: start the training subprocess and keep it running.

With several API server processes (``--api-server-count``), each one tries an
exclusive ``flock`` on the session's lock file; the one that gets it owns the
trainer for the server's lifetime, the others only connect to it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hogwild.contracts.trainer_ranks import RANK_DIED_EXIT, how_it_ended

from ..session import lock_path

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it


def exit_reason(returncode: int) -> str:
    if returncode == RANK_DIED_EXIT:
        return "a tensor-parallel trainer rank died or the ranks fell out of step: the trainer and its ranks were restarted"
    return f"the training process {how_it_ended(returncode)}"


class TrainerProcess:
    def __init__(self, session: Path, state_dir: Path, threads: int | None = None):
        self.session = session
        self.state_dir = state_dir
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.lock_fd: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None  # why the last trainer process ended
        self.watcher: asyncio.Task | None = None
        self.on_exit: Callable[[str], None] | None = None  # told why, each time the trainer process ends
        self.ready_pid: int | None = None  # the trainer process that has answered as ready to train

    def try_own(self) -> bool:
        """Take the trainer lock if no other API server process holds it."""
        fd = os.open(lock_path(self.session), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.lock_fd = fd
        return True

    def start(self, restart_reason: str | None = None) -> None:
        cmd = [sys.executable, "-m", "hogwild.worker", "--session", str(self.session), "--state-dir", str(self.state_dir),
               "--parent-pid", str(os.getpid())]
        if restart_reason:
            cmd += ["--restart-reason", restart_reason]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        self.proc = subprocess.Popen(cmd)
        self.started_at = time.monotonic()
        logger.info("hogwild: started the training process (pid %d)", self.proc.pid)

    async def watch(self) -> None:
        """Restart the trainer if it dies: after a second if it had been ready to train (or up
        a minute), with a growing pause if it keeps dying before it gets there."""
        pause = 0.5
        while True:
            await asyncio.sleep(0.5)
            if self.proc is None or self.proc.poll() is None:
                continue
            reason = self.last_exit = exit_reason(self.proc.returncode)
            logger.error("hogwild: %s; restarting it", reason)
            if self.on_exit is not None:
                self.on_exit(reason)
            lived = time.monotonic() - self.started_at
            pause = 1.0 if lived > 60 or self.ready_pid == self.proc.pid else min(pause * 2, 30.0)
            await asyncio.sleep(pause)
            self.restarts += 1
            self.start(restart_reason=reason)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

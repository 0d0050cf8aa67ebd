"""The trainer's tensor-parallel ranks: one process per vLLM rank, one torch.distributed
group (gloo on CPU, NCCL on GPU).

Rank 0 is the training subprocess the API server started (``__main__``); ``RankGroup``
starts the others (``python -m hogwild.worker.follower``), forms the group with them
over a file store in the session directory, and before each piece of model work sends
every rank the same ``contracts.trainer_ranks`` command so that all run the same code
on their own shards. Failure modes: a rank that dies takes rank 0 down with it
(``RANK_DIED_EXIT``; the API server's supervisor reports the running job failed and
starts a new group), and rank 0's death stops the others (each asks the kernel for
SIGTERM when its parent dies). Inference never depends on any of them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hogwild.contracts.trainer_ranks import RANK_DIED_EXIT, RankEnvelope, how_it_ended

logger = logging.getLogger("hogwild.worker")

MAX_ERROR_BYTES = 2048


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def group_device(manifest) -> torch.device:
    """Where a rank's collectives run: its vLLM rank's GPU (NCCL), or the CPU (gloo)."""
    if manifest.backend == "cuda_ipc" and manifest.tensors:
        return torch.device("cuda", manifest.tensors[0].cuda_ipc.device)
    return torch.device("cpu")


def store_path(session: Path, trainer_id: str) -> Path:
    """The group's rendezvous file: a new one for each trainer incarnation."""
    return session / f"trainer-group-{trainer_id}.store"


def join_group(store: Path, rank: int, size: int, device: torch.device) -> None:
    # Long timeout: a collective waits for the slowest rank's step; a dead rank is noticed
    # by its exit (rank 0 watches), not by this.
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), store=dist.FileStore(str(store), size), rank=rank, world_size=size,
                            timeout=timedelta(hours=2))


def send_command(envelope: RankEnvelope, device: torch.device) -> None:
    data = torch.frombuffer(bytearray(envelope.model_dump_json().encode()), dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    dist.broadcast(data.to(device), src=0)


def receive_command(device: torch.device) -> RankEnvelope:
    length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return RankEnvelope.model_validate_json(bytes(data.cpu().numpy()))


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (whether to stop a job: every rank must stop at the same step)."""
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def gather_errors(error: str | None, device: torch.device) -> list[str | None]:
    """Every rank's error (None: it is fine), so that rank 0 can report why the group cannot train."""
    data = torch.zeros(MAX_ERROR_BYTES, dtype=torch.uint8, device=device)
    if error is not None:
        raw = ("!" + error).encode()[:MAX_ERROR_BYTES]
        data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    parts = [torch.zeros_like(data) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, data)
    out = []
    for part in parts:
        raw = bytes(part.cpu().numpy()).rstrip(b"\0")
        out.append(raw[1:].decode(errors="replace") if raw else None)
    return out


def gather_bindings(pid: int, bound, device: torch.device) -> list[dict]:
    """Every rank's process and what binding its shard cost (``views.Binding``), for the status."""
    fields = ("param_bytes", "shared_param_bytes", "binding_private_bytes")
    mine = torch.tensor([pid, *(int(getattr(bound, f) or 0) for f in fields)], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [{"rank": r, "pid": int(p[0]), **{f: int(v) for f, v in zip(fields, p[1:].tolist())}} for r, p in enumerate(parts)]


class RankGroup:
    """Rank 0's side of the group: starts the other ranks, sends them commands, watches them."""

    def __init__(self, session: Path, state_dir: Path, trainer_id: str, size: int, threads: int, device: torch.device):
        self.session, self.size, self.device = session, size, device
        self.store = store_path(session, trainer_id)
        self.store.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self.closing = False
        self.broken = False  # the ranks may be out of step: restart them
        self.dead: str | None = None  # a rank died: which, and how
        self.ranks: list[dict] = []  # each rank's pid and binding (``gather_bindings``)
        self.followers: list[subprocess.Popen] = []
        for rank in range(1, size):
            cmd = [sys.executable, "-m", "hogwild.worker.follower", "--session", str(session), "--state-dir", str(state_dir),
                   "--store", str(self.store), "--rank", str(rank), "--size", str(size), "--threads", str(threads),
                   "--parent-pid", str(os.getpid())]
            self.followers.append(subprocess.Popen(cmd))
        for rank, proc in enumerate(self.followers, start=1):
            threading.Thread(target=self._watch, args=(rank, proc), name=f"hogwild-rank{rank}-watch", daemon=True).start()
        join_group(self.store, 0, size, device)
        logger.info("trainer ranks: %d processes in one %s group", size, backend_for(device))

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if self.closing:
            return
        self.dead = f"tensor-parallel trainer rank {rank} {how_it_ended(code)}"
        self.broken = True
        logger.error("%s: the group cannot compute without it; restarting the trainer", self.dead)
        # Work in progress fails on its own (its collectives break) and is reported first.
        if self._lock.acquire(timeout=60):
            time.sleep(2.0)
        os._exit(RANK_DIED_EXIT)

    def death(self, timeout: float = 3.0) -> str | None:
        """Why the group broke, if a rank died (waiting a moment for its exit to be seen)."""
        deadline = time.monotonic() + timeout
        while self.dead is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.dead

    @contextmanager
    def command(self, envelope: RankEnvelope) -> Iterator[None]:
        """Send ``envelope`` to every rank and hold the group for the collectives that follow it."""
        with self._lock:
            send_command(envelope, self.device)
            yield

    def close(self, stop: RankEnvelope | None = None) -> None:
        """Let the other ranks go (``stop``: the command that tells them to)."""
        self.closing = True
        if stop is not None:
            send_command(stop, self.device)
        for proc in self.followers:
            if proc.poll() is None:
                proc.terminate()
        self.store.unlink(missing_ok=True)

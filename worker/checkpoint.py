"""Checkpoints: the model directory is the checkpoint, synced block by block.

``sync`` compares each served tensor, under its Hugging Face name and shape,
with its bytes in the directory's safetensors files, 4 KiB block by block, and
writes only the blocks that changed. The safetensors headers never change
(same names, dtypes, shapes), so the directory keeps loading with transformers
and with ``vllm serve``.

Crash safety, per file, whichever writes less:
- *journal* (small changes): the changed blocks go first to
  ``.hogwild/journal/<file>.journal``, fsynced and sealed with a checksum; then
  they are written into the file in place and the file is fsynced; then the
  journal is removed. A crash before the seal leaves the file untouched (the
  torn journal is discarded); after it, ``recover`` replays the journal
  (idempotent), so the file ends fully updated.
- *write-aside* (most of the file changed): a copy of the file takes the
  changes, is fsynced and renamed over the file; a crash leaves the old file
  and a stray copy that ``recover`` removes.

``recover`` runs before vLLM loads the directory (in the worker-side plugin)
and before every sync.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hogwild import envs

BLOCK = 4096
STATE_DIRNAME = ".hogwild"  # inside the checkpoint: journal, optimizer state, ledger
ASIDE_SUFFIX = ".hogwild-aside"
SEAL = b"HOGWILD-JOURNAL-SEALED"
CHUNK_BYTES = 64 << 20  # diff at most this much of a tensor at a time

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(RuntimeError):
    """The directory cannot take a checkpoint of the served model; says why."""


# ---- fault injection (tests kill the sync at chosen points) ----------------

durable_steps = 0  # writes, fsyncs and renames so far in this process


def _fault_point() -> None:
    """With HOGWILD_CHECKPOINT_FAULT_AFTER=N, the Nth durable step kills this
    process (kill -9), so tests can stop a sync anywhere."""
    global durable_steps
    durable_steps += 1
    limit = envs.checkpoint_fault_after()
    if limit and durable_steps >= limit:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- safetensors layout ------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_layout(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of every ``*.safetensors`` file in ``directory``, by name."""
    layout: dict[str, StoredTensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        start = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            layout[name] = StoredTensor(path, _DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, start + end)
    return layout


# ---- the diff ------------------------------------------------------------------


@dataclass
class SyncReport:
    target: str
    files_touched: list[str] = field(default_factory=list)
    files_compared: int = 0
    blocks_compared: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    method: dict[str, str] = field(default_factory=dict)  # file -> "journal" | "write-aside"

    def as_dict(self) -> dict:
        return dict(vars(self))


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def _new_bytes(live: torch.Tensor, old: np.ndarray, stored: StoredTensor) -> np.ndarray:
    """The bytes the file should hold for (a flat chunk of) a tensor.

    When the file keeps a different dtype than the server computes in (a float32
    checkpoint served in bfloat16), elements the server has not changed keep the
    file's exact value; changed ones are written in the file's dtype.
    """
    if live.dtype == stored.dtype:
        return _as_bytes(live)
    on_disk = torch.from_numpy(old.copy()).view(stored.dtype)
    same = on_disk.to(live.dtype) == live.cpu()
    return _as_bytes(torch.where(same, on_disk, live.cpu().to(stored.dtype)))


def diff_tensor(mapped: np.ndarray, stored: StoredTensor, live: torch.Tensor) -> tuple[list[tuple[int, bytes]], int, int]:
    """The changed 4 KiB blocks of one tensor, as runs of adjacent blocks
    (absolute offset, new bytes); and how many blocks were compared and changed."""
    if tuple(live.shape) != stored.shape:
        raise CheckpointError(f"{stored.file.name}: shape {stored.shape} on disk, {tuple(live.shape)} served")
    flat = live.detach().reshape(-1)
    per_element = stored.dtype.itemsize
    step = max(BLOCK, CHUNK_BYTES // BLOCK * BLOCK) // per_element
    changes: list[tuple[int, bytes]] = []
    compared = changed_blocks = 0
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        lo = stored.begin + start * per_element
        hi = lo + piece.numel() * per_element
        old = mapped[lo:hi]
        new = _new_bytes(piece, old, stored)
        # Windows aligned to absolute 4 KiB blocks of the file, clipped to the tensor.
        head = lo % BLOCK
        differs = np.zeros(head + (hi - lo) + (-hi % BLOCK), dtype=bool)
        differs[head : head + hi - lo] = old != new
        changed = np.flatnonzero(differs.reshape(-1, BLOCK).any(axis=1))
        compared += differs.size // BLOCK
        changed_blocks += changed.size
        first = lo - head
        # Runs of consecutive changed blocks: one write each.
        for run in np.split(changed, np.flatnonzero(np.diff(changed) != 1) + 1) if changed.size else []:
            a = max(lo, first + int(run[0]) * BLOCK)
            b = min(hi, first + (int(run[-1]) + 1) * BLOCK)
            changes.append((a, new[a - lo : b - lo].tobytes()))
    return changes, compared, changed_blocks


# ---- writing ----------------------------------------------------------------------


def _journal_path(path: Path) -> Path:
    return path.parent / STATE_DIRNAME / "journal" / f"{path.name}.journal"


def _write_journal(path: Path, changes: list[tuple[int, bytes]]) -> int:
    journal = _journal_path(path)
    journal.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256()
    written = 0
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        head = json.dumps({"file": path.name, "records": len(changes)}).encode() + b"\n"
        for chunk in (head, *(struct.pack("<QQ", off, len(data)) + data for off, data in changes)):
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
        _fault_point()
        f.write(SEAL + digest.digest())
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(journal.parent)
    _fault_point()
    return written + len(SEAL) + 32


def _read_journal(journal: Path) -> list[tuple[int, bytes]] | None:
    """The journal's records, or None if it was never sealed (torn)."""
    raw = journal.read_bytes()
    body, seal = raw[: -len(SEAL) - 32], raw[-len(SEAL) - 32 :]
    if len(raw) < len(SEAL) + 32 or seal[: len(SEAL)] != SEAL or hashlib.sha256(body).digest() != seal[len(SEAL) :]:
        return None
    newline = body.index(b"\n")
    records, pos = [], newline + 1
    while pos < len(body):
        offset, length = struct.unpack_from("<QQ", body, pos)
        pos += 16
        records.append((offset, body[pos : pos + length]))
        pos += length
    return records


def _apply_in_place(path: Path, changes: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in changes:
            os.pwrite(fd, data, offset)
            _fault_point()
        os.fsync(fd)
    finally:
        os.close(fd)
    _fault_point()


def _write_aside(path: Path, changes: list[tuple[int, bytes]]) -> int:
    """A new copy of the file (unchanged spans straight from the old file's
    pages, then the changed runs), fsynced, then renamed over it."""
    aside = path.with_name(path.name + ASIDE_SUFFIX)
    old = np.memmap(path, dtype=np.uint8, mode="r")
    with open(os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as dst:
        position = 0
        for offset, data in sorted(changes):
            dst.write(old[position:offset])
            dst.write(data)
            position = offset + len(data)
        dst.write(old[position:])
        dst.flush()
        os.fsync(dst.fileno())
    del old
    shutil.copymode(path, aside)
    _fault_point()
    os.replace(aside, path)
    _fsync_dir(path.parent)
    _fault_point()
    return path.stat().st_size


def recover(directory: Path) -> list[str]:
    """Finish or undo whatever an interrupted sync left in ``directory``."""
    actions = []
    for aside in directory.glob(f"*{ASIDE_SUFFIX}"):
        aside.unlink()
        actions.append(f"removed the unfinished copy {aside.name} ({aside.name.removesuffix(ASIDE_SUFFIX)} is as it was)")
    journal_dir = directory / STATE_DIRNAME / "journal"
    for journal in sorted(journal_dir.glob("*.journal")) if journal_dir.is_dir() else []:
        target = directory / journal.name.removesuffix(".journal")
        records = _read_journal(journal)
        if records is None:
            actions.append(f"discarded a torn journal for {target.name} (the file is as it was)")
        else:
            _apply_in_place(target, records)
            actions.append(f"replayed the journal of {target.name} ({len(records)} blocks): the file is fully updated")
        journal.unlink()
        _fsync_dir(journal_dir)
    return actions


def sync(tensors: dict[str, torch.Tensor], directory: Path) -> SyncReport:
    """Write the changed blocks of ``tensors`` (HF names) into ``directory``."""
    started = time.perf_counter()
    report = SyncReport(target=str(directory))
    recover(directory)
    layout = read_layout(directory)
    missing = [name for name in tensors if name not in layout]
    if missing:
        raise CheckpointError(f"{directory} has no tensor {missing[0]} (and {len(missing) - 1} more): "
                              "it is not a checkpoint of the served model")
    by_file: dict[Path, list[str]] = {}
    for name in tensors:
        by_file.setdefault(layout[name].file, []).append(name)
    for path, names in sorted(by_file.items()):
        if path.is_symlink():
            raise CheckpointError(f"{path.name} is a symlink (a Hugging Face cache?): checkpoint to a target directory instead")
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        changes: list[tuple[int, bytes]] = []
        changed_blocks = 0
        for name in names:
            found, compared, changed = diff_tensor(mapped, layout[name], tensors[name])
            changes += found
            report.blocks_compared += compared
            changed_blocks += changed
        del mapped
        report.files_compared += 1
        if not changes:
            continue
        changed_bytes = sum(len(d) for _, d in changes)
        if 2 * changed_bytes < path.stat().st_size:
            report.bytes_written += _write_journal(path, changes)
            _apply_in_place(path, changes)
            _journal_path(path).unlink()
            report.bytes_written += changed_bytes
            report.method[path.name] = "journal"
        else:
            report.bytes_written += _write_aside(path, changes)
            report.method[path.name] = "write-aside"
        report.files_touched.append(path.name)
        report.blocks_written += changed_blocks
    report.seconds = time.perf_counter() - started
    return report


def copy_model_dir(source: Path, target: Path) -> None:
    """Make ``target`` a copy of the served model directory (each file atomically)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if (target / entry.name).exists():
            continue
        tmp = target / (entry.name + ASIDE_SUFFIX)
        shutil.copyfile(entry, tmp)  # follows symlinks: the copy holds the bytes
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target / entry.name)
    _fsync_dir(target)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (owner-only), all or nothing, durably."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.parent / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_state_file(directory: Path, name: str, data: bytes) -> None:
    """Atomically write ``<directory>/.hogwild/<name>``."""
    write_atomic(directory / STATE_DIRNAME / name, data)

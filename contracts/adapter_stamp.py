"""Which state of a served adapter's live file the trainer last finished writing, shared by
the trainer, which writes it after every change (a new adapter, each optimizer step, a
restore from the durable copy), and vLLM's model worker, which loads the adapter again
between two forward passes when the stamp differs from the one it loaded
(``plugin/model_runner/adapter_refresh.py``).

The worker reports what it serves in ``<live adapter directory>/served`` (``write_served``):
the stamp it loaded and how long the load took, for ``/train/status`` readers, tests and
``bench adapters``.

Scope: ``<live adapter directory>/stamp``: two 8-byte little-endian unsigned integers, the
adapter's version and the time of the write in nanoseconds. The time makes a stamp unique
even where a version number comes back (a trainer restarted from the durable copy, behind
steps a dead trainer had taken). The file is written in place, never replaced, so a reader
that opens it by path always reads the current one. Failure modes: a reader may see the two
words from two writes (each is one aligned 8-byte store); that pair differs from what it
loaded, so it loads once more, which is harmless. No file (an adapter vLLM loaded from
elsewhere) reads as None: not one of the trainer's.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

FILE_NAME, SERVED_FILE_NAME = "stamp", "served"
_FORMAT, _SERVED_FORMAT = "<QQ", "<QQQ"


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def _read(path: Path, layout: str) -> tuple[int, ...] | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, struct.calcsize(layout), 0)
    finally:
        os.close(fd)
    return struct.unpack(layout, data) if len(data) == struct.calcsize(layout) else None


def write_stamp(directory: Path, version: int) -> tuple[int, int]:
    """Stamp ``directory``'s adapter as at ``version`` now; returns the stamp."""
    stamp = (version, time.time_ns())
    _write(Path(directory) / FILE_NAME, struct.pack(_FORMAT, *stamp))
    return stamp


def read_stamp(directory: str | Path) -> tuple[int, int] | None:
    """The stamp of the adapter in ``directory``, or None where there is none (or it is short)."""
    return _read(Path(directory) / FILE_NAME, _FORMAT)


def write_served(directory: str | Path, stamp: tuple[int, int], load_seconds: float) -> None:
    """The worker serves the adapter as ``stamp`` had it; loading it took ``load_seconds``."""
    _write(Path(directory) / SERVED_FILE_NAME, struct.pack(_SERVED_FORMAT, *stamp, round(load_seconds * 1e9)))


def read_served(directory: str | Path) -> tuple[tuple[int, int], float] | None:
    """(the stamp the worker serves, the seconds its load took), or None before it served any."""
    row = _read(Path(directory) / SERVED_FILE_NAME, _SERVED_FORMAT)
    return None if row is None else ((row[0], row[1]), row[2] / 1e9)

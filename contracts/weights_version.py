"""The served weights' version: one more for every change the trainer makes to them (an
optimizer step, a merged or reverted adapter), shared by the trainer, which writes it, and
every API server process, which reads it for each completion they answer
(``X-Hogwild-Weights-Version``) so an RL client can say which weights sampled what.

Scope: one 8-byte little-endian unsigned integer in ``<state dir>/weights_version``,
memory-mapped; a write is one aligned 8-byte store, so a reader sees the old value or the new,
never a mix. The state directory outlives the server, so the version never goes back: a
trainer that starts continues from the last value plus one (the weights it finds may differ
from what that value described: a trainer that died mid-step, or a server that reloaded them
from disk). Failure modes: no file yet (no trainer has started for this state directory)
reads as None; a short or unreadable file reads as None and is rewritten by the next trainer.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

FILE_NAME = "weights_version"
HEADER = "X-Hogwild-Weights-Version"
_FORMAT = "<Q"
_SIZE = struct.calcsize(_FORMAT)


def version_path(state_dir: Path) -> Path:
    return Path(state_dir) / FILE_NAME


class WeightsVersionReader:
    """Reads the version (API server side); opens the file on first success, cheap after that."""

    def __init__(self, state_dir: Path):
        self.path = version_path(state_dir)
        self._map: mmap.mmap | None = None

    def read(self) -> int | None:
        if self._map is None:
            try:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), _SIZE, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # absent, or shorter than 8 bytes
                return None
        return struct.unpack_from(_FORMAT, self._map)[0]


class WeightsVersionWriter:
    """Owns the version (the trainer, rank 0): ``start()`` continues from the last value."""

    def __init__(self, state_dir: Path):
        self.path = version_path(state_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            existed = os.fstat(fd).st_size >= _SIZE
            if not existed:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self.value = struct.unpack_from(_FORMAT, self._map)[0] + 1 if existed else 0
        self.write(self.value)

    def write(self, value: int) -> None:
        self.value = value
        struct.pack_into(_FORMAT, self._map, 0, value)

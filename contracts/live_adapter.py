"""A served adapter's live directory (in the session directory, ``/dev/shm``), as the trainer
and vLLM's model worker share it: the PEFT factors file, read and written as views of its
shared pages (``map_factors``); the *stamp*, which says which state of that file the trainer
last finished writing; and the worker's report of what it serves.

The trainer writes every optimizer step into the factors file through the views and then
stamps it (a new adapter, each step, a restore from the durable copy); vLLM's worker, before a
forward pass that uses the adapter, copies the file's factors into what it loaded when the
stamp differs from the one it took (``plugin/model_runner/adapter_refresh.py``), and reports in
``served`` the stamp it took, how long the update took and whether it was copied in place.

Scope of the stamp: ``<live adapter directory>/stamp``: two 8-byte little-endian unsigned
integers, the adapter's version and the time of the write in nanoseconds. The time makes a
stamp unique even where a version number comes back (a trainer restarted from the durable
copy, behind steps a dead trainer had taken). The file is written in place, never replaced,
so a reader that opens it by path always reads the current one. Failure modes: a reader may
see the two words from two writes (each is one aligned 8-byte store); that pair differs from
what it took, so it updates once more, which is harmless. No file (an adapter vLLM loaded from
elsewhere) reads as None: not one of the trainer's. A reader of the factors may see a step
half written (HOGWILD, as for the served weights); the stamp that follows the step makes it
read them again.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import torch

CONFIG, FACTORS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
FILE_NAME, SERVED_FILE_NAME = "stamp", "served"
_FORMAT, _SERVED_FORMAT = "<QQ", "<QQQQ"


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


def write_served(directory: str | Path, stamp: tuple[int, int], seconds: float, in_place: bool) -> None:
    """The worker serves the adapter as ``stamp`` had it; the update took ``seconds``, copied
    into what it had loaded (``in_place``) or loaded anew by vLLM."""
    _write(Path(directory) / SERVED_FILE_NAME, struct.pack(_SERVED_FORMAT, *stamp, round(seconds * 1e9), int(in_place)))


def read_served(directory: str | Path) -> tuple[tuple[int, int], float, bool] | None:
    """(the stamp the worker serves, the seconds its update took, whether it was copied in
    place), or None before it served any."""
    row = _read(Path(directory) / SERVED_FILE_NAME, _SERVED_FORMAT)
    return None if row is None else ((row[0], row[1]), row[2] / 1e9, bool(row[3]))


def map_factors(path: Path) -> dict[str, torch.Tensor]:
    """Each tensor of a safetensors file of fp32 tensors as a view of the file's shared pages:
    writing to one writes the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    pages = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    base = 8 + header_len  # safetensors pads the header so that the data starts 8-byte aligned
    views = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            raise ValueError(f"{path}: {key} is {entry['dtype']}; adapters are kept in F32")
        start, end = entry["data_offsets"]
        views[key] = pages[base + start : base + end].view(torch.float32).view(entry["shape"])
    return views

"""The vector set the server reads out with, as files in the session directory.

``VLLM_READOUT_VECTORS`` is the set a server starts with. ``POST /readout/load``
(and a finished ``/readout/train``) checks a new set, copies it under
``<session>/readout/`` (so a later edit of the user's file cannot change what
was checked) and then names it in ``current.json``, replaced atomically. The
worker looks at ``current.json`` before each step and adopts a newer set
whole; a request keeps the set it started with, so no request mixes two sets
and none sees a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hogwild import envs
from hogwild.readout.vectors import VectorSet, default_manifest_path, load_vector_set

STARTUP_VERSION = "startup"


@dataclass(frozen=True)
class SetFiles:
    version: str
    vectors: Path
    manifest: Path


def store_dir(session: Path) -> Path:
    return Path(session) / "readout"


def startup_files() -> SetFiles | None:
    """The set named by ``VLLM_READOUT_VECTORS`` (and ``VLLM_READOUT_MANIFEST``), if any."""
    vectors = envs.readout_vectors()
    if vectors is None:
        return None
    return SetFiles(STARTUP_VERSION, vectors, envs.readout_manifest() or default_manifest_path(vectors))


def current_files(session: Path) -> SetFiles | None:
    """The set loaded last while serving, else the start-up set, else None (readout off)."""
    try:
        named = json.loads(Path(current_file(session)).read_text())
        return SetFiles(named["version"], Path(named["vectors"]), Path(named["manifest"]))
    except FileNotFoundError:
        return startup_files()


def current_file(session: Path) -> str:
    """The file that names the current set; pass it to ``current_stamp``."""
    return str(store_dir(session) / "current.json")


def current_stamp(current: str) -> tuple[int, int]:
    """Changes whenever ``current.json`` is replaced ((0, 0) while there is none): one
    ``stat``, polled before every model step."""
    try:
        st = os.stat(current)
    except FileNotFoundError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)


def load_files(files: SetFiles, hidden_size: int, num_layers: int) -> VectorSet:
    return load_vector_set(files.vectors, files.manifest, hidden_size=hidden_size, num_layers=num_layers)


def install(session: Path, vectors: Path, manifest: Path | None, hidden_size: int, num_layers: int) -> tuple[SetFiles, VectorSet]:
    """Check a set against the served model, copy it into the session and make it current.

    Raises ``ReadoutFileError`` (nothing changed) when the files do not fit.
    """
    manifest = manifest or default_manifest_path(vectors)
    load_vector_set(vectors, manifest, hidden_size=hidden_size, num_layers=num_layers)
    root = store_dir(session)
    root.mkdir(mode=0o700, exist_ok=True)
    version = f"{time.time_ns():x}-{os.getpid()}"
    copied = SetFiles(version, root / f"{version}.safetensors", root / f"{version}.json")
    shutil.copyfile(vectors, copied.vectors)
    shutil.copyfile(manifest, copied.manifest)
    # Check the copies: what the worker will read is what was checked.
    checked = load_files(copied, hidden_size, num_layers)
    tmp = root / f".current-{version}.json"
    tmp.write_text(json.dumps({"version": version, "vectors": str(copied.vectors), "manifest": str(copied.manifest)}))
    os.replace(tmp, current_file(session))
    return copied, checked

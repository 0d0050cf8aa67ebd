"""The weight manifest: what vLLM's worker publishes and the trainer maps.

Written once by the worker-side plugin after the model is loaded (before
warm-up), as JSON next to the shared-memory arena. It names every parameter of
vLLM's model and where its bytes are (an offset into the arena file on CPU, a
CUDA IPC handle on GPU), and where each Hugging Face tensor lies in them, as a
strided view (vLLM fuses q/k/v and gate/up, stacks experts, pads vocabulary
rows): once for the transformers model's parameters (what the trainer binds) and
once for the checkpoint's tensors (what a checkpoint sync writes). Tensors that
are not views of what vLLM computes with are named, with the reason.

Under tensor parallelism each rank publishes its own shard: ``manifest.rank<r>.json``
beside ``weights.rank<r>.bin``, whose views hold the part of each HF tensor that rank
computes with (``HFView.shard``); ``manifest.json`` then only says why training is off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

MANIFEST_VERSION = 5
MANIFEST_NAME = "manifest.json"
ARENA_NAME = "weights.bin"  # the CPU weight arena, beside the manifest


def rank_manifest_name(rank: int) -> str:
    """One tensor-parallel rank's manifest."""
    return f"manifest.rank{rank}.json"


def rank_arena_name(rank: int) -> str:
    """One tensor-parallel rank's CPU weight arena."""
    return f"weights.rank{rank}.bin"


class HFView(BaseModel):
    """A Hugging Face tensor that is ``t.as_strided(shape, stride, t.storage_offset() + offset)``
    of the vLLM tensor ``t`` named ``tensor``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    tensor: str
    offset: int  # elements from the vLLM tensor's first element
    shape: list[int]
    stride: list[int]
    # Tensor parallel: the view is only this part of the HF tensor, [dim, start, length] for
    # each split dim (column-parallel: dim 0, row-parallel: dim 1); [dim, start, length, k]:
    # that part of each of k equal blocks along dim, stacked (a fused gate/up). Empty: whole.
    shard: list[list[int]] = []


class CudaIpcHandle(BaseModel):
    """The fields of ``torch.multiprocessing.reductions.reduce_tensor`` for a CUDA
    tensor, made JSON-safe (bytes as hex)."""

    model_config = ConfigDict(extra="forbid")
    device: int
    handle: str
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: str
    ref_counter_offset: int
    event_handle: str | None
    event_sync_required: bool
    tensor_offset: int
    stride: list[int]


class TensorEntry(BaseModel):
    """One parameter of vLLM's model."""

    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    offset: int | None = None  # byte offset into the arena (CPU)
    cuda_ipc: CudaIpcHandle | None = None


class Manifest(BaseModel):
    """Everything the trainer needs to map the served weights."""

    model_config = ConfigDict(extra="forbid")
    version: int = MANIFEST_VERSION
    model: str  # the served model's path or id, as vLLM resolved it
    architectures: list[str]
    dtype: str
    backend: Literal["cpu_shm", "cuda_ipc", "none"]
    arena: str | None = None
    arena_bytes: int = 0
    tensors: list[TensorEntry] = []
    model_class: str | None = None  # the transformers class ``views`` are parameters of
    views: list[HFView] = []  # its parameters (tied ones once)
    checkpoint_views: list[HFView] = []  # the checkpoint's tensors, by their names in the safetensors files
    not_views: dict[str, str] = {}  # transformers parameter -> why it is not a view of what vLLM computes with
    worker_pid: int
    vllm_version: str
    tensor_parallel_rank: int = 0
    tensor_parallel_size: int = 1
    # Set when training cannot work with this server (e.g. tensor parallel);
    # inference is unaffected and the training routes report this reason.
    unsupported: str | None = None
    # The served base is quantized (vLLM's name of the method, e.g. "compressed-tensors"):
    # nothing is published (vLLM repacks such weights), the trainer reads the frozen base from
    # the checkpoint and trains adapters only.
    quantization: str | None = None

    @property
    def model_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def write_manifest(manifest: Manifest, directory: Path, name: str = MANIFEST_NAME) -> Path:
    """Atomically write the manifest (owner-only) into ``directory``."""
    path = directory / name
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(manifest.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: Path, name: str = MANIFEST_NAME) -> Manifest:
    """Read and version-check a manifest; raises FileNotFoundError/ValueError."""
    raw = json.loads((directory / name).read_text())
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"weight manifest version {raw.get('version')} is not {MANIFEST_VERSION}: plugin and trainer differ")
    return Manifest.model_validate(raw)

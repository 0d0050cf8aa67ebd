"""Inside vLLM's worker: publish the loaded weights for the trainer to map.

Runs once, right after the model is loaded and its weights post-processed, and
before warm-up or compilation. On CPU every parameter's bytes move into one
owner-only file in /dev/shm (an "arena") and the parameter is re-pointed at it,
so another process can map the same pages. On GPU nothing moves: each
parameter is described by its CUDA IPC handle. Either way the manifest also
records where each Hugging Face tensor lies in them (``weight_mapping``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from hogwild.contracts.manifest import (
    ARENA_NAME,
    MANIFEST_NAME,
    CudaIpcHandle,
    HFView,
    Manifest,
    TensorEntry,
    rank_arena_name,
    rank_manifest_name,
    write_manifest,
)
from hogwild.training.hf_model import UnsupportedModel

from ..trainability import quantization, unsupported_reason
from . import vllm_internals

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it

ALIGN = 4096  # page-aligned tensors: checkpoints diff blocks of this size


class NotEnoughSharedMemory(RuntimeError):
    pass


def hf_views(model: torch.nn.Module, model_dir: Path, dtype: torch.dtype, shards: bool = False) -> dict:
    """Where the trainer's transformers parameters and the checkpoint's tensors lie in
    vLLM's parameters (``weight_mapping``), as manifest fields; with ``shards`` (a
    tensor-parallel rank) a view may hold a part of its tensor."""
    from hogwild.training.hf_model import skeleton

    from .weight_mapping import checkpoint_names, derive_mapping

    # vLLM's Transformers backend decorates transformers' own class: build it under vLLM's config.
    with vllm_internals.under_current_vllm_config():
        hf = skeleton(model_dir, dtype)
    params = [(n, tuple(p.shape)) for n, p in hf.named_parameters()]
    mapping = derive_mapping(model, params, hf_model=hf, shards=shards)
    not_views = dict(mapping.not_views)
    not_views.update({n: "vLLM's loader never copied it anywhere" for n in mapping.ignored})
    checkpoint = derive_mapping(model, list(checkpoint_names(hf, params, dtype).items()), shards=shards)

    def entries(views) -> list[HFView]:
        return [HFView(name=n, tensor=v.tensor, offset=v.offset, shape=list(v.shape), stride=list(v.stride),
                       shard=[list(s) for s in v.shard]) for n, v in views.items()]

    return dict(model_class=type(hf).__name__, views=entries(mapping.views), checkpoint_views=entries(checkpoint.views),
                not_views=not_views)


def _layout(params: list[tuple[str, torch.nn.Parameter]]) -> tuple[list[int], int]:
    offsets, cursor = [], 0
    for _, p in params:
        offsets.append(cursor)
        nbytes = p.numel() * p.element_size()
        cursor += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    return offsets, cursor


def export_cpu(model: torch.nn.Module, session: Path, arena_name: str = ARENA_NAME) -> tuple[list[TensorEntry], str, int]:
    """Move every parameter into a shared-memory arena; returns entries, path, size."""
    params = list(model.named_parameters())
    offsets, total = _layout(params)
    path = session / arena_name
    free = os.statvfs(session).f_bavail * os.statvfs(session).f_frsize
    if free < total:
        raise NotEnoughSharedMemory(
            f"the weights need {total / 2**20:.1f} MiB of shared memory in {session.parent}, "
            f"only {free / 2**20:.1f} MiB is free (in Docker, raise --shm-size)"
        )
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, total)
    finally:
        os.close(fd)
    arena = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    entries = []
    for (name, param), offset in zip(params, offsets):
        if not param.is_contiguous():
            raise RuntimeError(f"{name} is not contiguous")
        nbytes = param.numel() * param.element_size()
        shared = arena[offset : offset + nbytes].view(param.dtype).view(param.shape)
        shared.copy_(param.data)
        param.data = shared  # the old storage is freed here, one tensor at a time
        entries.append(
            TensorEntry(name=name, dtype=str(param.dtype).removeprefix("torch."), shape=list(param.shape),
                        nbytes=nbytes, offset=offset)
        )
    return entries, str(path), total


def export_cuda(model: torch.nn.Module) -> list[TensorEntry]:
    """Describe every parameter by its CUDA IPC handle (nothing is copied)."""
    from torch.multiprocessing.reductions import reduce_tensor

    entries = []
    for name, param in model.named_parameters():
        _, args = reduce_tensor(param.data)
        (_, size, stride, tensor_offset, _, dtype, device, handle, storage_size, storage_offset,
         _, rc_handle, rc_offset, event_handle, event_sync) = args
        entries.append(
            TensorEntry(
                name=name, dtype=str(dtype).removeprefix("torch."), shape=list(size),
                nbytes=param.numel() * param.element_size(),
                cuda_ipc=CudaIpcHandle(
                    device=int(device), handle=handle.hex(), storage_size_bytes=int(storage_size),
                    storage_offset_bytes=int(storage_offset), ref_counter_handle=rc_handle.hex(),
                    ref_counter_offset=int(rc_offset), event_handle=event_handle.hex() if event_handle else None,
                    event_sync_required=bool(event_sync), tensor_offset=int(tensor_offset), stride=list(stride),
                ),
            )
        )
    return entries


def publish(model: torch.nn.Module, vllm_config, session: Path) -> Manifest:
    """Export the weights (or the reason they cannot be) and write the manifest.

    Under tensor parallelism each rank exports its own shard under its rank's names,
    and rank 0's manifest is also ``manifest.json``, which the trainer reads first."""
    model_config = vllm_config.model_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    rank = vllm_internals.tensor_parallel_rank() if tp > 1 else 0
    version = vllm_internals.installed_version()
    base = dict(
        model=str(model_config.model),
        architectures=list(getattr(model_config.hf_config, "architectures", None) or []),
        dtype=str(model_config.dtype).removeprefix("torch."),
        worker_pid=os.getpid(),
        vllm_version=version,
        tensor_parallel_rank=rank,
        tensor_parallel_size=tp,
    )
    vllm_problem = vllm_internals.check_version(version)
    if vllm_problem is None and (note := vllm_internals.version_note(version)):
        logger.warning("hogwild: %s", note)
    reason = unsupported_reason(vllm_config) or vllm_problem
    manifest = Manifest(backend="none", unsupported=reason, quantization=quantization(vllm_config), **base)
    if reason is None and manifest.quantization is None:
        try:
            views = hf_views(model, Path(str(model_config.model)), model_config.dtype, shards=tp > 1)  # before the weights move
            if vllm_config.device_config.device.type == "cuda":
                manifest = Manifest(backend="cuda_ipc", tensors=export_cuda(model), **views, **base)
            else:
                entries, path, total = export_cpu(model, session, rank_arena_name(rank) if tp > 1 else ARENA_NAME)
                manifest = Manifest(backend="cpu_shm", arena=path, arena_bytes=total, tensors=entries, **views, **base)
        except UnsupportedModel as exc:
            manifest = Manifest(backend="none", unsupported=str(exc), **base)
        except Exception as exc:  # inference must keep working whatever happens here
            logger.exception("hogwild: could not publish the weights; training is disabled")
            manifest = Manifest(backend="none", unsupported=f"weights could not be published: {exc}", **base)
    if tp > 1:
        write_manifest(manifest, session, rank_manifest_name(rank))
        if rank == 0:  # what the trainer (rank 0) reads first; it starts the other ranks
            write_manifest(manifest, session, MANIFEST_NAME)
    else:
        write_manifest(manifest, session)
    logger.info("hogwild: published %d tensors (%s, tensor parallel rank %d of %d) in %s",
                len(manifest.tensors), manifest.backend, rank, tp, session)
    return manifest

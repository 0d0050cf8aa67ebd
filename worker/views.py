"""Map the published weights and build a Hugging Face model whose parameters
are views of them: no second copy of the weights, and every in-place update the
optimizer makes is what vLLM computes with on its next step."""

from __future__ import annotations

from pathlib import Path

import torch

from .manifest import Manifest

# Architectures whose vLLM implementation has been checked, end to end, to map
# onto the transformers class parameter for parameter.
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")


class UnsupportedModel(RuntimeError):
    """The served model cannot be trained by this plugin; the message says why."""


def map_tensors(manifest: Manifest) -> dict[str, torch.Tensor]:
    """vLLM parameter name -> a tensor over the same memory vLLM computes with."""
    if manifest.backend == "cpu_shm":
        arena = torch.from_file(manifest.arena, shared=True, size=manifest.arena_bytes, dtype=torch.uint8)
        return {
            t.name: arena[t.offset : t.offset + t.nbytes].view(getattr(torch, t.dtype)).view(t.shape)
            for t in manifest.tensors
        }
    if manifest.backend == "cuda_ipc":
        return {t.name: _open_cuda_ipc(t) for t in manifest.tensors}
    raise UnsupportedModel(manifest.unsupported or f"no weights were published (backend {manifest.backend!r})")


def _open_cuda_ipc(entry) -> torch.Tensor:
    """The consumer half of torch's CUDA tensor sharing (``rebuild_cuda_tensor``)."""
    from torch._utils import _rebuild_tensor

    ipc = entry.cuda_ipc
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        ipc.device,
        bytes.fromhex(ipc.handle),
        ipc.storage_size_bytes,
        ipc.storage_offset_bytes,
        bytes.fromhex(ipc.ref_counter_handle),
        ipc.ref_counter_offset,
        bytes.fromhex(ipc.event_handle) if ipc.event_handle is not None else None,
        ipc.event_sync_required,
    )
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=getattr(torch, entry.dtype), _internal=True)
    return _rebuild_tensor(typed, ipc.tensor_offset, tuple(entry.shape), tuple(ipc.stride))


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf not in module._parameters:
        raise KeyError(name)
    expected = module._parameters[leaf].shape
    if tuple(expected) != tuple(value.shape):
        raise UnsupportedModel(f"{name}: the served tensor has shape {tuple(value.shape)}, transformers expects {tuple(expected)}")
    setattr(module, leaf, torch.nn.Parameter(value, requires_grad=True))


def model_skeleton(manifest: Manifest, model_dir: str | Path | None = None):
    """The transformers model for the served one, with parameters on the meta
    device (no memory) and real buffers (rotary tables).

    Raises ``UnsupportedModel`` when the architecture is not supported.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if manifest.unsupported:
        raise UnsupportedModel(manifest.unsupported)
    config = AutoConfig.from_pretrained(str(model_dir or manifest.model))
    archs = list(getattr(config, "architectures", None) or manifest.architectures)
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModel(
            f"architecture {', '.join(archs) or '(none)'} is not supported for training; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest.dtype), attn_implementation="sdpa")


def bind_views(model: torch.nn.Module, manifest: Manifest) -> torch.nn.Module:
    """Make every parameter of ``model`` a view of the served weights.

    Raises ``UnsupportedModel`` naming any parameter that cannot be matched.
    """
    tensors = map_tensors(manifest)
    model.hogwild_served_storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    for entry in manifest.tensors:
        for part in entry.hf:
            try:
                _set_parameter(model, part.name, tensors[entry.name][part.start : part.stop])
            except (KeyError, AttributeError):
                raise UnsupportedModel(
                    f"vLLM parameter {entry.name} maps to {part.name}, which {type(model).__name__} does not have"
                ) from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    unbound = [name for name, p in model.named_parameters() if p.is_meta]
    if unbound:
        raise UnsupportedModel(f"parameters with no served counterpart: {', '.join(unbound[:8])}")
    device = next(iter(tensors.values())).device
    model.to(device)  # buffers only: the parameters already live there
    model.eval()  # no dropout; gradients still flow
    return model


def shared_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters that live in the memory mapped from the
    manifest (not in a copy): checked by storage, parameter by parameter."""
    served = getattr(model, "hogwild_served_storages", set())
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.untyped_storage().data_ptr() in served)


def build_view_model(manifest: Manifest, model_dir: str | Path | None = None):
    """A transformers causal LM whose parameters are views of the served weights."""
    return bind_views(model_skeleton(manifest, model_dir), manifest)

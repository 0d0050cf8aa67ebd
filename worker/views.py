"""Map the published weights and build a Hugging Face model whose parameters
are views of them: no second copy of the weights, and every in-place update the
optimizer makes is what vLLM computes with on its next step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hogwild.contracts.manifest import Manifest
from hogwild.training.hf_model import UnsupportedModel, skeleton


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


def held_shape(shape, shard) -> tuple[int, ...]:
    """The shape of the part of a tensor a tensor-parallel rank holds (``HFView.shard``)."""
    held = list(shape)
    for dim, _, length, *blocks in shard:
        held[dim] = length * (blocks[0] if blocks else 1)
    return tuple(held)


def _set_parameter(model: torch.nn.Module, names: list[str], value: torch.Tensor, requires_grad: bool = True,
                   shard=()) -> None:
    """Make ``value`` the parameter under each of ``names`` (several when tied); ``shard``:
    the part of the parameter it is (a tensor-parallel rank)."""
    parameter = None
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        expected = held_shape(module._parameters[leaf].shape, shard)
        if tuple(expected) != tuple(value.shape):
            raise UnsupportedModel(f"{name}: the served tensor has shape {tuple(value.shape)}, transformers expects {tuple(expected)}")
        if parameter is None:
            parameter = torch.nn.Parameter(value, requires_grad=requires_grad)
        setattr(module, leaf, parameter)


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same parameter (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {name: group for group in names.values() for name in group}


def model_skeleton(manifest: Manifest, model_dir: str | Path | None = None):
    """The transformers model for the served one, with parameters on the meta
    device (no memory) and real buffers; raises ``UnsupportedModel`` with the reason."""
    if manifest.unsupported:
        raise UnsupportedModel(manifest.unsupported)
    model = skeleton(model_dir or manifest.model, getattr(torch, manifest.dtype))
    if manifest.model_class and type(model).__name__ != manifest.model_class:
        raise UnsupportedModel(f"the served weights were mapped for {manifest.model_class}, transformers builds "
                               f"{type(model).__name__} here: plugin and trainer see different transformers")
    return model


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The model directory's safetensors files."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({(model_dir / f) for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(model_dir.glob("*.safetensors"))


def checkpoint_tensor(model_dir: Path, name: str) -> torch.Tensor | None:
    """``name`` read from the model directory's safetensors files, or None."""
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        with safe_open(str(path), "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return None


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model directory's safetensors files, read into memory."""
    from safetensors.torch import load_file

    return {name: tensor for path in checkpoint_files(model_dir) for name, tensor in load_file(path).items()}


def bind_packed_base(model: torch.nn.Module, manifest: Manifest) -> dict[str, str]:
    """Make ``model`` the frozen quantized base that vLLM serves (``manifest.quantization``),
    from the checkpoint: each quantized linear layer a ``PackedLinear`` holding the packed
    tensors, every other parameter a frozen copy. vLLM repacks quantized weights for its
    kernels, so none of them is a view of what it computes with; the base never changes, so
    the two stay equal. Returns the frozen names with why; raises ``UnsupportedModel``."""
    from hogwild.training.packed_linear import PackedLinear, packed_scheme

    directory = Path(manifest.model)
    try:
        scheme = packed_scheme(json.loads((directory / "config.json").read_text())["quantization_config"])
    except (OSError, KeyError, ValueError) as exc:
        raise UnsupportedModel(f"adapters on a {manifest.quantization} base: {exc}") from None
    dtype = getattr(torch, manifest.dtype)
    tensors = checkpoint_tensors(directory)
    for name, module in list(model.named_modules()):
        if f"{name}.weight_packed" not in tensors:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise UnsupportedModel(f"{name} is quantized in the checkpoint but is not a linear layer in transformers")
        packed = {key: tensors.pop(f"{name}.{key}") for key in ("weight_packed", "weight_scale", "weight_shape",
                                                                 "weight_zero_point", "weight_g_idx") if f"{name}.{key}" in tensors}
        bias = tensors.pop(f"{name}.bias", None)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf,
                PackedLinear(module.in_features, module.out_features, packed, scheme, dtype, bias))
    aliases = _aliases(model)
    frozen = {}
    for name, value in tensors.items():
        if name in aliases and model.get_parameter(name).is_meta:
            _set_parameter(model, aliases[name], value.to(dtype), requires_grad=False)
            frozen[name] = f"{manifest.quantization} base: frozen, read from the checkpoint"
    unbound = [name for name, p in model.named_parameters() if p.is_meta]
    if unbound:
        raise UnsupportedModel(f"parameters the quantized checkpoint does not hold: {', '.join(unbound[:8])}")
    model.eval()
    return frozen


def served_views(tensors: dict[str, torch.Tensor], views) -> dict[str, torch.Tensor]:
    """HF name -> its view of the mapped vLLM tensors."""
    out = {}
    for view in views:
        if view.tensor not in tensors:
            raise UnsupportedModel(f"{view.name} maps to vLLM tensor {view.tensor}, which was not published")
        base = tensors[view.tensor]
        out[view.name] = base.as_strided(view.shape, view.stride, base.storage_offset() + view.offset)
    return out


def bind_views(model: torch.nn.Module, manifest: Manifest, model_dir: str | Path | None = None) -> dict[str, str]:
    """Make every parameter of ``model`` a view of the served weights.

    A parameter that is not a view of what vLLM computes with (``manifest.not_views``)
    is loaded from the checkpoint as a private, frozen copy when the checkpoint holds
    it under that name: vLLM's copy never changes either, so the two stay equal.
    Returns those frozen names with the reason; raises ``UnsupportedModel`` naming
    any parameter that can be neither.
    """
    tensors = map_tensors(manifest)
    model.hogwild_served_tensors = tensors
    model.hogwild_served_storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    aliases = _aliases(model)
    shards = {view.name: view.shard for view in manifest.views}
    for name, value in served_views(tensors, manifest.views).items():
        if name not in aliases:
            raise UnsupportedModel(f"the served weights map {name}, which {type(model).__name__} does not have")
        _set_parameter(model, aliases[name], value, shard=shards[name])
    frozen = {}
    directory = Path(model_dir or manifest.model)
    for name, reason in manifest.not_views.items():
        value = checkpoint_tensor(directory, name) if directory.is_dir() and name in aliases else None
        if value is None:
            raise UnsupportedModel(f"{name} is not a view of the served weights ({reason}), and the checkpoint has no "
                                   "tensor of that name to keep it frozen")
        _set_parameter(model, aliases[name], value.to(getattr(torch, manifest.dtype)), requires_grad=False)
        frozen[name] = reason
    unbound = [name for name, p in model.named_parameters() if p.is_meta]
    if unbound:
        raise UnsupportedModel(f"parameters with no served counterpart: {', '.join(unbound[:8])}")
    device = next(iter(tensors.values())).device
    model.to(device)  # buffers and frozen copies: the views already live there
    model.eval()  # no dropout; gradients still flow
    return frozen


def shared_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters that live in the memory mapped from the
    manifest (not in a copy): checked by storage, parameter by parameter."""
    served = getattr(model, "hogwild_served_storages", set())
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.untyped_storage().data_ptr() in served)


@dataclass
class Binding:
    """What binding the served weights gave (for ``/train/status``)."""

    frozen: dict[str, str] = field(default_factory=dict)  # parameters kept frozen (not views), with why
    vision_tower: str | None = None  # a vision-language model's tower: what happens to it
    param_bytes: int = 0
    shared_param_bytes: int = 0
    binding_private_bytes: int | None = None  # private memory spent binding: ~0 with views, the model's size with a copy


def bind(manifest: Manifest, group=None) -> tuple[torch.nn.Module, Binding]:
    """The view model for the published weights, and what binding them cost. Under tensor
    parallelism (``group``: the trainer ranks') this rank's shard, run as one model with the others."""
    from hogwild.training.hf_model import is_vision_language

    from .process_memory import memory_snapshot, release_free_heap

    model = model_skeleton(manifest)
    if manifest.quantization:
        frozen = bind_packed_base(model, manifest)
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        return model, Binding(frozen, None, held, 0, None)
    if manifest.tensor_parallel_size > 1 and manifest.not_views:
        name, reason = next(iter(manifest.not_views.items()))
        raise UnsupportedModel(f"training with tensor parallel size {manifest.tensor_parallel_size} needs every weight to "
                               f"be a view of a rank's shard; {name} is not ({reason}): serve with tensor parallel size 1 to train")
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    release_free_heap()
    before = memory_snapshot()
    frozen = bind_views(model, manifest)
    if manifest.tensor_parallel_size > 1:
        from hogwild.training.tensor_parallel import parallelize

        try:
            parallelize(model, {v.name: v.shard for v in manifest.views}, full_shapes, manifest.tensor_parallel_rank,
                        manifest.tensor_parallel_size, group)
        except ValueError as exc:
            raise UnsupportedModel(f"training with tensor parallel: {exc}") from None
    release_free_heap()
    after = memory_snapshot()
    vision = "not trained: the trainer builds the language model only" if is_vision_language(manifest.model) else None
    return model, Binding(frozen, vision, sum(p.numel() * p.element_size() for p in model.parameters()),
                          shared_parameter_bytes(model), after.get("rss_anon", 0) - before.get("rss_anon", 0))


def build_view_model(manifest: Manifest, model_dir: str | Path | None = None):
    """A transformers causal LM whose parameters are views of the served weights."""
    model = model_skeleton(manifest, model_dir)
    bind_views(model, manifest, model_dir)
    return model

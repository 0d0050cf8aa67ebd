"""Where each Hugging Face tensor lives inside vLLM's loaded model, derived from vLLM itself.

vLLM knows how every checkpoint tensor is placed into its (often fused, padded,
stacked) parameters: each model's ``load_weights`` with its
``stacked_params_mapping``, expert mappings, ``WeightsMapper`` and every
``weight_loader``. vLLM 0.32 can dry-run that code on storage-less tensors for its
``sharded_rdt`` weight transfer (``distributed/weight_transfer/sharded_rdt_*``):
the model's parameters are swapped for their creation-time meta copies
(``initialize_layerwise_reload``), the real ``load_weights`` runs on fake tensors
whose view ops are recorded, and each ``copy_`` into a parameter records the source
chain and the destination region. Here that dry run is driven, and each tensor's
pieces are solved into one strided view of one vLLM parameter
(``param.as_strided(shape, stride, param.storage_offset() + offset)``), verified by
replaying every chain on meta tensors. No weight is read or copied.

Anything that is not a pure view (a loader that computes, a copy into a temporary,
pieces that need a concatenation, a parameter ``process_weights_after_loading``
replaced or rewrote: see ``watch_post_load``) is reported with the reason, never
mapped. With ``hf_model`` (a transformers model on the meta device) transformers'
own save-side conversion runs on the fakes first (e.g. its fused
``experts.gate_up_proj`` back to per-expert checkpoint tensors), so the result is
keyed by the transformers parameter names the trainer binds.

Runs in vLLM's model worker, right after load (the dry run briefly swaps
parameters to meta: never during a forward pass). The vLLM internals it relies on
are reached through ``vllm_internals``.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .view_solver import NotAView, Piece, solve_view
from .vllm_internals import dry_run_parts, install_recording_stamps, restore_after_dry_run

FakeRDTTensor, BakeSink, LAYERWISE_INFO, initialize_layerwise_reload = dry_run_parts()


@dataclass(frozen=True)
class View:
    """``param.as_strided(shape, stride, param.storage_offset() + offset)`` is the tensor."""

    tensor: str  # the vLLM parameter
    offset: int  # elements, from the parameter's first element
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    # Under tensor parallelism, the part of the HF tensor this rank holds, as (dim, start,
    # length) for each split dim: the view is ``hf.narrow(dim, start, length)...``; (dim,
    # start, length, k): that part of each of k equal blocks along dim, stacked. Empty: whole.
    shard: tuple[tuple[int, ...], ...] = ()


@dataclass
class Mapping:
    views: dict[str, View] = field(default_factory=dict)
    not_views: dict[str, str] = field(default_factory=dict)  # name -> why it is not one view
    ignored: list[str] = field(default_factory=list)  # names vLLM's loader never copied (e.g. a tied head)
    uncovered: dict[str, tuple[int, int]] = field(default_factory=dict)  # vLLM tensor -> (covered, total) elements


# ---- the fake tensor: vLLM's, with the function forms and a few more view ops recorded

# transformers' conversions (and some loaders) call torch.chunk(t), not t.chunk(): alias them.
_FUNCTION_FORMS = {
    torch.chunk: torch.Tensor.chunk, torch.transpose: torch.Tensor.transpose, torch.narrow: torch.Tensor.narrow,
    torch.squeeze: torch.Tensor.squeeze, torch.unsqueeze: torch.Tensor.unsqueeze, torch.flatten: torch.Tensor.flatten,
    torch.permute: torch.Tensor.permute, torch.reshape: torch.Tensor.reshape, torch.t: torch.Tensor.t,
    torch.unbind: torch.Tensor.unbind, torch.split: torch.Tensor.split, torch.select: torch.Tensor.select,
    torch.swapaxes: torch.Tensor.transpose, torch.movedim: torch.Tensor.movedim,
}
_MORE_VIEW_OPS = {torch.Tensor.split: "split", torch.Tensor.select: "select", torch.Tensor.movedim: "movedim",
                  torch.Tensor.unflatten: "unflatten", torch.Tensor.view_as: "view_as", torch.Tensor.expand: "expand",
                  torch.Tensor.swapaxes: "transpose", torch.Tensor.__getitem__: "__getitem__"}


class ViewFake(FakeRDTTensor):
    """vLLM's fake tensor; children stay ``ViewFake`` and ``dest[idx] = fake`` counts as a copy."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        func = _FUNCTION_FORMS.get(func, func)
        if func in _MORE_VIEW_OPS and args and isinstance(args[0], cls):
            return cls._intercept(args[0], func, _MORE_VIEW_OPS[func], tuple(args[1:]), kwargs)
        if func is torch.Tensor.__setitem__ and len(args) == 3 and isinstance(args[2], cls) and args[2]._sink:
            dest, index, src = args
            with torch._C.DisableTorchFunctionSubclass():
                region = dest[index]
            src._sink.accept_copy(region, src)
            return None
        return super().__torch_function__(func, types, args, kwargs)

    def _make_child(self, new_shape, new_dtype, *new_ops):
        return ViewFake(name=self._name, shape=new_shape, dtype=new_dtype, device=self.device,
                        ops=self._ops + new_ops, sink=self._sink)


@dataclass
class CheckedSink(BakeSink):
    """vLLM's sink, refusing copies into anything but the parameter being loaded
    (a loader may fill a temporary and transform it)."""

    misattributed: dict[str, str] = field(default_factory=dict)

    def accept_copy(self, dest, src):
        if self.current is not None:
            layer, name = self.current
            target = getattr(layer, name, None)
            if target is None or dest.untyped_storage()._cdata != target.untyped_storage()._cdata:
                self.misattributed[src._name] = f"the loader of {type(layer).__name__}.{name} copies into a temporary"
                self.copied_names.add(src._name)
                return dest
        return super().accept_copy(dest, src)


# ---- the dry run


@contextlib.contextmanager
def _dry_run(model: torch.nn.Module, sink: BakeSink):
    """The model's parameters as their creation-time meta copies, loaders stamped to
    record into ``sink``; everything put back afterwards. Yields (module id, name) ->
    the meta copy (its geometry is what the recorded regions refer to)."""
    with torch.device(next(model.parameters()).device):
        initialize_layerwise_reload(model)
        try:
            install_recording_stamps(model, sink)
            metas = {}
            for module in model.modules():
                info = LAYERWISE_INFO.get(module)
                if info is not None:
                    for name, t in {**info.restore_metadata[0], **info.restore_metadata[1]}.items():
                        metas[(id(module), name)] = t
            yield metas
        finally:
            restore_after_dry_run(model)


def _load_fakes(model: torch.nn.Module, pairs: list[tuple[str, ViewFake]], sink: CheckedSink) -> dict[str, str]:
    """Run ``load_weights`` on the fakes; if it raises, again name by name, to say
    which names are not views. Returns name -> error."""
    try:
        model.load_weights(iter(pairs))
        return {}
    except Exception as exc:  # noqa: BLE001 - isolated below
        first = f"{type(exc).__name__}: {exc}"
    sink.copies_by_layer.clear()
    sink.copied_names.clear()
    sink.misattributed.clear()
    sink.current = None
    errors = {}
    for name, fake in pairs:
        before = {layer: len(records) for layer, records in sink.copies_by_layer.items()}
        try:
            model.load_weights(iter([(name, fake)]))
        except Exception as exc:  # noqa: BLE001
            errors[fake._name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            for layer, records in sink.copies_by_layer.items():
                del records[before.get(layer, 0):]
            sink.current = None
    return errors or {"<all>": f"load_weights failed on all names together, not one by one: {first}"}


# ---- what process_weights_after_loading did


def _fingerprint(t: torch.Tensor):
    """Storage, geometry and a cheap digest of the values (their sum and 64 elements at
    fixed positions, so that a permutation in place, like a repack, shows too)."""
    if t.is_meta or t.numel() == 0:
        return (id(t), tuple(t.shape), None, None)
    flat = t.detach().reshape(-1)
    k = min(64, flat.numel())
    index = torch.arange(k, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
    digest = (float(torch.sum(flat, dtype=torch.float64)), tuple(flat[index].double().tolist())) if t.is_floating_point() else None
    return (t.untyped_storage().data_ptr(), tuple(t.shape), tuple(t.stride()), digest)


def watch_post_load(process_weights_after_loading):
    """Wrap vLLM's ``process_weights_after_loading``: the tensors it replaced or rewrote
    (storage, shape, stride or values) are recorded on the model as
    ``hogwild_post_load_changes`` (name -> what changed): the dry run's regions refer
    to the layout before it, so those can not be views."""

    def watched(model, model_config, target_device):
        before = {n: _fingerprint(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
        result = process_weights_after_loading(model, model_config, target_device)
        after = {n: _fingerprint(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
        changes = {}
        for name, fingerprint in before.items():
            if name not in after:
                changes[name] = "removed by process_weights_after_loading"
            elif after[name] != fingerprint:
                what = [w for w, a, b in zip(("storage", "shape", "stride", "values"), fingerprint, after[name]) if a != b]
                changes[name] = f"process_weights_after_loading changed its {', '.join(what)}"
        model.hogwild_post_load_changes = changes
        return result

    watched.hogwild_original = process_weights_after_loading
    return watched


# ---- the mapping


def _reverse_conversion(hf_model, fakes: dict[str, ViewFake]) -> tuple[dict, dict[str, str]]:
    """transformers' save-side conversion of ``hf_model``'s parameters, run on the fakes:
    checkpoint name -> fake (with the conversion's view ops recorded)."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        return revert_weight_conversion(hf_model, dict(fakes)), {}
    except NotImplementedError as exc:
        return {}, {n: f"transformers' checkpoint conversion is not a view: {exc}" for n in fakes}


def checkpoint_names(hf_model, names_and_shapes: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> dict[str, tuple]:
    """The checkpoint tensors (name -> shape) that ``hf_model``'s parameters are saved as."""
    fakes = {n: ViewFake(name=n, shape=torch.Size(s), dtype=dtype, device=torch.device("cpu"), sink=None)
             for n, s in names_and_shapes}
    converted, _ = _reverse_conversion(hf_model, fakes)
    return {name: tuple(fake.shape) for name, fake in converted.items()}


def derive_mapping(vllm_model: torch.nn.Module, names_and_shapes: Iterable[tuple[str, tuple[int, ...]]], *,
                   hf_model=None, shards: bool = False) -> Mapping:
    """For each (name, shape): its view of one vLLM parameter, or why it has none.

    Names are checkpoint tensor names, or ``hf_model``'s parameter names when it is given.
    With ``shards`` (a tensor-parallel rank) a view may hold one box of its tensor
    (``View.shard``); without, a tensor vLLM holds only part of is not a view."""
    dtype = next(vllm_model.parameters()).dtype
    device = next(vllm_model.parameters()).device
    result, sink = Mapping(), CheckedSink()
    shapes = {name: tuple(shape) for name, shape in names_and_shapes}
    fakes = {n: ViewFake(name=n, shape=torch.Size(s), dtype=dtype, device=device, sink=sink) for n, s in shapes.items()}
    if hf_model is not None:
        converted, errors = _reverse_conversion(hf_model, fakes)
        result.not_views.update(errors)
        pairs = list(converted.items())
    else:
        pairs = list(fakes.items())
    module_names = {}
    for name, module in vllm_model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), name)
    canonical = {id(t): n for n, t in [*vllm_model.named_parameters(), *vllm_model.named_buffers()]}
    with _dry_run(vllm_model, sink) as metas:
        errors = _load_fakes(vllm_model, pairs, sink)
    result.not_views.update({n: f"vLLM's loader is not a pure view: {e}" for n, e in errors.items()})
    result.not_views.update(sink.misattributed)

    changed = getattr(vllm_model, "hogwild_post_load_changes", None)
    if changed is None:
        raise RuntimeError("process_weights_after_loading was not watched: a tensor vLLM rewrote after loading "
                           "could be mistaken for a view")
    live, numel, covered = {}, {}, defaultdict(int)
    pieces: dict[str, list[Piece]] = defaultdict(list)
    for layer, records in sink.copies_by_layer.items():
        for record in records:
            if record is None:
                continue
            tensor = getattr(layer, record.param_name)
            name = canonical.get(id(tensor), f"{module_names[id(layer)]}.{record.param_name}".lstrip("."))
            meta = metas.get((id(layer), record.param_name))
            live[name], numel[name] = (tensor, meta), (meta if meta is not None else tensor).numel()
            pieces[record.src[0]].append(Piece(name, record.src[1], record.offset, record.shape, record.stride))
            covered[name] += math.prod(record.shape)

    for name, shape in shapes.items():
        if name in result.not_views:
            continue
        mine = pieces.get(name)
        if not mine:
            result.ignored.append(name)
            continue
        targets = sorted({p.tensor for p in mine})
        # Copied into several tensors: fine if one holds it whole (vLLM keeps duplicates).
        whole = [t for t in targets if sum(math.prod(p.shape) for p in mine if p.tensor == t) == math.prod(shape)]
        if not whole and not (shards and len(targets) == 1):
            result.not_views[name] = f"split across several vLLM tensors: {targets}"
            continue
        target = (whole or targets)[0]
        tensor, meta = live[target]
        if target in changed:
            result.not_views[name] = f"{target}: {changed[target]}"
            continue
        if meta is not None and (tuple(tensor.shape) != tuple(meta.shape) or tensor.stride() != meta.stride()):
            result.not_views[name] = f"{target} was laid out anew after loading"
            continue
        try:
            offset, stride, shard = solve_view(shape, dtype, [p for p in mine if p.tensor == target], numel[target], shards)
        except NotAView as exc:
            result.not_views[name] = str(exc)
            continue
        held = list(shape)
        for d, _, n, *blocks in shard:
            held[d] = n * (blocks[0] if blocks else 1)
        result.views[name] = View(target, offset, tuple(held), stride, shard)

    for name, t in [*vllm_model.named_parameters(), *vllm_model.named_buffers()]:
        if covered.get(name, 0) < t.numel():
            result.uncovered[name] = (covered.get(name, 0), t.numel())
    return result

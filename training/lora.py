"""LoRA on a live model: attach a ``peft`` adapter to a model whose weights may
be shared with a server, take it off again leaving the model as it was, and
merge an adapter's delta into the weights *in place* in a way that can be
reverted bit for bit.

Exact revert: ``(w + d) - d`` is not ``w`` in floating point for every element
(in bf16, for about a quarter of them). The merge writes ``w + d`` computed in
fp32 and rounded once (stochastically for 16-bit weights, with noise from a seed
it keeps), and at that moment, with ``w`` still at hand, records what undoing
it needs: for the elements where two originals round to the same merged value,
which one it was (a byte each), the rare elements no nearby original explains
(index and value), and a digest of ``w``. Reverting recomputes the candidates
from the same noise, picks with those records, and checks the digest before it
writes: bit for bit, or, if the weights changed after the merge (other
training), the delta is subtracted and the revert says it was not exact.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .hf_model import decoder_layers
from .rounding import Rounding, choices_of, draw_noise, for_each_chunk, is_rounded, preimages, restore, round_to_, write


def lora_targets(model: torch.nn.Module, layers: list[int] | None = None) -> list[str]:
    """The linear layers an adapter adapts, by full module name, in ``layers`` (default:
    every decoder layer): attention and MLP projections as the model has them (q_proj...
    or a fused qkv_proj; Gated DeltaNet's in/out projections; shared experts), not MoE
    routers (``gate``/``router`` with one output per expert, or a shared expert's
    1-output gate): their output is a routing decision, not a representation. Stacked
    experts are 3-D parameters, not linear layers, and are not adapted. Full names,
    because peft matches a leaf name against parameters too (a MoE's stacked
    ``experts.down_proj``)."""
    config = getattr(model, "config", None)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    module_names = {id(m): n for n, m in model.named_modules()}
    names = []
    for index, layer in enumerate(decoder_layers(model)):
        if layers is not None and index not in layers:
            continue
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            leaf = name.rpartition(".")[2]
            router = (leaf in ("gate", "router") and module.out_features == experts) or \
                (leaf.endswith("gate") and module.out_features == 1)
            if not router:
                names.append(module_names[id(module)])
    return names


@contextmanager
def _exact_targets() -> Iterator[None]:
    """peft rewrites transformers-4 MoE target names for transformers 5 (``gate_proj`` ->
    the stacked ``experts.gate_up_proj``), by suffix, so a shared expert's ``down_proj``
    would land on the stacked experts. Our targets are transformers-5 module names
    already: the rewrite is skipped while the adapter is attached."""
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


@contextmanager
def attached_lora(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                  layers: list[int] | None = None, targets: list[str] | None = None) -> Iterator[torch.nn.Module]:
    """``peft``'s LoRA on ``model`` for the duration of the block; yields the
    ``PeftModel``. Afterwards the adapter layers are removed (not merged) and
    every base parameter is the same tensor, with the same ``requires_grad``, as
    before."""
    from peft import LoraConfig, get_peft_model

    before = {name: (p, p.requires_grad) for name, p in model.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or lora_targets(model, layers))
    with _exact_targets():
        peft_model = get_peft_model(model, config)
    try:
        yield peft_model
    finally:
        peft_model.base_model.unload()  # swaps each LoRA layer back for its base layer
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
        for name, p in model.named_parameters():
            original, requires_grad = before[name]
            assert p is original, f"{name} was replaced while the adapter was attached"
            p.requires_grad_(requires_grad)


def lora_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base-model module name -> (A, B, scaling) of the active adapter, detached copies."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            key = name[len(prefix):] if name.startswith(prefix) else name
            factors[key] = (module.lora_A["default"].weight.detach().clone(),
                            module.lora_B["default"].weight.detach().clone(),
                            float(module.scaling["default"]))
    return factors


def load_factors(peft_model, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Put saved (A, B) factors into an attached adapter of the same shape."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    loaded = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            key = name[len(prefix):] if name.startswith(prefix) else name
            if isinstance(module, LoraLayer) and key in factors:
                a, b, _ = factors[key]
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
                loaded += 1
    if loaded != len(factors):
        raise ValueError(f"the adapter has {loaded} of the {len(factors)} saved LoRA modules")


def factor_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``<module>.lora_B`` -> tensor, as saved."""
    return {f"{n}.{k}": t.contiguous() for n, (a, b, _) in factors.items() for k, t in (("lora_A", a), ("lora_B", b))}


def factors_to_bytes(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[bytes, dict[str, float]]:
    """safetensors bytes of the factors, and each module's scaling."""
    from safetensors.torch import save

    return save(factor_tensors(factors)), {n: s for n, (_, _, s) in factors.items()}


def factors_from_bytes(data: bytes, scaling: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from safetensors.torch import load

    t = load(data)
    return {n: (t[f"{n}.lora_A"], t[f"{n}.lora_B"], s) for n, s in scaling.items()}


def delta_rows(a: torch.Tensor, b: torch.Tensor, scaling: float, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``[start, stop)`` of the weight delta ``scaling * B @ A``, in fp32."""
    return (b[start:stop].float().to(device) @ a.float().to(device)) * scaling


@dataclass
class MergeRecord:
    """What it takes to undo a merge exactly (see ``training.rounding.preimages``)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rounding: Rounding = "stochastic"
    seeds: dict[str, int] = field(default_factory=dict)  # weight name -> seed of its rounding noise
    digests: dict[str, str] = field(default_factory=dict)  # weight name -> digest of the original
    choices: dict[str, torch.Tensor] = field(default_factory=dict)  # uint8: which preimage, where several match
    fix_index: dict[str, torch.Tensor] = field(default_factory=dict)  # flat indices whose original no preimage gives
    fix_value: dict[str, torch.Tensor] = field(default_factory=dict)

    def kept_bytes(self) -> int:
        """Bytes kept to revert beyond the factors: choices and fix-ups."""
        return sum(int(t.numel() * t.element_size()) for d in (self.choices, self.fix_index, self.fix_value) for t in d.values())


def _chunks_with_noise(w: torch.Tensor, rounding: Rounding, seed: int):
    """Row chunks of ``w`` with the rounding noise of each, the same at merge and revert."""
    generator = torch.Generator(device=w.device).manual_seed(seed)
    for start, stop in for_each_chunk(w):
        chunk = w[start:stop]
        noise = draw_noise(chunk.shape, generator) if rounding == "stochastic" and is_rounded(w.dtype) else None
        yield start, stop, chunk, noise


def merge_in_place(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                   rounding: Rounding = "stochastic") -> MergeRecord:
    """Add each ``scaling * B @ A`` into ``<module>.weight`` of ``model`` in place
    (the tensors the server computes with), computed in fp32 and written once with
    ``rounding``, one chunk of one module at a time."""
    record = MergeRecord(factors=factors, rounding=rounding)
    with torch.no_grad():
        for name, (a, b, scaling) in factors.items():
            w = model.get_submodule(name).weight
            seed = record.seeds[name] = secrets.randbits(62)
            digest, choices, fixes, values = hashlib.sha256(), [], [], []
            for start, stop, chunk, noise in _chunks_with_noise(w, rounding, seed):
                original = chunk.clone()
                delta = delta_rows(a, b, scaling, start, stop, w.device)
                chunk.copy_(round_to_(original.float() + delta, w.dtype, rounding, noise))
                chosen, fix = choices_of(original, *preimages(chunk, delta, rounding, noise))
                digest.update(_bytes(original))
                choices.append(chosen.cpu())
                fixes.append(fix.cpu() + start * original[0].numel())
                values.append(original.view(-1)[fix].cpu())
            record.digests[name] = digest.hexdigest()
            record.choices[name], record.fix_index[name], record.fix_value[name] = map(torch.cat, (choices, fixes, values))
    return record


def revert_in_place(model: torch.nn.Module, record: MergeRecord) -> bool:
    """Undo the merge; returns True when every weight is back to its original bits
    (checked by digest before anything is written). If the weights were trained
    after the merge, the deltas are subtracted and False is returned."""
    exact = True
    with torch.no_grad():
        for name, (a, b, scaling) in record.factors.items():
            w = model.get_submodule(name).weight
            restored = list(_restored_chunks(w, a, b, scaling, record, name))
            digest = hashlib.sha256()
            for _, _, original in restored:
                digest.update(_bytes(original))
            if digest.hexdigest() == record.digests[name]:
                for start, stop, original in restored:
                    w[start:stop].copy_(original)
            else:  # trained since the merge: the subtraction is all we can do
                exact = False
                generator = torch.Generator(device=w.device).manual_seed(secrets.randbits(62))
                for start, stop in for_each_chunk(w):
                    rows = w[start:stop]
                    write(rows, rows.float() - delta_rows(a, b, scaling, start, stop, w.device), record.rounding, generator)
    return exact


def _restored_chunks(w, a, b, scaling, record: MergeRecord, name: str):
    """(start, stop, original rows) of ``w`` as ``record`` says they were before the merge."""
    choices, fix_index, fix_value = record.choices[name], record.fix_index[name].to(w.device), record.fix_value[name]
    used = 0
    for start, stop, chunk, noise in _chunks_with_noise(w, record.rounding, record.seeds[name]):
        candidates, matches = preimages(chunk, delta_rows(a, b, scaling, start, stop, w.device), record.rounding, noise)
        n = int((matches.sum(0) > 1).sum())
        taken = choices[used : used + n]
        if taken.numel() != n:  # not the merged weights any more: the digest will say so
            taken = torch.zeros(n, dtype=torch.uint8)
        original = restore(candidates, matches, taken)
        used += n
        first, size = start * chunk[0].numel(), chunk.numel()
        here = (fix_index >= first) & (fix_index < first + size)
        original.view(-1)[fix_index[here] - first] = fix_value[here.cpu()].to(w.device, w.dtype)
        yield start, stop, original


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()

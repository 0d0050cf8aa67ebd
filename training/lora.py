"""LoRA on a live model: attach a ``peft`` adapter to a model whose weights may
be shared with a server, take it off again leaving the model as it was, and
merge an adapter's delta into the weights *in place* in a way that can be
reverted bit for bit.

Exact revert: ``(w + d) - d`` is not ``w`` in floating point for every element.
At merge time we still have ``w``, so we recompute ``(w + d) - d`` there and
keep the few elements where it differs (indices and original values), plus a
digest of ``w``. Reverting subtracts the same ``d`` and puts those elements
back; the digest proves the result is the original, bit for bit. If the
weights changed after the merge (other training), the digest cannot match and
the revert says it was not exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype, any device)."""
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


@contextmanager
def attached_lora(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                  layers: list[int] | None = None, targets=LORA_TARGETS) -> Iterator[torch.nn.Module]:
    """``peft``'s LoRA on ``model`` for the duration of the block; yields the
    ``PeftModel``. Afterwards the adapter layers are removed (not merged) and
    every base parameter is the same tensor, with the same ``requires_grad``, as
    before."""
    from peft import LoraConfig, get_peft_model

    before = {name: (p, p.requires_grad) for name, p in model.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        layers_to_transform=layers, layers_pattern="layers" if layers is not None else None)
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


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, like: torch.Tensor) -> torch.Tensor:
    """The weight delta ``scaling * B @ A`` in ``like``'s dtype and device (computed in fp32)."""
    return ((b.float().to(like.device) @ a.float().to(like.device)) * scaling).to(like.dtype)


@dataclass
class MergeRecord:
    """What it takes to undo a merge exactly."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    digests: dict[str, str] = field(default_factory=dict)  # weight name -> digest of the original
    fix_index: dict[str, torch.Tensor] = field(default_factory=dict)  # flat indices where (w+d)-d != w
    fix_value: dict[str, torch.Tensor] = field(default_factory=dict)

    def fixed_elements(self) -> int:
        return sum(int(i.numel()) for i in self.fix_index.values())


def merge_in_place(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> MergeRecord:
    """Add each ``scaling * B @ A`` into ``<module>.weight`` of ``model`` in place
    (the tensors the server computes with), one module at a time."""
    record = MergeRecord(factors=factors)
    with torch.no_grad():
        for name, (a, b, scaling) in factors.items():
            w = model.get_submodule(name).weight
            original = w.detach().clone()
            delta = lora_delta(a, b, scaling, w)
            w.add_(delta)
            back = w - delta
            wrong = (back.view(-1) != original.view(-1)).nonzero().view(-1)
            record.digests[name] = tensor_digest(original)
            record.fix_index[name] = wrong.cpu()
            record.fix_value[name] = original.view(-1)[wrong].cpu()
    return record


def revert_in_place(model: torch.nn.Module, record: MergeRecord) -> bool:
    """Subtract the merged deltas; returns True when every weight is back to its
    original bits (checked by digest)."""
    exact = True
    with torch.no_grad():
        for name, (a, b, scaling) in record.factors.items():
            w = model.get_submodule(name).weight
            w.sub_(lora_delta(a, b, scaling, w))
            index = record.fix_index[name].to(w.device)
            candidate = w.view(-1).clone()
            candidate[index] = record.fix_value[name].to(w.device, w.dtype)
            if tensor_digest(candidate) == record.digests[name]:
                w.view(-1)[index] = candidate[index]
            else:
                exact = False  # trained since the merge: the subtraction is all we can do
    return exact

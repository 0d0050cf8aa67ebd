"""Training one served adapter: a PEFT LoRA on the frozen base, whose factors are tensors the
caller provides (views of the file vLLM loads the adapter from), stepped by every full-weight
mode's loop (``step_loop``) through ``AdapterTrainer``.

The adapter's factors are kept in fp32 whatever the base's dtype (PEFT's default for LoRA on
16-bit bases); vLLM casts them to its LoRA dtype when it loads them.
"""

from __future__ import annotations

import torch

from .sft import SFTTrainer


class AdapterTrainer(SFTTrainer):
    """``SFTTrainer`` on a ``PeftModel`` whose only trainable parameters are one adapter's
    factors, with AdamW (APOLLO without projection: LoRA factors are low-rank already)."""

    projects = False

    def __init__(self, peft_model: torch.nn.Module, pad_id: int = 0):
        super().__init__(peft_model, pad_id)
        self.weight_spacing = None  # fp32 factors: no update is too small to hold


def adapter_targets(every: list[str], leaves: list[str] | None) -> list[str]:
    """The full module names a new adapter adapts, of ``every`` adaptable one (``lora.lora_targets``:
    every linear layer of the decoder blocks but MoE routers): all, or those whose leaf name is in
    ``leaves``. Raises ValueError naming the leaves the model does not have, and the ones it has."""
    if leaves is None:
        return every
    known = sorted({name.rpartition(".")[2] for name in every})
    unknown = [leaf for leaf in leaves if leaf not in known]
    if unknown:
        raise ValueError(f"adapter_targets: the model has no adaptable module {', '.join(unknown)}; "
                         f"its linear layers are {', '.join(known)}")
    return [name for name in every if name.rpartition(".")[2] in leaves]


def factor_key(param_name: str, adapter: str = "default") -> str | None:
    """The PEFT file key (``base_model.model.<module>.lora_A.weight``) of a ``PeftModel``
    parameter of ``adapter``; None for any other parameter."""
    for factor in ("lora_A", "lora_B"):
        marker = f".{factor}.{adapter}."
        if marker in param_name:
            return param_name.replace(marker, f".{factor}.")
    return None


def factors_of(peft_model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """PEFT file key -> the adapter's factor parameter."""
    factors = {}
    for name, param in peft_model.named_parameters():
        key = factor_key(name, adapter)
        if key is not None:
            factors[key] = param
    return factors


def bind_factors(peft_model: torch.nn.Module, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Make each factor parameter of ``adapter`` *be* the tensor of the same key (its storage,
    not a copy): what the optimizer writes lands in ``tensors``. Raises ValueError when the
    keys or shapes differ (an adapter saved for another shape)."""
    params = factors_of(peft_model, adapter)
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"the adapter's saved factors do not fit its modules (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, param in params.items():
        tensor = tensors[key]
        if tensor.shape != param.shape or tensor.dtype != torch.float32:
            raise ValueError(f"{key}: saved {tuple(tensor.shape)} {tensor.dtype}, the module needs {tuple(param.shape)} float32")
        param.data = tensor

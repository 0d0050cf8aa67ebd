"""The kernels vLLM's CPU path computes with while the plugin keeps the weights live: linear
layers (``linear_for``, ``live_linear``) and MoE experts (``torch_experts``).

vLLM's CPU backend computes each linear layer from a copy of its weight prepacked for oneDNN
(``dispatch_cpu_unquantized_gemm``); a trained weight would then never be served, and the copy
doubles the weights' memory. The plugin computes from the parameter itself (``live_weights``),
and this op is how: ``hogwild::live_linear(x, weight, bias)``, equal to ``F.linear`` and reading
``weight``'s storage at every call, so a training step is served at the next call with nothing
repacked and nothing copied.

Which kernel: for fp32, oneDNN's linear on the plain weight (``mkldnn._linear_pointwise``; it
reorders the weight block by block as it goes, at every call); ``F.linear`` for bf16, which on
CPU is oneDNN's already. Measured on the bench model's four linears of a layer (2 threads, min of
7 interleaved runs): fp32 198 / 832 / 2198 us against ``F.linear``'s 264 / 1104 / 2972 us at 1 /
16 / 64 rows; bf16 equal to ``F.linear``. ``weight @ x.T`` (BLAS reading the weight in place) was
no faster. What none of them reach is vLLM's copy prepacked once into oneDNN's blocked layout
(bench/RESULTS.md, spine). A custom op (``torch.library``) so that vLLM's compiled mode keeps it
whole: inductor can neither lower oneDNN's op nor prepack the weight as a constant.
"""

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import Library

from . import vllm_internals

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Weights smaller than this (elements) are faster with F.linear: oneDNN's per-call set-up outweighs its gain.
ONEDNN_MIN_ELEMENTS = 1 << 19


def _onednn_for(weight: torch.Tensor) -> bool:
    """Whether oneDNN is the faster for ``weight`` (fp32, at least ``ONEDNN_MIN_ELEMENTS``); bf16 is
    oneDNN in ``F.linear`` already, and a small weight's set-up costs more than the kernel saves."""
    return _ONEDNN and weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_ELEMENTS


def _live_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN, from ``weight`` as it is now."""
    if not _ONEDNN:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "").reshape(*x.shape[:-1], weight.shape[0])


def _live_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _torch_experts(output: torch.Tensor, hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   w13_bias: Optional[torch.Tensor], w2_bias: Optional[torch.Tensor], topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, activation: str, apply_router_weight_on_input: bool,
                   expert_map: Optional[torch.Tensor] = None) -> None:
    """What vLLM's fused MoE computes, from [E, 2I, H] / [E, H, I] weights (gate rows
    first in w13), one active expert at a time, as transformers does; into ``output``."""
    act = _ACTIVATIONS[activation]
    total = torch.zeros(hidden_states.shape[0], w2.shape[1], dtype=torch.float32, device=hidden_states.device)
    ids = topk_ids if expert_map is None else expert_map[topk_ids.long()]
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        token, slot = torch.where(ids == e)
        # Already inside an op: each expert's linears called as plain functions, not as ops again.
        h = (_live_linear if _onednn_for(w13[e]) else F.linear)(hidden_states[token], w13[e],
                                                                 w13_bias[e] if w13_bias is not None else None)
        gate, up = h.chunk(2, dim=-1)
        y = (_live_linear if _onednn_for(w2[e]) else F.linear)(act(gate) * up, w2[e],
                                                                w2_bias[e] if w2_bias is not None else None)
        if not apply_router_weight_on_input:  # else already applied to the inputs
            y = y * topk_weights[token, slot].unsqueeze(-1).to(y.dtype)
        total.index_add_(0, token, y.float())
    output.copy_(total.to(output.dtype))


def _torch_experts_fake(output, hidden_states, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, activation,
                        apply_router_weight_on_input, expert_map=None) -> None:
    return None


# Ops, so that vLLM's compiled mode calls them whole: inductor cannot lower oneDNN's linear, and
# the experts' loop over the experts a batch routes to is data-dependent (Dynamo refuses to trace
# it: a MoE model did not start in compiled mode). Registered with vLLM's helper (~2 us a call),
# not torch.library.custom_op (~13-23 us here: as much as a decoding step's small linear takes;
# measured, it cancelled the kernel's gain).
_LIBRARY = Library("hogwild", "FRAGMENT")
vllm_internals.register_custom_op("live_linear", _live_linear, [], _live_linear_fake, _LIBRARY)
vllm_internals.register_custom_op("torch_experts", _torch_experts, ["output"], _torch_experts_fake, _LIBRARY)
live_linear = torch.ops.hogwild.live_linear.default
torch_experts = torch.ops.hogwild.torch_experts.default


def linear_for(weight: torch.Tensor) -> Callable:
    """What a linear layer computes ``weight`` with, live: the op where oneDNN is the faster,
    else ``F.linear`` called directly (no op's dispatch to pay)."""
    return live_linear if _onednn_for(weight) else F.linear

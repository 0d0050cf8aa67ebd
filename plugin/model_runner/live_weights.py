"""Keep vLLM's CPU weights live: the tensors it computes with are the parameters.

After loading, vLLM's CPU backend lays some weights out anew for its fast
kernels, and computes with the copy; an in-place update of the parameter would
then change nothing, and the dry-run mapping (``weight_mapping``) would point at
memory that no longer holds the weight. Three places do this in vLLM 0.32:

- linear layers: repacked for oneDNN, ``layer.weight`` emptied
  (``dispatch_cpu_unquantized_gemm``): computed from the parameter instead
  (``live_kernels.linear_for``: the fastest kernel found that reads it in place);
- Gated DeltaNet's causal conv1d weight ([C, 1, K]) in bf16: packed by the same
  dispatch; kept, and the conv kernels told it is not packed;
- MoE experts: the intermediate size padded and ``w13``/``w2`` replaced by
  prepacked copies (``CPUUnquantizedExperts.process_weights_after_loading``):
  kept as loaded, and the experts computed from them, expert by expert (``torch_experts``).

Each patch applies only where the weights are published (``publishing``); else
vLLM's fast paths stay. GPU backends compute with the loaded tensors already; any
backend that rewrites a weight after loading is caught by ``watch_post_load`` and
that weight is not mapped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import vllm_internals
from .live_kernels import linear_for, torch_experts

def patch_cpu_dispatch(publishing: Callable[[], bool]) -> None:
    """Linear weights computed by ``live_linear`` from the live parameter; conv1d weights left unpacked."""
    utils = vllm_internals.linear_dispatch_module()
    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "hogwild_original", None):
        return

    def dispatch_live_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        w = layer.weight
        if w.is_meta or not publishing():
            return original(layer, remove_weight)
        if w.ndim == 2:
            layer.cpu_linear = linear_for(w)
        elif not (w.ndim == 3 and w.shape[1] == 1):  # conv1d [C, 1, K] stays as loaded
            return original(layer, remove_weight)

    dispatch_live_weight.hogwild_original = original
    utils.dispatch_cpu_unquantized_gemm = dispatch_live_weight
    _patch_conv_kernels()


def _patch_conv_kernels() -> None:
    """Gated DeltaNet's CPU conv kernels take the [C, K] view of an unpacked [C, 1, K] weight."""
    gdn_attention = vllm_internals.gated_deltanet_cpu_kernels()
    if gdn_attention is None:
        return

    def unpacked(kernel):
        def call(*, weight, is_weight_packed, **kwargs):
            if weight.ndim == 3:
                weight, is_weight_packed = weight.view(weight.shape[0], weight.shape[2]), False
            return kernel(weight=weight, is_weight_packed=is_weight_packed, **kwargs)

        return call

    for name in ("_causal_conv1d_fwd_cpu", "_causal_conv1d_update_cpu"):
        kernel = getattr(gdn_attention, name, None)
        if kernel is not None and not hasattr(kernel, "hogwild_original"):
            wrapped = unpacked(kernel)
            wrapped.hogwild_original = kernel
            setattr(gdn_attention, name, wrapped)


def patch_cpu_moe(publishing: Callable[[], bool]) -> None:
    """CPU MoE experts kept as loaded and computed in torch (see ``torch_experts``)."""
    cls = vllm_internals.cpu_moe_experts()
    if cls is None:
        return
    if getattr(cls.process_weights_after_loading, "hogwild_original", None):
        return
    original_process, original_apply = cls.process_weights_after_loading, cls.apply

    def process_weights_after_loading(self, layer):
        self.hogwild_live = publishing()
        if not self.hogwild_live:
            return original_process(self, layer)
        self._use_zentorch = False

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map,
              a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta, apply_router_weight_on_input):
        if not getattr(self, "hogwild_live", False):
            return original_apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                                  global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
                                  expert_tokens_meta, apply_router_weight_on_input)
        torch_experts(output, hidden_states, w1, w2, self.w1_bias, self.w2_bias, topk_weights, topk_ids,
                      str(activation.value).lower(), apply_router_weight_on_input, expert_map)

    process_weights_after_loading.hogwild_original = original_process
    cls.process_weights_after_loading = process_weights_after_loading
    cls.apply = apply

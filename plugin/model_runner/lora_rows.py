"""vLLM's CPU LoRA kernels, made to leave requests without an adapter alone.

vLLM's PyTorch LoRA ops (``vllm.lora.ops.torch_ops``, what ``PunicaWrapperCPU`` runs) pick
each token's adapter with ``weights[lora_index]``; a token of a request without an adapter
has index -1, which indexes the *last* LoRA slot. Only a step of one prefill without an
adapter is skipped, so in any other step (two or more requests, or decoding) the base
model's requests get the delta of whatever adapter sits in the last slot (measured: 0.245 in
a log-probability of the tiny model, served beside an adapter). The GPU kernels skip index
-1. Upstream: vllm-project/vllm#48421 and #49656 (open, not in 0.32). Here the shrink (x @ A)
of every such row is set to zero after vLLM computes it, so the expand (@ B) adds exactly zero
to the base's output: the base answers as it does alone. Drop this once vLLM has the fix.

Installed in every vLLM process on CPU when the plugin is enabled (``general.py``); it
matters only with ``--enable-lora``.
"""

from __future__ import annotations

import torch

from . import vllm_internals

_installed = False


def _zero_base_rows(output: torch.Tensor, token_indices: torch.Tensor) -> None:
    rows = token_indices[: output.shape[0]] < 0
    if bool(rows.any()):
        output[rows] = 0


def install() -> None:
    """Wrap the two shrink ops ``PunicaWrapperCPU`` calls (idempotent; nothing without vLLM's CPU LoRA)."""
    global _installed
    punica_cpu = vllm_internals.cpu_punica_wrapper()
    if _installed or punica_cpu is None:
        return
    _installed = True
    bgmv_shrink, sgmv_shrink = punica_cpu.bgmv_shrink, punica_cpu.sgmv_shrink

    def bgmv_shrink_base_rows_zero(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        _zero_base_rows(output_tensor, lora_indices_tensor)

    def sgmv_shrink_base_rows_zero(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                                   lora_indices_tensor, batches, max_seq_length, token_nums, scaling):
        sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
                    max_seq_length, token_nums, scaling)
        _zero_base_rows(output_tensor, torch.repeat_interleave(lora_indices_tensor, seq_len_tensor))

    punica_cpu.bgmv_shrink, punica_cpu.sgmv_shrink = bgmv_shrink_base_rows_zero, sgmv_shrink_base_rows_zero

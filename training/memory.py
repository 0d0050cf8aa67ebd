"""How much memory a training job will need, before it starts.

An upper-bound estimate from the model's shape, so that a job that cannot fit
is refused with a message instead of the trainer being killed by the OS (or
running out of GPU memory) half-way through an update of the served weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .apollo import is_projected
from .rounding import CHUNK_ELEMENTS, SCRATCH_TENSORS, is_rounded


@dataclass(frozen=True)
class JobMemory:
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    rounding_scratch: int = 0  # fp32 temporaries of the chunked, rounded weight writes

    @property
    def total(self) -> int:
        # 20% for allocator fragmentation and temporaries not counted above.
        return int(1.2 * (self.gradients + self.optimizer_state + self.activations + self.logits + self.rounding_scratch))

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.total / gib:.2f} GiB (gradients {self.gradients / gib:.2f}, optimizer state "
                f"{self.optimizer_state / gib:.2f}, activations {self.activations / gib:.2f}, logits {self.logits / gib:.2f}, "
                f"rounding scratch {self.rounding_scratch / gib:.2f})")


def estimate_job_memory(model: torch.nn.Module, micro_batch: int, seq_len: int, rank: int, new_optimizer: bool) -> JobMemory:
    """Peak extra bytes of one optimizer step of a decoder-only causal LM.

    ``micro_batch`` samples of up to ``seq_len`` tokens per forward pass; the
    optimizer's state counts only if it does not exist yet (``new_optimizer``).
    """
    config = model.config
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elem = params[0][1].element_size() if params else 4
    gradients = sum(p.numel() * p.element_size() for _, p in params)
    state = 0
    if new_optimizer:
        for name, p in params:
            if is_projected(name, p):
                # Two low-rank moments and the projection matrix.
                state += 3 * min(rank, min(p.shape)) * max(p.shape) * 4
            else:
                state += 2 * p.numel() * 4  # fp32 moments (training/apollo.py)
    tokens = micro_batch * seq_len
    hidden = config.hidden_size
    inter = mlp_width(config)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    # Saved for backward per token and layer: ~10 hidden-sized and 4 MLP-sized
    # tensors, plus the attention probabilities if materialised.
    activations = tokens * layers * ((10 * hidden + 4 * inter) * elem + heads * seq_len * 4)
    # Logits in the model dtype, their fp32 copy, log-softmax and its gradient.
    logits = tokens * config.vocab_size * (elem + 3 * 4)
    largest = max((p.numel() for _, p in params), default=0)
    scratch = SCRATCH_TENSORS * 4 * min(largest, CHUNK_ELEMENTS) if any(is_rounded(p.dtype) for _, p in params) else 0
    return JobMemory(gradients, state, activations, logits, scratch)


def mlp_width(config) -> int:
    """Intermediate activations per token of one layer's MLP: a MoE layer computes only
    the experts each token is routed to (and its shared expert)."""
    experts_per_token = getattr(config, "num_experts_per_tok", None)
    if experts_per_token and getattr(config, "moe_intermediate_size", None):
        return experts_per_token * config.moe_intermediate_size + (getattr(config, "shared_expert_intermediate_size", 0) or 0)
    return getattr(config, "intermediate_size", None) or 4 * config.hidden_size


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available

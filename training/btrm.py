"""Multi-head Bradley-Terry reward heads (BTRM).

One forward pass of a causal LM, N scoring semantics: a stack of scalar heads
reads the last hidden state at the last token,

    last_hidden -> RMSNorm (shared) -> Linear(hidden, n_heads) -> cap * tanh(. / cap)

and each head learns its own membership criterion from the same tokens with
its own assignment of positives and (tiered) negatives.

Loss of head h, over the pairs (positive i, negative j) of a batch:

    BT_h  = sum_ij w_j * -log sigmoid(r_ih - r_jh) / sum_ij w_j      (w_j: the negative's tier weight)
    REG_h = mean over positives i of penalty(r_ih)
    loss  = mean over the heads with a positive in the batch of (BT_h + lambda * REG_h)

``penalty`` is ``(log(r^2 + eps))^2`` by default ("squared"): zero at r = 1,
21.2 at r = 0.1 and at r = 10, so positives settle near 1; for r <= 0 it rises
linearly away from 0 (not the even function's second minimum at -1). The owner's notes
write it as ``log(r^2 + eps)`` ("literal"), which is minimised at r = 0 and so
pulls positives towards zero; it stays selectable (see DESIGN.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

LogSq = Literal["squared", "literal"]


class RewardHeads(torch.nn.Module):
    """The stacked heads: a shared RMSNorm, one projection, an optional soft cap."""

    def __init__(self, hidden_size: int, names: list[str], cap: float = 10.0, eps: float = 1e-6):
        super().__init__()
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"head names must be distinct and at least one: {names}")
        self.names = list(names)
        self.cap = float(cap)
        self.norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        self.proj = torch.nn.Linear(hidden_size, len(names))
        # Every score starts at +1, the squared penalty's minimum; the Bradley-Terry
        # term then pushes negatives below the positives.
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.ones_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., n_heads) scores."""
        scores = self.proj(self.norm(hidden.to(self.proj.weight.dtype)))
        return soft_cap(scores, self.cap)

    def to_bytes(self, extra: dict | None = None) -> tuple[bytes, bytes]:
        """(safetensors bytes, JSON bytes) of the heads, their names and cap."""
        meta = {"names": self.names, "cap": self.cap, "hidden_size": self.proj.in_features, "eps": self.norm.eps,
                "extra": extra or {}}
        return save_tensors({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}), json.dumps(meta).encode()

    @classmethod
    def from_bytes(cls, tensor_bytes: bytes, json_bytes: bytes) -> "RewardHeads":
        meta = json.loads(json_bytes)
        heads = cls(meta["hidden_size"], meta["names"], meta["cap"], meta["eps"] or 1e-6)
        heads.load_state_dict(load_tensors(tensor_bytes))
        heads.extra = meta.get("extra", {})
        return heads


def soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(scores / cap)``; ``cap <= 0`` disables it."""
    return cap * torch.tanh(scores / cap) if cap > 0 else scores


def logsq_penalty(r: torch.Tensor, form: LogSq = "squared", eps: float = 1e-6) -> torch.Tensor:
    """Per-score regulariser on positives: ``(log(r^2+eps))^2`` or the literal ``log(r^2+eps)``.

    The squared form is even in r, so it has a second minimum at r = -1, and r = 0 is a
    hilltop whose slope sends a positive just below 0 down to -1, where a whole head's
    positives can settle (seen with weight decay on the tiny model). For r <= 0 it
    therefore continues as a line rising away from 0: every negative positive is pushed up.
    """
    log_sq = torch.log(r * r + eps)
    if form != "squared":
        return log_sq
    at_zero = math.log(eps) ** 2
    return torch.where(r > 0, log_sq * log_sq, at_zero - 2 * math.log(eps) * -r.clamp_max(0))


@dataclass
class BTRMLoss:
    loss: torch.Tensor
    active: torch.Tensor  # (n_heads,) bool: heads with a positive in the batch
    bt: torch.Tensor  # (n_heads,) per-head Bradley-Terry term (0 where inactive)
    reg: torch.Tensor  # (n_heads,) per-head regulariser term


def btrm_loss(scores: torch.Tensor, positive: torch.Tensor, negative_weight: torch.Tensor, lam: float = 0.1,
              form: LogSq = "squared", eps: float = 1e-6) -> BTRMLoss:
    """The batch loss (see the module docstring).

    ``scores``: (B, H). ``positive``: (B, H) bool, sample b is a positive of head h.
    ``negative_weight``: (B, H), the tier weight where sample b is a negative of
    head h, 0 elsewhere. Heads with no positive in the batch do not contribute.
    """
    pos = positive.float()
    diff = scores[:, None, :] - scores[None, :, :]  # (i, j, h): r_ih - r_jh
    pair_w = pos[:, None, :] * negative_weight[None, :, :]
    pair_sum = pair_w.sum(dim=(0, 1))
    bt = (pair_w * F.softplus(-diff)).sum(dim=(0, 1)) / pair_sum.clamp_min(1e-12)
    n_pos = pos.sum(dim=0)
    reg = (pos * logsq_penalty(scores, form, eps)).sum(dim=0) / n_pos.clamp_min(1)
    active = n_pos > 0
    per_head = torch.where(active, bt + lam * reg, torch.zeros_like(bt))
    loss = per_head.sum() / active.sum().clamp_min(1)
    return BTRMLoss(loss, active, torch.where(active, bt, 0.0), torch.where(active, reg, 0.0))


def pairwise_accuracy(scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> list[float | None]:
    """Per head: the fraction of (positive, negative) pairs ranked right (None: no pairs)."""
    out: list[float | None] = []
    for h in range(scores.shape[1]):
        p, n = scores[positive[:, h], h], scores[negative[:, h], h]
        out.append(float((p[:, None] > n[None, :]).float().mean()) if p.numel() and n.numel() else None)
    return out


@dataclass
class HeadTrainingLog:
    losses: list[float] = field(default_factory=list)
    accuracy: list[list[float | None]] = field(default_factory=list)  # per evaluation, per head
    epochs: list[int] = field(default_factory=list)


def train_heads(heads: RewardHeads, features: torch.Tensor, positive: torch.Tensor, negative_weight: torch.Tensor,
                held_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, *, epochs: int = 200,
                batch_size: int = 64, lr: float = 1e-2, weight_decay: float = 0.0, lam: float = 0.1,
                form: LogSq = "squared", seed: int = 0, progress=None) -> HeadTrainingLog:
    """Train the heads on precomputed last-token features (frozen trunk).

    ``features`` (N, hidden); ``positive`` (N, H) bool; ``negative_weight`` (N, H).
    ``held_out``: (features, positive, negative) evaluated after every epoch.
    """
    log = HeadTrainingLog()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    n = features.shape[0]
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        epoch_losses = []
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            out = btrm_loss(heads(features[idx]), positive[idx], negative_weight[idx], lam, form)
            if not out.active.any():
                continue
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            epoch_losses.append(float(out.loss.detach()))
        log.losses.append(sum(epoch_losses) / max(1, len(epoch_losses)))
        if held_out is not None:
            with torch.no_grad():
                log.accuracy.append(pairwise_accuracy(heads(held_out[0]), held_out[1], held_out[2]))
            log.epochs.append(epoch + 1)
        if progress is not None:
            progress(epoch + 1, epochs, log)
    return log


def last_token_features(model: torch.nn.Module, id_lists: list[list[int]], batch_size: int = 16, progress=None,
                        grad: bool = False) -> torch.Tensor:
    """The trunk's last hidden state (after its final norm) at each sequence's last token.
    ``grad``: keep the graph (a trunk LoRA trains through it); else no autograd."""
    with torch.set_grad_enabled(grad):
        return _last_token_features(model, id_lists, batch_size, progress, grad)


def _last_token_features(model, id_lists, batch_size, progress, grad) -> torch.Tensor:
    trunk = model.get_base_model().base_model if hasattr(model, "get_base_model") else model.base_model
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(id_lists), batch_size):
        batch = id_lists[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        hidden = trunk(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        last = torch.tensor([len(ids) - 1 for ids in batch], device=device)
        picked = hidden[torch.arange(len(batch), device=device), last].float()
        rows.append(picked if grad else picked.cpu())
        if progress is not None:
            progress(min(start + batch_size, len(id_lists)), len(id_lists))
    return torch.cat(rows)

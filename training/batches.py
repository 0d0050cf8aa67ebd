"""Turning (context, continuation) token-id samples into padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import IGNORE_INDEX


@dataclass(frozen=True)
class Sample:
    """One supervised example: the model reads ``context_ids`` and learns to
    continue with ``continuation_ids``; ``weight`` scales its tokens' loss."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    weight: float = 1.0
    id: str | None = None


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), shifted: labels[:, t] is the token at t + 1
    token_weights: torch.Tensor  # (B, T)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.token_weights)))


def collate(samples: list[Sample], pad_id: int = 0) -> Batch:
    """Right-pad samples into one batch; only continuation tokens are labelled.

    The sequence fed to the model is ``context + continuation[:-1]``: the last
    continuation token is only ever a target, never an input.
    """
    seqs = [list(s.context_ids) + list(s.continuation_ids) for s in samples]
    width = max(len(seq) for seq in seqs) - 1
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, (sample, seq) in enumerate(zip(samples, seqs)):
        n = len(seq) - 1
        input_ids[row, :n] = torch.tensor(seq[:-1])
        attention_mask[row, :n] = 1
        first_target = len(sample.context_ids) - 1  # position whose next token is continuation[0]
        labels[row, first_target:n] = torch.tensor(seq[first_target + 1 :])
        weights[row, first_target:n] = sample.weight
    return Batch(input_ids, attention_mask, labels, weights)

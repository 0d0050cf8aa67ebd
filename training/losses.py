"""Loss functions: plain functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] of each row: (N, vocab), (N,) -> (N,). A tensor-parallel
    model's logits are split by vocabulary and come with their own (``tensor_parallel``)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def continuation_nll(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
                     nll=token_nll) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean negative log-likelihood of the labelled tokens.

    ``logits``: (batch, seq, vocab) for positions 0..seq-1. ``labels``: (batch, seq),
    the token each position must predict (already shifted: ``labels[:, t]`` is the
    token at ``t + 1``), ``IGNORE_INDEX`` where no loss applies (context, padding).
    ``token_weights``: (batch, seq), the weight of each labelled token (its sample's
    weight). Returns ``(sum_w * nll / sum_w, sum_w)`` so that micro-batches can be
    combined exactly: the caller rescales by ``sum_w / total_w``. ``nll``: ``token_nll``
    or a tensor-parallel model's.
    """
    mask = labels != IGNORE_INDEX
    nll = nll(logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1)).reshape(labels.shape)
    w = token_weights.float() * mask
    total_w = w.sum()
    return (nll * w).sum() / total_w.clamp_min(torch.finfo(torch.float32).tiny), total_w


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, nll=token_nll) -> torch.Tensor:
    """The log-probability of each labelled token, (batch, seq); 0 where no token counts.
    ``logits``/``labels`` as in ``continuation_nll`` (labels shifted, ``IGNORE_INDEX`` elsewhere)."""
    mask = labels != IGNORE_INDEX
    logp = -nll(logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1)).reshape(labels.shape)
    return logp * mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, nll=token_nll) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are.

    ``logits``/``labels`` as in ``continuation_nll``. Returns ``(sum log p, n_tokens)``, each of shape (batch,).
    """
    return token_logprobs(logits, labels, nll).sum(-1), (labels != IGNORE_INDEX).sum(-1)

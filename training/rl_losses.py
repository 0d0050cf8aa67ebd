"""RL losses: plain functions of per-token log-probabilities (TRL's, DAPO's, MiniMax-M1's, Tinker's).

Three policies, the decoupled form of TRL's GRPO with vLLM's importance-sampling correction
(and of AReaL's decoupled PPO):

- the sampler mu: the engine's log-probability of each sampled token, as it reported it (``sampler_logp``);
- pi_old: the trainer's model as the job starts (``old_logp``: one pass without gradient, kept as
  numbers; it is also the KL's reference, "the weights as they were when the job started");
- pi_theta: the trainer's model now (``logp``, with gradient).

For each completion token, with its sequence's advantage A:

- ``r = exp(logp - old_logp)``, the policy ratio (exactly 1 at a job's first step);
- ``w = min(exp(old_logp - sampler_logp), is_cap)``, truncated importance sampling (TIS; Yao et al.
  2025; TRL's ``vllm_importance_sampling_correction`` with ``vllm_importance_sampling_cap``): no
  gradient. ``r * w`` is the trainer's probability now over the sampler's, the part from before
  the job (the samples' staleness and the engine-vs-trainer numerics) truncated at ``is_cap``.

Per-token losses (each multiplied by ``w``, as TRL multiplies its per-token loss by the capped
ratio after the min; the KL term is not):

- grpo:      ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``, TRL ``GRPOTrainer._compute_loss``
  at ``importance_sampling_level="token"`` (``epsilon_low``/``epsilon_high`` are clip_low/clip_high:
  DAPO's clip-higher, Yu et al. 2025, when clip_high > clip_low).
- cispo:     ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp``, MiniMax-M1 (MiniMax 2025, the
  CISPO objective): the importance weight is clipped and carries no gradient, so every token keeps its
  gradient ``A * weight * grad logp`` (PPO's clip drops clipped tokens). TRL's ``cispo`` bounds only
  from above (``clamp(r, max=epsilon_high)``); clip_low close to 1 does the same here.
- reinforce: ``-r A``, Tinker's ``importance_sampling`` loss (``-(exp(target_logprobs -
  sampling_logprobs) * advantages)``): the importance-weighted policy gradient, its gradient
  ``-sg(r) A grad logp``; no clipping.

KL to the reference (TRL's k3 estimator, Schulman 2020): ``kl = exp(ref - logp) - (ref - logp) - 1``
per token (>= 0, 0 where equal), added as ``kl_coef * kl`` to each token's loss.

Aggregation over a batch (TRL's ``loss_type``), with ``mask`` the completion tokens:

- bnpo:    ``sum(loss * mask) / max(1, sum(mask))``: the mean over every token of the batch;
- dr_grpo: ``sum(loss * mask) / (batch_size * max_completion_length)`` (Liu et al. 2025, Dr. GRPO):
  a constant normaliser, so no sequence-length bias.

Group advantages (TRL's ``_generate_and_score_completions``): ``A = reward - mean(group)``, divided
by ``std(group) + 1e-4`` (torch's unbiased std) when ``scale_rewards``. A group of one (TRL: NaN)
or with equal rewards (TRL: 0) gets 0 here, and is reported as such.

Checked against public sources (2026-12-07): TRL's GRPO trainer computes the TIS weight as
``clamp(exp(old_per_token_logps - sampling_per_token_logps), max=vllm_importance_sampling_cap)``
(the cap is 2.0 in its configs, as ``is_cap`` here), and Tinker-style ``cispo`` is
``-(clamp(exp(target - sampling), low, high).detach() * target * advantages)``. The GRPO min/clip,
the k3 KL and the aggregations are transcribed from memory of TRL's ``grpo_trainer.py``; the
tests transcribe them independently.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields

import torch

OBJECTIVES = ("grpo", "cispo", "reinforce")
LOSS_TYPES = ("bnpo", "dr_grpo")
STD_EPS = 1e-4  # TRL's, added to the group's std


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor,
                     scale_rewards: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: reward minus its group's mean, over the group's std + 1e-4 when ``scale_rewards``.
    ``groups``: an integer id per sample. Returns (advantages, flat), ``flat`` true for samples
    of a group of one or of equal rewards: their advantage is 0 (there is nothing to compare)."""
    advantages = torch.zeros_like(rewards)
    flat = torch.zeros_like(rewards, dtype=torch.bool)
    for group in groups.unique():
        members = groups == group
        r = rewards[members]
        if len(r) < 2 or bool((r == r[0]).all()):
            flat[members] = True
            continue
        centred = r - r.mean()
        advantages[members] = centred / (r.std() + STD_EPS) if scale_rewards else centred
    return advantages, flat


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """r = exp(logp - old_logp), per token, with logp's gradient."""
    return torch.exp(logp - old_logp)


def truncated_is_weight(old_logp: torch.Tensor, sampler_logp: torch.Tensor, is_cap: float) -> torch.Tensor:
    """w = min(exp(old_logp - sampler_logp), is_cap), per token, without gradient (TIS)."""
    return torch.exp(old_logp - sampler_logp).clamp(max=is_cap).detach()


def grpo_token_loss(logp, old_logp, advantages, clip_low: float, clip_high: float) -> torch.Tensor:
    """-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), per token; ``advantages`` per sequence (B,)."""
    r = policy_ratio(logp, old_logp)
    a = advantages.unsqueeze(-1)
    return -torch.min(r * a, r.clamp(1 - clip_low, 1 + clip_high) * a)


def cispo_token_loss(logp, old_logp, advantages, clip_low: float, clip_high: float) -> torch.Tensor:
    """-sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp, per token."""
    weight = policy_ratio(logp, old_logp).clamp(1 - clip_low, 1 + clip_high).detach()
    return -weight * advantages.unsqueeze(-1) * logp


def reinforce_token_loss(logp, old_logp, advantages) -> torch.Tensor:
    """-r A, per token (Tinker's importance_sampling)."""
    return -policy_ratio(logp, old_logp) * advantages.unsqueeze(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1, per token: TRL's estimator of KL(pi_theta || ref)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int | None = None) -> torch.Tensor:
    """One number from per-token losses (B, T) over the ``mask``'s tokens, as TRL's ``loss_type``
    (masked positions must hold finite numbers: they are multiplied by 0, as TRL does).
    ``max_completion_length``: dr_grpo's constant."""
    total = (token_loss * mask).sum()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (token_loss.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r} (one of {LOSS_TYPES})")


@dataclass
class RLStats:
    """Sums over a batch's tokens (and sequences), so that micro-batches add up to their step's."""

    tokens: float = 0.0
    sequences: int = 0
    ratio: float = 0.0  # sum of r
    clipped: float = 0.0  # tokens whose clip took effect
    truncated: float = 0.0  # tokens whose importance weight was truncated at is_cap
    kl: float = 0.0  # sum of the k3 estimate
    advantage: float = 0.0  # sum over sequences
    gap_abs: float = 0.0  # sum of |old_logp - sampler_logp|
    gap_max: float = 0.0  # max of it

    def __add__(self, other: RLStats) -> RLStats:
        return RLStats(**{f.name: (max if f.name == "gap_max" else operator.add)(getattr(self, f.name), getattr(other, f.name))
                          for f in fields(self)})

    def summary(self) -> dict[str, float]:
        """The per-step diagnostics: means over tokens (advantage: over sequences)."""
        n = max(self.tokens, 1.0)
        return {"ratio_mean": self.ratio / n, "clip_fraction": self.clipped / n, "truncated_fraction": self.truncated / n,
                "kl": self.kl / n, "advantage_mean": self.advantage / max(self.sequences, 1),
                "logprob_gap_mean": self.gap_abs / n, "logprob_gap_max": self.gap_max}


@torch.no_grad()
def rl_stats(objective: str, logp, old_logp, sampler_logp, advantages, mask, clip_low: float, clip_high: float,
             is_cap: float) -> RLStats:
    """The diagnostics' sums over the ``mask``'s tokens. Clipped: for grpo, tokens where the
    clipped term was the one taken (r below 1 - clip_low with A < 0, or above 1 + clip_high with
    A > 0, TRL's ``clip_ratio/region``); for cispo, tokens whose weight was clipped; reinforce
    clips nothing. The gap is the trainer's (as the job started) against the engine's."""
    m = mask.bool()
    r = policy_ratio(logp, old_logp)
    a = advantages.unsqueeze(-1).expand_as(r)
    low, high = r < 1 - clip_low, r > 1 + clip_high
    if objective == "grpo":
        clipped = (low & (a < 0)) | (high & (a > 0))
    elif objective == "cispo":
        clipped = low | high
    else:
        clipped = torch.zeros_like(m)
    gap = (old_logp - sampler_logp).abs()[m]
    return RLStats(tokens=float(m.sum()), sequences=int(advantages.numel()), ratio=float(r[m].sum()),
                   clipped=float(clipped[m].sum()), truncated=float((torch.exp(old_logp - sampler_logp) > is_cap)[m].sum()),
                   kl=float(k3_kl(logp, old_logp)[m].sum()), advantage=float(advantages.sum()),
                   gap_abs=float(gap.sum()), gap_max=float(gap.max()) if gap.numel() else 0.0)


def rl_token_loss(objective: str, logp, old_logp, sampler_logp, advantages, clip_low: float, clip_high: float,
                  is_cap: float, kl_coef: float = 0.0) -> torch.Tensor:
    """The objective's per-token loss, times the TIS weight, plus kl_coef times the k3 KL to ``old_logp``."""
    if objective == "grpo":
        loss = grpo_token_loss(logp, old_logp, advantages, clip_low, clip_high)
    elif objective == "cispo":
        loss = cispo_token_loss(logp, old_logp, advantages, clip_low, clip_high)
    elif objective == "reinforce":
        loss = reinforce_token_loss(logp, old_logp, advantages)
    else:
        raise ValueError(f"unknown objective {objective!r} (one of {OBJECTIVES})")
    loss = loss * truncated_is_weight(old_logp, sampler_logp, is_cap)
    return loss + kl_coef * k3_kl(logp, old_logp) if kl_coef else loss

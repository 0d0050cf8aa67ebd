"""Preference losses: plain functions of per-sequence log-probabilities, TRL's definitions.

Each takes, per pair, the policy's log-probability of the chosen and the rejected reply
(summed over the reply's tokens, or their mean where the objective uses lengths) and,
for the objectives with a reference, the reference policy's; and returns the per-pair
losses and the implicit rewards TRL logs. Names and formulas follow TRL
1.16: ``DPOTrainer``'s ``sigmoid`` and ``ipo`` loss types, with ``label_smoothing`` as
the conservative DPO of TRL's CPO trainer (and of ``sigmoid`` before TRL 1.0);
``CPOTrainer``'s ``simpo``; ``ORPOTrainer.odds_ratio_loss``) and, for DPOP, Pal et al.
2024 ("Smaug", eq. 3), which TRL does not ship.

- dpo:   -(1-ls) log s(b z) - ls log s(-b z),  z = (pi_c - pi_r) - (ref_c - ref_r)
- ipo:   (z - 1/(2b))^2 on mean log-probs (TRL averages over tokens for IPO)
- dpop:  -log s(b (z - lambda max(0, ref_c - pi_c)))
- orpo:  NLL(chosen) - lambda log s(log odds_c - log odds_r), odds = p / (1 - p) of the mean log-prob
- simpo: -(1-ls) log s(b (m_c - m_r - gamma/b)) - ls log s(-b (...)),  m = mean log-prob

Rewards: b (pi - ref) for the reference objectives, b x (mean) log-prob for orpo and simpo,
as TRL reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("dpo", "ipo", "dpop", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "ipo", "dpop")
AVERAGES_TOKENS = ("ipo", "orpo", "simpo")  # these use the mean log-prob per reply token


@dataclass
class PairLoss:
    losses: torch.Tensor  # (pairs,)
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0) -> PairLoss:
    logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    return PairLoss(_smoothed(logits, beta, label_smoothing), beta * (pi_chosen - ref_chosen).detach(),
                    beta * (pi_rejected - ref_rejected).detach())


def ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float) -> PairLoss:
    logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    return PairLoss((logits - 1 / (2 * beta)) ** 2, beta * (pi_chosen - ref_chosen).detach(),
                    beta * (pi_rejected - ref_rejected).detach())


def dpop_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float, dpop_lambda: float) -> PairLoss:
    logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    penalty = torch.clamp(ref_chosen - pi_chosen, min=0)  # the chosen reply's likelihood fell below the reference's
    return PairLoss(-F.logsigmoid(beta * (logits - dpop_lambda * penalty)), beta * (pi_chosen - ref_chosen).detach(),
                    beta * (pi_rejected - ref_rejected).detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(mean_chosen, mean_rejected, chosen_nll, beta: float, orpo_lambda: float) -> PairLoss:
    """``mean_*``: mean log-prob per reply token (< 0); ``chosen_nll``: the chosen reply's mean NLL.
    TRL's ``beta`` is both the odds-ratio weight and the reward scale; here they are
    ``orpo_lambda`` and ``beta`` (equal by default)."""
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    return PairLoss(chosen_nll - orpo_lambda * F.logsigmoid(log_odds), beta * mean_chosen.detach(), beta * mean_rejected.detach())


def simpo_loss(mean_chosen, mean_rejected, beta: float, simpo_gamma: float, label_smoothing: float = 0.0) -> PairLoss:
    logits = (mean_chosen - mean_rejected) - simpo_gamma / beta
    return PairLoss(_smoothed(logits, beta, label_smoothing), beta * mean_chosen.detach(), beta * mean_rejected.detach())


def metrics(pair: PairLoss, logps_chosen: torch.Tensor, logps_rejected: torch.Tensor) -> dict[str, float]:
    """TRL's logged numbers, averaged over the pairs."""
    return {
        "rewards/chosen": float(pair.chosen_rewards.mean()),
        "rewards/rejected": float(pair.rejected_rewards.mean()),
        "rewards/margins": float((pair.chosen_rewards - pair.rejected_rewards).mean()),
        "rewards/accuracies": float((pair.chosen_rewards > pair.rejected_rewards).float().mean()),
        "logps/chosen": float(logps_chosen.detach().mean()),
        "logps/rejected": float(logps_rejected.detach().mean()),
    }

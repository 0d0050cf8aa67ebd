"""Preference losses: hand-worked values, edge cases, and TRL 1.16's formulas on random log-probs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hogwild.training.preference_losses import dpo_loss, dpop_loss, ipo_loss, log1mexp, metrics, orpo_loss, simpo_loss


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_by_hand():
    # z = (pi_c - pi_r) - (ref_c - ref_r) = (-10 + 12) - (-11 + 11) = 2; beta 0.1: -log s(0.2) = log(1 + e^-0.2)
    pair = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert pair.losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-12)  # 0.598139
    assert pair.chosen_rewards.item() == pytest.approx(0.1) and pair.rejected_rewards.item() == pytest.approx(-0.1)
    m = metrics(pair, t(-10.0), t(-12.0))
    assert m == pytest.approx({"rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2,
                               "rewards/accuracies": 1.0, "logps/chosen": -10.0, "logps/rejected": -12.0})
    # label smoothing 0.1 (conservative DPO): 0.9 log(1 + e^-0.2) + 0.1 log(1 + e^0.2) = 0.618139
    smoothed = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)))


def test_dpo_edge_cases():
    # Equal log-probs: log 2, with or without smoothing, and zero rewards.
    for ls in (0.0, 0.1, 0.5):
        pair = dpo_loss(t(-5.0), t(-5.0), t(-5.0), t(-5.0), beta=0.1, label_smoothing=ls)
        assert pair.losses.item() == pytest.approx(math.log(2)) and pair.chosen_rewards.item() == 0.0
    # Very large margins stay finite: ~0 when right, ~beta z when wrong, ls * beta z smoothed.
    right = dpo_loss(t(0.0), t(-1000.0), t(0.0), t(0.0), beta=0.1)
    wrong = dpo_loss(t(-1000.0), t(0.0), t(0.0), t(0.0), beta=0.1)
    assert right.losses.item() == pytest.approx(0.0, abs=1e-40) and wrong.losses.item() == pytest.approx(100.0)
    assert dpo_loss(t(0.0), t(-1000.0), t(0.0), t(0.0), beta=0.1, label_smoothing=0.1).losses.item() == pytest.approx(10.0)
    assert all(torch.isfinite(p.losses).all() for p in (right, wrong))


def test_ipo_dpop_orpo_simpo_by_hand():
    # IPO: (z - 1/(2 beta))^2 = (2 - 5)^2
    assert ipo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1).losses.item() == pytest.approx(9.0)
    # DPOP: the chosen reply fell 1 below the reference: -log s(0.1 (3 - 5 * 1)) = log(1 + e^0.2)
    dpop = dpop_loss(t(-12.0), t(-15.0), t(-11.0), t(-11.0), beta=0.1, dpop_lambda=5.0)
    assert dpop.losses.item() == pytest.approx(math.log1p(math.exp(0.2)))
    assert dpop_loss(t(-10.0), t(-15.0), t(-11.0), t(-11.0), beta=0.1, dpop_lambda=5.0).losses.item() == \
        pytest.approx(dpo_loss(t(-10.0), t(-15.0), t(-11.0), t(-11.0), beta=0.1).losses.item())  # no penalty above the reference
    # ORPO: p_c = 1/2 (odds 1), p_r = 1/4 (odds 1/3): log odds ratio = log 3, log s(log 3) = log 3/4;
    # loss = NLL(chosen) - lambda log 3/4
    orpo = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), t(-math.log(0.5)), beta=0.1, orpo_lambda=0.1)
    assert orpo.losses.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.75))
    assert orpo.chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5))
    # SimPO: beta 2, gamma 0.5: -log s(2 (1 - 0.25)) = log(1 + e^-1.5)
    assert simpo_loss(t(-1.0), t(-2.0), beta=2.0, simpo_gamma=0.5).losses.item() == pytest.approx(math.log1p(math.exp(-1.5)))


def test_log1mexp_is_accurate_at_both_ends():
    x = t(-1e-12, -0.5, -0.7, -30.0)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x.to(torch.float64))), rtol=1e-6)
    assert log1mexp(t(-1e-12)).item() == pytest.approx(math.log(1e-12), rel=1e-9)


# TRL 1.16's formulas, transcribed from trl/trainer/dpo_trainer.py (``_compute_loss``: sigmoid,
# ipo), trl/experimental/cpo/cpo_trainer.py (``cpo_loss``: sigmoid with label smoothing, simpo)
# and trl/experimental/orpo/orpo_trainer.py (``odds_ratio_loss``).
def trl_sigmoid(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def trl_ipo(pc, pr, rc, rr, len_c, len_r, beta):
    chosen_avg, rejected_avg = (pc - rc) / len_c.clamp(min=1.0), (pr - rr) / len_r.clamp(min=1.0)
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2


def trl_cpo_sigmoid(pc, pr, beta, ls):
    logits = pc - pr
    return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls


def trl_simpo(pc, pr, beta, gamma, ls):
    logits = (pc - pr) - gamma / beta
    return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls


def trl_orpo_ratio(pc, pr, beta):
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    return beta * F.logsigmoid(log_odds)


def test_agreement_with_trl_on_random_log_probs():
    g = torch.Generator().manual_seed(0)
    n = 256
    lengths_c, lengths_r = torch.randint(1, 40, (n,), generator=g).double(), torch.randint(1, 40, (n,), generator=g).double()
    pc, pr = -torch.rand(n, generator=g, dtype=torch.float64) * 3 * lengths_c, -torch.rand(n, generator=g, dtype=torch.float64) * 3 * lengths_r
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64), pr + torch.randn(n, generator=g, dtype=torch.float64)
    beta, ls, gamma = 0.1, 0.1, 0.5
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta).losses, trl_sigmoid(pc, pr, rc, rr, beta))
    # conservative DPO: TRL's CPO sigmoid is the same formula with the reference log-ratios folded in
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta, ls).losses, trl_cpo_sigmoid(pc - rc, pr - rr, beta, ls))
    assert torch.allclose(ipo_loss(pc / lengths_c, pr / lengths_r, rc / lengths_c, rr / lengths_r, beta).losses,
                          trl_ipo(pc, pr, rc, rr, lengths_c, lengths_r, beta))
    mc, mr = pc / lengths_c, pr / lengths_r
    assert torch.allclose(simpo_loss(mc, mr, beta, gamma, ls).losses, trl_simpo(mc, mr, beta, gamma, ls))
    orpo = orpo_loss(mc, mr, -mc, beta=beta, orpo_lambda=beta)
    assert torch.allclose(orpo.losses, -mc - trl_orpo_ratio(mc, mr, beta))  # TRL: nll - mean(losses)
    assert torch.allclose(orpo.chosen_rewards, beta * mc)

"""The guards and the circuit-breaker schedule, against the owner's worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from hogwild.contracts.circuit_breaker_config import CBConfig
from hogwild.training import guards
from hogwild.training.circuit_breaker import schedule


def test_adaptive_lambda_reproduces_the_worked_numbers():
    first = guards.adaptive_lambda(main=0.001, aux=0.10, target_frac=0.20)
    assert first.lam == pytest.approx(0.002) and first.rho == pytest.approx(0.20) and not first.rescaled
    second = guards.adaptive_lambda(main=0.001, aux=1.0, target_frac=0.30)
    # 0.001 * 0.30 / 1.0 = 0.0003 would give rho 0.30 > 0.25: rescaled to 0.00025.
    assert second.rescaled and second.lam == pytest.approx(0.00025) and second.rho == pytest.approx(0.25)
    assert guards.adaptive_lambda(1.0, 1e-9, 0.2).lam <= 0.02  # clamped above ...
    assert guards.adaptive_lambda(1.0, 1000.0, 0.05).lam == pytest.approx(1e-4)  # ... and below (rho 0.1)


def test_gap_and_ratio_reproduce_the_worked_numbers():
    gap, ratio = guards.gap_and_ratio(-0.058, -0.519)
    assert gap == pytest.approx(0.461, abs=1e-3) and ratio == pytest.approx(0.799, abs=1e-3)
    gap_t, ratio_t = guards.gap_and_ratio(torch.tensor(-0.058), torch.tensor(-0.519))
    assert gap_t.item() == pytest.approx(gap) and ratio_t.item() == pytest.approx(ratio, abs=1e-6)


def test_the_dual_schedule_follows_the_formula():
    assert schedule(0, 300, 0.5) == pytest.approx((0.5, 0.5))
    assert schedule(150, 300, 0.5) == pytest.approx((0.375, 0.75))
    assert schedule(300, 300, 0.5) == pytest.approx((0.25, 1.0))
    assert schedule(900, 300, 0.5)[0] == 0.0  # never negative


def test_presets_fill_what_is_not_given():
    stage1 = CBConfig(preset="stage1")
    assert (stage1.alpha_max, stage1.target_layers, stage1.lr, stage1.steps, stage1.max_grad_norm) == (10.0, [10, 20], 5e-5, 500, 1.0)
    stage2 = CBConfig(preset="stage2", lr=1e-4)
    assert (stage2.alpha_max, stage2.target_layers, stage2.lr, stage2.steps, stage2.max_grad_norm) == (0.5, [15], 1e-4, 300, 0.5)


def test_hinges_floor_and_norm_penalty():
    assert guards.softplus_hinge(torch.tensor(10.0), margin=0.5).item() == pytest.approx(0.0, abs=1e-6)
    assert guards.softplus_hinge(torch.tensor(-10.0), margin=0.5).item() == pytest.approx(10.5, abs=1e-3)
    assert guards.positive_floor(torch.tensor(0.5), tau=0.9).item() == pytest.approx(0.16)
    assert guards.positive_floor(torch.tensor(0.95), tau=0.9).item() == 0.0
    assert guards.norm_penalty(torch.tensor([[3.0, 4.0]])).item() == pytest.approx(16.0)
    # A larger gap and ratio lower the directional loss.
    assert guards.directional_loss(torch.tensor(0.9), torch.tensor(-0.5)) < guards.directional_loss(torch.tensor(0.3), torch.tensor(0.2))


def test_bad_signs_boost_and_phases():
    assert guards.signs_bad(-0.1, -0.5) and guards.signs_bad(0.01, -0.2)
    assert not guards.signs_bad(0.9, -0.2) and not guards.signs_bad(0.01, 0.3)
    assert guards.boost(torch.tensor(0.60)).item() == pytest.approx(0.5)
    assert guards.boost(torch.tensor(0.95)).item() > 0.99 and guards.boost(torch.tensor(0.2)).item() < 0.01
    phases = guards.PhaseSchedule(warmup=0.1, strong_from=0.6, target_frac=0.2)
    assert [phases.frac(t, 100) for t in (0, 9, 10, 59, 60, 99)] == [0, 0, 0.2, 0.2, 0.4, 0.4]


def test_tripwires():
    assert guards.Tripwire().check_loss(math.nan) and guards.Tripwire().check_loss(math.inf)
    assert guards.Tripwire().check_loss(1.0) is None
    pinned = guards.Tripwire(rho_cap=0.25, rho_pinned_steps=3)
    assert [pinned.check_rho(r) for r in (0.25, 0.25, 0.1, 0.25, 0.25)] == [None] * 5  # broken runs reset
    assert pinned.check_rho(0.25) is not None
    val = guards.Tripwire(max_val_drop=0.25, val_patience=2)
    assert val.check_validation(1.0) is None and val.check_validation(0.8) is None
    assert val.check_validation(0.7) is None and not val.healthy  # a dip, once
    assert val.check_validation(0.9) is None and val.healthy  # ... recovered
    assert val.check_validation(0.7) is None
    assert "fell from 1.0000 to 0.6000" in val.check_validation(0.6)  # stayed down

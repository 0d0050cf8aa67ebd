"""Guards that keep one loss from overwhelming another, and tripwires that stop
a run that is collapsing. Plain functions of tensors and numbers, plus two
small stateful helpers, usable by any trainer.

The owner's worked numbers (``tests/test_guards.py``): main 0.001, aux 0.10,
frac 0.20 -> lambda 0.002, rho 0.20; frac 0.30, aux 1.0 -> lambda 0.0003,
rescaled to 0.00025 (rho capped at 0.25); cos (-0.058, -0.519) -> gap 0.461,
ratio 0.799.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def gap_and_ratio(cos_pos, cos_neg, eps: float = 1e-6):
    """The directional gap ``cos_pos - cos_neg`` and its scale-aware form
    ``gap / (|cos_pos| + |cos_neg| + eps)``: the ratio stays informative when
    both cosines shrink towards 0 together (the easy, collapsed solution)."""
    gap = cos_pos - cos_neg
    return gap, gap / (abs(cos_pos) + abs(cos_neg) + eps)


def softplus_hinge(x: torch.Tensor, margin: float, gamma: float = 4.0) -> torch.Tensor:
    """A smooth ``max(0, margin - x)``: ``softplus(gamma (margin - x)) / gamma``."""
    return F.softplus(gamma * (margin - x)) / gamma


def directional_loss(cos_pos: torch.Tensor, cos_neg: torch.Tensor, alpha: float = 0.5, gap_margin: float = 0.5,
                     ratio_margin: float = 0.8, gamma: float = 4.0) -> torch.Tensor:
    """``alpha * hinge(gap) + (1 - alpha) * hinge(ratio)``, softplus hinges."""
    gap, ratio = gap_and_ratio(cos_pos, cos_neg)
    return alpha * softplus_hinge(gap, gap_margin, gamma) + (1 - alpha) * softplus_hinge(ratio, ratio_margin, gamma)


def positive_floor(cos_pos: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """``ReLU(tau - cos_pos)^2``: the positive side may not sink below ``tau``."""
    return torch.relu(tau - cos_pos) ** 2


def norm_penalty(x: torch.Tensor) -> torch.Tensor:
    """``(||x|| - 1)^2`` per row, averaged (``x`` is a ratio of norms or a direction)."""
    norms = x.norm(dim=-1) if x.dim() else x.abs()
    return ((norms - 1) ** 2).mean()


@dataclass(frozen=True)
class LambdaChoice:
    lam: float
    rho: float  # lam * aux / main after rescaling
    rescaled: bool


def adaptive_lambda(main: float, aux: float, target_frac: float, lo: float = 1e-4, hi: float = 0.02,
                    rho_cap: float = 0.25, eps: float = 1e-12) -> LambdaChoice:
    """Weight of an auxiliary loss so that it is ``target_frac`` of the main one:
    ``clamp(main * target_frac / aux, lo, hi)``, then scaled down so that
    ``rho = lam * aux / main`` never exceeds ``rho_cap``."""
    lam = min(max(main * target_frac / max(aux, eps), lo), hi)
    rho = lam * aux / max(main, eps)
    if rho > rho_cap:
        lam, rho = rho_cap * max(main, eps) / max(aux, eps), rho_cap
        return LambdaChoice(lam, rho, True)
    return LambdaChoice(lam, rho, False)


def signs_bad(cos_pos: float, cos_neg: float) -> bool:
    """The auxiliary term would push the wrong way: the positive side has flipped,
    or both sides sit around zero with the negative already below it."""
    return cos_pos < 0 or (cos_pos < 0.05 and cos_neg < -0.05)


def boost(sim: torch.Tensor, center: float = 0.60, width: float = 0.05) -> torch.Tensor:
    """Per-sample weight ``sigmoid((sim - center) / width)``: ~1 for samples still
    close to where they started (the easy solution is to leave them), ~0 for those
    already moved."""
    return torch.sigmoid((sim - center) / width)


@dataclass(frozen=True)
class PhaseSchedule:
    """Auxiliary strength over a run: off while the main loss warms up, then on,
    then stronger."""

    warmup: float = 0.1  # fraction of steps with the auxiliary term off
    strong_from: float = 0.6  # fraction of steps after which it is doubled
    target_frac: float = 0.2

    def frac(self, step: int, total: int) -> float:
        t = step / max(total, 1)
        if t < self.warmup:
            return 0.0
        return self.target_frac * (2.0 if t >= self.strong_from else 1.0)


@dataclass
class GuardCounters:
    """What the guards did during a run, for the diagnostics."""

    skipped_bad_signs: int = 0
    rescaled: int = 0
    aux_steps: int = 0
    rho_at_cap_run: int = 0  # consecutive steps with rho at its cap


@dataclass
class Tripwire:
    """Stops a run that is going wrong. ``check`` returns why, or None.

    - a loss that is NaN or Inf;
    - rho pinned at its cap for ``rho_pinned_steps`` steps in a row (the
      auxiliary term is fighting the main one and losing);
    - a validation metric (higher is better) falling by more than
      ``max_val_drop`` of its first value for ``val_patience`` checks in a row
      (a run may dip for a moment while the main loss finds its way; a
      collapse stays down).
    """

    rho_cap: float = 0.25
    rho_pinned_steps: int = 20
    max_val_drop: float = 0.25
    val_patience: int = 2
    first_val: float | None = None
    pinned: int = 0
    below: int = 0
    history: list = field(default_factory=list)

    def check_loss(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        return None

    def check_rho(self, rho: float | None) -> str | None:
        self.pinned = self.pinned + 1 if rho is not None and rho >= self.rho_cap * (1 - 1e-6) else 0
        if self.pinned >= self.rho_pinned_steps:
            return f"rho stayed at its cap ({self.rho_cap}) for {self.pinned} steps"
        return None

    def check_validation(self, value: float) -> str | None:
        self.history.append(value)
        if not math.isfinite(value):
            return f"the validation metric is {value}"
        if self.first_val is None:
            self.first_val = value
            return None
        drop = (self.first_val - value) / max(abs(self.first_val), 1e-12)
        self.below = self.below + 1 if drop > self.max_val_drop else 0
        if self.below >= self.val_patience:
            return (f"the validation metric fell from {self.first_val:.4f} to {value:.4f} (by {drop:.0%}, limit "
                    f"{self.max_val_drop:.0%}, {self.below} checks in a row)")
        return None

    @property
    def healthy(self) -> bool:
        """The last validation was within bounds: a state worth rolling back to."""
        return self.below == 0

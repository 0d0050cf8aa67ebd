"""Options of a preference job: the objective and its settings, and every optimizer and
loop setting SFT has (the same optimizer steps both)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .sft_config import SFTOptions

Objective = Literal["dpo", "ipo", "dpop", "orpo", "simpo"]


class PreferenceOptions(SFTOptions):
    """Defaults as TRL's, where it has them (``DPOConfig``: beta 0.1, lr 1e-6)."""

    objective: Objective = Field("dpo", description="dpo | ipo | dpop (DPO with a penalty when the chosen reply's "
                                 "likelihood falls below the reference's) | orpo | simpo")
    beta: float = Field(0.1, gt=0, le=100, allow_inf_nan=False, description="the preference loss's temperature")
    lr: float = Field(1e-6, gt=0, le=1, allow_inf_nan=False, description="peak learning rate")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo, simpo: the chance a label is flipped (cDPO)")
    dpop_lambda: float = Field(50.0, ge=0, le=1e4, description="dpop: weight of the penalty (Pal et al. 2024 use 50)")
    orpo_lambda: float = Field(0.1, ge=0, le=100, description="orpo: weight of the odds-ratio term against the SFT loss")
    simpo_gamma: float = Field(0.5, ge=0, le=100, description="simpo: the target reward margin")

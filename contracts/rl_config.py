"""Options of an RL job (``mode: rl``): the objective and its settings, and every optimizer
and loop setting SFT has (the same optimizer steps every full-weight mode). The formulas are
in ``hogwild.training.rl_losses``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .sft_config import SFTOptions

RLObjective = Literal["grpo", "cispo", "reinforce"]
LossType = Literal["bnpo", "dr_grpo"]
HeadName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class RLOptions(SFTOptions):
    """Defaults: TRL's GRPOConfig where it has them (lr 1e-6, scale_rewards), DAPO's clip range."""

    objective: RLObjective = Field("grpo", description="grpo (PPO-style clipped surrogate on each token's ratio) | cispo "
                                   "(clipped, stop-gradient importance weight on every token, MiniMax-M1) | reinforce "
                                   "(importance-weighted policy gradient, Tinker's importance_sampling)")
    lr: float = Field(1e-6, gt=0, le=1, allow_inf_nan=False, description="peak learning rate")
    clip_low: float = Field(0.2, gt=0, lt=1, allow_inf_nan=False,
                            description="grpo, cispo: the ratio's lower bound is 1 - clip_low")
    clip_high: float = Field(0.28, gt=0, le=100, allow_inf_nan=False,
                             description="grpo, cispo: the ratio's upper bound is 1 + clip_high (DAPO's clip-higher: 0.28)")
    is_cap: float = Field(2.0, ge=1, le=1e6, allow_inf_nan=False,
                          description="truncated importance sampling: the weight from the sampling engine's "
                          "log-probs to the trainer's at the job's start is capped here")
    kl_coef: float = Field(0.0, ge=0, le=100, allow_inf_nan=False,
                           description="weight of the KL (k3) to the weights as they were when the job started; 0: none")
    scale_rewards: bool = Field(True, description="divide each group's centred rewards by the group's std")
    loss_type: LossType = Field("bnpo", description="bnpo: the mean over every completion token of a step | dr_grpo: "
                                "the sum over them / (samples x max_completion_length)")
    max_completion_length: int | None = Field(None, ge=1, le=1 << 20, description="dr_grpo's constant; default: the "
                                              "longest completion of the job")
    max_staleness: int | None = Field(None, ge=0, le=1 << 40, description="refuse samples drawn more than this many "
                                      "weight versions ago (each sample's weights_version: the X-Hogwild-Weights-Version "
                                      "its completion was answered with); checked when the job is queued and again when "
                                      "it starts; None: any age")
    reward_heads: dict[HeadName, Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, min_length=1, description="instead of each sample's reward: the weighted sum of these reward heads' scores "
        "(head -> weight), each head scoring context + completion at its last token with the live weights, once, before "
        "the first step; the samples then give only their group")

"""Options of a full-weight training job (SFT, and preference training, which shares them):
the optimizer's (APOLLO) and the loop's, with their defaults and bounds."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Rounding = Literal["stochastic", "nearest"]

APOLLO_NORM_GROWTH_LIMIT = 1.01  # fixed inside apollo-torch 1.0.3 (Fira's limiter)


class ApolloStructure(BaseModel):
    """Settings baked into the optimizer's projectors: changing any of them
    builds a new optimizer (its moments start from zero)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rank: int = Field(64, ge=1, le=65536, description="rank of the gradient projection")
    proj: Literal["random", "svd"] = Field("random", description="projection: random (APOLLO) or svd (GaLore-style)")
    proj_type: Literal["std", "reverse_std", "left", "right"] = Field("std", description="which side of the matrix is projected")
    update_proj_gap: int = Field(200, ge=1, description="optimizer steps between new projections")
    scale_front: bool = Field(False, description="apply sqrt(scale) before the norm-growth limiter")
    norm_growth_limit: float | None = Field(
        APOLLO_NORM_GROWTH_LIMIT,
        description="Fira norm-growth limiter: 1.01 (on, the only ratio apollo-torch implements) or null (off)",
    )

    @field_validator("norm_growth_limit")
    @classmethod
    def _only_supported_limit(cls, value: float | None) -> float | None:
        if value is not None and value != APOLLO_NORM_GROWTH_LIMIT:
            raise ValueError(
                f"apollo-torch fixes the norm-growth limit at {APOLLO_NORM_GROWTH_LIMIT}; "
                "pass 1.01 to keep the limiter or null to disable it"
            )
        return value


class ApolloHyper(BaseModel):
    """Settings read at every step: updated in place on the live optimizer."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    lr: float = Field(1e-5, gt=0, le=1, allow_inf_nan=False, description="peak learning rate")
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2, description="Adam betas")
    eps: float = Field(1e-6, gt=0, le=1, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="decoupled weight decay")
    correct_bias: bool = True
    scale_type: Literal["channel", "tensor"] = Field("channel", description="granularity of the gradient scaling")
    scale: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="APOLLO update scale (128 for APOLLO-Mini)")
    rounding: Rounding | None = Field(
        None, description="how updates are written into bf16/fp16 weights: stochastic (unbiased; the default for them) "
        "or nearest (small updates round away); fp32 weights are written exactly either way")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: list[float]) -> list[float]:
        for beta in value:
            if not (0.0 <= beta < 1.0):
                raise ValueError(f"each beta must be in [0, 1), got {beta}")
        return value


class SFTOptions(ApolloStructure, ApolloHyper):
    """Every optimizer and loop setting of a supervised job, with defaults."""

    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="linear lr warm-up over the optimizer's first N steps (global)")
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False, description="clip the global gradient norm; null disables")
    steps: int | None = Field(None, ge=1, le=100_000, description="optimizer steps for this job; default epochs x batches")
    epochs: int = Field(1, ge=1, le=10_000, description="passes over the samples (ignored when steps is set)")
    batch_size: int | None = Field(None, ge=1, description="samples per optimizer step; default all samples")
    micro_batch_size: int = Field(8, ge=1, le=4096, description="samples per forward pass (gradient accumulation)")
    shuffle: bool = Field(True, description="shuffle samples each epoch")
    seed: int = Field(0, ge=0, description="seed of the shuffle (and of the rounding noise)")
    reset_optimizer: bool = Field(False, description="start this job with a new optimizer (moments and projections "
                                  "from zero), as a new training run would; by default one optimizer carries over")
    eval_tokens: int = Field(4096, ge=0, le=1 << 24, description="loss_before and loss_after are measured on the job's "
                             "first samples up to this many continuation tokens (at least one sample); 0: not measured")

    def structure(self) -> ApolloStructure:
        return ApolloStructure(**{k: getattr(self, k) for k in ApolloStructure.model_fields})

    def hyper(self) -> ApolloHyper:
        return ApolloHyper(**{k: getattr(self, k) for k in ApolloHyper.model_fields})


def count_steps(n_samples: int, options: SFTOptions) -> int:
    """How many optimizer steps a job of ``n_samples`` takes."""
    if options.steps is not None:
        return options.steps
    return options.epochs * math.ceil(n_samples / (options.batch_size or n_samples))

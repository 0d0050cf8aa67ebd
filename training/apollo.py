"""APOLLO optimizer set-up (``apollo-torch``) for full-weight training.

APOLLO keeps Adam moments for a low-rank random projection of each weight
matrix's gradient and uses them only to estimate a per-channel (or per-tensor)
scaling of the raw gradient, so its state is a small fraction of AdamW's. As in
the APOLLO paper, the projection applies to the 2-D weights of the transformer
blocks; embeddings, the LM head, norms and biases get plain AdamW moments from
the same optimizer (a parameter group without ``rank``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

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

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: list[float]) -> list[float]:
        for beta in value:
            if not (0.0 <= beta < 1.0):
                raise ValueError(f"each beta must be in [0, 1), got {beta}")
        return value


def is_projected(name: str, param: torch.nn.Parameter) -> bool:
    """The parameters APOLLO projects: 2-D weights inside the decoder blocks."""
    return param.ndim == 2 and ".layers." in f".{name}"


def build_optimizer(model: torch.nn.Module, structure: ApolloStructure, hyper: ApolloHyper):
    """An ``apollo_torch.APOLLOAdamW`` over every trainable parameter of ``model``."""
    from apollo_torch import APOLLOAdamW

    projected, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (projected if is_projected(name, param) else plain).append(param)
    groups = [{"params": plain}]
    if projected:
        groups.append(
            {
                "params": projected,
                "rank": structure.rank,
                "proj": structure.proj,
                "proj_type": structure.proj_type,
                "update_proj_gap": structure.update_proj_gap,
                "scale_type": hyper.scale_type,
                "scale": hyper.scale,
            }
        )
    optimizer = APOLLOAdamW(
        groups,
        lr=hyper.lr,
        betas=tuple(hyper.betas),
        eps=hyper.eps,
        weight_decay=hyper.weight_decay,
        correct_bias=hyper.correct_bias,
        scale_front=structure.scale_front,
        disable_nl=structure.norm_growth_limit is None,
    )
    apply_hyper(optimizer, hyper, lr=hyper.lr)
    return optimizer


def apply_hyper(optimizer: torch.optim.Optimizer, hyper: ApolloHyper, lr: float) -> None:
    """Set the per-step settings on every parameter group (``lr`` after warm-up)."""
    for group in optimizer.param_groups:
        group.update(lr=lr, betas=tuple(hyper.betas), eps=hyper.eps, weight_decay=hyper.weight_decay, correct_bias=hyper.correct_bias)
        if "rank" in group:
            group.update(scale_type=hyper.scale_type, scale=hyper.scale)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in tensors of the optimizer's state (moments, projections)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "__dict__"):  # projector objects hold their matrices
                total += sum(v.numel() * v.element_size() for v in vars(value).values() if isinstance(v, torch.Tensor))
    return total

"""Options of a reward-head (BTRM) training job: the heads, their sources, the loss and the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_TIER_WEIGHTS = {"soft_neg": 2.0, "semi_firm_neg": 1.0, "furthest_neg": 0.5}


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    text_field: str = "auto"
    tier_filter: list[str] | None = None
    neg_tier: str | None = None  # negatives only; default: the config's default_neg_tier

    @field_validator("tier_filter", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class HeadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    positive_sources: list[SourceSpec] = Field(min_length=1)
    negative_sources: list[SourceSpec] = []


class BTRMConfig(BaseModel):
    """Everything a BTRM training run needs; every field but ``heads`` has a default."""

    model_config = ConfigDict(extra="forbid")
    heads: list[HeadSpec] = Field(min_length=1)
    shared_negatives: list[SourceSpec] = []
    meta_prompt: str = "Read the passage below.\n\nPassage:\n{text}\n\nEnd of passage."
    tier_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    default_neg_tier: str = "semi_firm_neg"
    cap: float = Field(10.0, ge=0)
    logsq: Literal["squared", "literal"] = "squared"
    logsq_lambda: float = Field(0.1, ge=0)
    lr: float = Field(3e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(300, ge=1, le=100_000)
    batch_size: int = Field(64, ge=2, le=65536)
    held_out_fraction: float = Field(0.2, ge=0, lt=1)
    max_length: int = Field(256, ge=8, le=1 << 16)
    seed: int = 0
    trunk_lora: bool = Field(False, description="train a LoRA (r=16, alpha=32) on the trunk with the heads; "
                             "private to the heads, never merged into the served weights")
    trunk_lora_epochs: int = Field(3, ge=1, le=1000, description="with trunk_lora: epochs of heads and adapter "
                                   "together, after ``epochs`` of the heads alone on the trunk's features")
    trunk_lora_lr: float = Field(3e-5, gt=0, le=1, description="the trunk LoRA's learning rate (the heads keep lr)")
    max_grad_norm: float = Field(1.0, gt=0, description="with trunk_lora: gradient clipping, heads and adapter together")

    @model_validator(mode="after")
    def _consistent(self) -> "BTRMConfig":
        if "{text}" not in self.meta_prompt:
            raise ValueError("meta_prompt must contain {text}")
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names must be distinct: {names}")
        tiers = {s.neg_tier or self.default_neg_tier for h in self.heads for s in h.negative_sources}
        tiers |= {s.neg_tier or self.default_neg_tier for s in self.shared_negatives}
        unknown = tiers - set(self.tier_weights)
        if unknown:
            raise ValueError(f"negative tiers {sorted(unknown)} have no weight in tier_weights {self.tier_weights}")
        return self

    def wrap(self, text: str) -> str:
        return self.meta_prompt.replace("{text}", text)


def load_config(path: Path) -> BTRMConfig:
    import yaml

    return BTRMConfig.model_validate(yaml.safe_load(Path(path).read_text()))


def effective_negatives_per_head(config: BTRMConfig) -> dict[str, list[SourceSpec]]:
    """Each head's negative sources with the shared negatives merged in."""
    return {h.name: [*h.negative_sources, *config.shared_negatives] for h in config.heads}

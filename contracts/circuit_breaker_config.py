"""Options and samples of a circuit-breaker LoRA job."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PRIORITY_WEIGHTS = {
    "adversarial_safe": 2.0,
    "injection_resisted": 1.5,
    "benign_twin": 1.2,
    "tool_capability": 1.0,
    "general_conversation": 0.8,
    "borderline": 1.0,
    "harmful_flip": 1.0,
}

# The optional curriculum: (start fraction of steps, class weights). First hold on
# to capability (retain-side classes up), then the default mix, then lean on the
# hard cases. The owner's notes name the three phases; these weights are ours.
CURRICULUM = (
    (0.0, {**PRIORITY_WEIGHTS, "general_conversation": 1.2, "tool_capability": 1.5, "adversarial_safe": 1.0}),
    (0.3, PRIORITY_WEIGHTS),
    (0.7, {**PRIORITY_WEIGHTS, "adversarial_safe": 3.0, "injection_resisted": 2.0, "harmful_flip": 1.5}),
)

PRESETS = {
    "stage1": {"alpha_max": 10.0, "target_layers": [10, 20], "lr": 5e-5, "steps": 500, "max_grad_norm": 1.0},
    "stage2": {"alpha_max": 0.5, "target_layers": [15], "lr": 3e-5, "steps": 300, "max_grad_norm": 0.5},
}


class CBSample(BaseModel):
    """One conversation as token ids, with its label."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[int] = Field(min_length=2, max_length=1_048_576)
    split: Literal["harmful", "retain"]
    priority_class: str = Field("general_conversation", max_length=64)
    id: str | None = Field(None, max_length=256)


class CBConfig(BaseModel):
    """Every setting of a circuit-breaker run. ``preset`` fills the fields it
    names unless they are given explicitly."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["stage1", "stage2"] | None = None
    target_layers: list[int] = Field([15], min_length=1, description="clamped to the model's depth")
    r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    alpha_max: float = Field(0.5, gt=0, le=100, description="cs(t) = alpha_max * max(0, 1 - t/(2T))")
    lr: float = Field(3e-5, gt=0, le=1)
    steps: int = Field(300, ge=1, le=100_000)
    max_grad_norm: float | None = Field(0.5, gt=0)
    batch_size: int = Field(4, ge=1, le=256, description="harmful and retain samples per step, each")
    loss_mask: Literal["assistant", "all"] = Field("assistant", description="assistant responses only, or every token")
    priority_weights: dict[str, float] = Field(default_factory=lambda: dict(PRIORITY_WEIGHTS))
    curriculum: bool = False
    guards: bool = True
    target_frac: float = Field(0.2, ge=0, le=1, description="the guards' auxiliary term as a fraction of the main loss")
    eval_every: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)
    max_val_drop: float = Field(0.25, gt=0, le=1, description="tripwire: the retain cosine may fall this fraction")
    val_patience: int = Field(2, ge=1, description="... for this many evaluations in a row before the run stops")
    rho_pinned_steps: int = Field(20, ge=1)
    coherence_prompts: list[list[int]] | None = Field(None, description="default: the retain samples' prompts")
    coherence_tokens: int = Field(24, ge=1, le=512)
    max_word_run: int = Field(6, ge=2, description="a word repeated this many times in a row fails coherence, "
                              "unless the model without the adapter repeats as long on that prompt")
    min_vocab_ratio: float = Field(0.5, ge=0, le=1, description="distinct words vs. the original model's")
    seed: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = {**PRESETS[data["preset"]], **data}
        return data

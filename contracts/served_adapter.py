"""Adapters trained on the served base and served by vLLM's multi-LoRA: what a job asks
for (``AdapterSpec``), the ``/train`` fields that carry it (``AdapterFields``) and what
the trainer reports of each adapter it holds (``ServedAdapter``).

An adapter is a PEFT LoRA on the frozen base. Its shape (rank, alpha, dropout, target
modules) is fixed by the job that creates it; a later job that names a different shape is
refused rather than silently reshaping it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # also a directory name and a vLLM model name
DEFAULT_RANK = 16  # vLLM's default --max-lora-rank
DEFAULT_ALPHA = 32.0  # PEFT's scaling alpha / rank = 2, as TRL's LoRA examples
DEFAULT_DROPOUT = 0.0


def quantized_base_refusal(method: str) -> str:
    """Why a job that is not an adapter's is refused on a quantized base (the API server and
    the trainer say the same)."""
    return (f"the served base is quantized ({method}): its weights cannot be trained in place; train an adapter on "
            'it instead (send "adapter": "<name>", with vllm serve --enable-lora)')


class AdapterSpec(BaseModel):
    """The adapter a job trains. ``None`` fields: the adapter's own (an existing one), else the default."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=ADAPTER_NAME)
    rank: int | None = Field(None, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    dropout: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)
    targets: list[str] | None = Field(None, min_length=1, max_length=64, description="module names (leaf, e.g. q_proj)")

    def with_defaults(self) -> AdapterSpec:
        return self.model_copy(update={"rank": self.rank or DEFAULT_RANK, "alpha": self.alpha or DEFAULT_ALPHA,
                                       "dropout": DEFAULT_DROPOUT if self.dropout is None else self.dropout})


class AdapterFields(BaseModel):
    """The ``/train`` fields that make a job train an adapter instead of the full weights."""

    adapter: str | None = Field(None, pattern=ADAPTER_NAME, description="train this adapter on the frozen base "
                                "(created by its first job; served as model <adapter> with --enable-lora)")
    adapter_rank: int | None = Field(None, ge=1, le=1024, description=f"LoRA rank of a new adapter (default {DEFAULT_RANK})")
    adapter_alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False,
                                        description=f"LoRA alpha of a new adapter (default {DEFAULT_ALPHA:g}; scaling alpha/rank)")
    adapter_dropout: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False,
                                          description=f"LoRA dropout of a new adapter (default {DEFAULT_DROPOUT:g})")
    adapter_targets: list[str] | None = Field(None, min_length=1, max_length=64, description="module names a new adapter "
                                              "adapts (default: every linear layer of the decoder blocks but MoE routers)")

    def adapter_spec(self) -> AdapterSpec | None:
        """The adapter asked for; None for a full-weight job (then no other adapter field may be set)."""
        shape = {"rank": self.adapter_rank, "alpha": self.adapter_alpha, "dropout": self.adapter_dropout,
                 "targets": self.adapter_targets}
        if self.adapter is None:
            given = [f"adapter_{k}" for k, v in shape.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} without adapter: name the adapter to train")
            return None
        return AdapterSpec(name=self.adapter, **shape)


class ServedAdapter(BaseModel):
    """An adapter the trainer holds (``/train/status`` ``served_adapters``), as the API server
    registers it with vLLM: ``path`` is its live PEFT directory, ``version`` one more for each
    optimizer step (the API server reloads it into vLLM when it changes)."""

    name: str
    version: int
    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    path: str
    steps: int = 0
    created_at: float
    updated_at: float

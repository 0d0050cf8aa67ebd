"""Request and response bodies of the plugin's HTTP routes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from hogwild.training.sft import SFTOptions
from hogwild.worker.protocol import TokenId, TrainSample


class TrainRequest(SFTOptions):
    """``POST /train``: samples as token ids, and every optimizer setting as an
    optional top-level field (defaults in ``SFTOptions``)."""

    samples: list[TrainSample] = Field(min_length=1)
    mode: Literal["sft"] = "sft"
    wait: bool = Field(False, description="answer when the job is done (else at once, with its id)")

    def options(self) -> SFTOptions:
        return SFTOptions(**{k: getattr(self, k) for k in SFTOptions.model_fields})


ScoreRange = Annotated[list[int], Field(min_length=2, max_length=2)]


class ScoreRequest(BaseModel):
    """``POST /v1/score``: total log-likelihood of token ranges of a prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: list[TokenId] = Field(min_length=1)
    score_ranges: list[ScoreRange] = Field(min_length=1, description="half-open [start, end) positions into prompt")
    logprobs: int = Field(1, ge=0, le=20, description="accepted for client compatibility; totals use the prompt tokens' own logprobs")


class CheckpointRequest(BaseModel):
    """``POST /checkpoint``: sync the served weights to disk now."""

    model_config = ConfigDict(extra="forbid", strict=True)
    target: str | None = Field(None, max_length=4096, description="a model directory; default: the served one")


class RangeScore(BaseModel):
    range_index: int
    total_logprob: float
    n_tokens: int


class ScoreResponse(BaseModel):
    scores: list[RangeScore]

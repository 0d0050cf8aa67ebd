"""Request and response bodies of the plugin's HTTP routes."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from hogwild.contracts.btrm_config import BTRMConfig
from hogwild.contracts.circuit_breaker_config import CBConfig, CBSample
from hogwild.contracts.jobs import BTRMSample, PreferenceSample, RLSample, TokenId, TrainSample, reward_source_problem
from hogwild.contracts.preference_config import PreferenceOptions
from hogwild.contracts.rl_config import RLOptions
from hogwild.contracts.served_adapter import AdapterFields
from hogwild.contracts.sft_config import SFTOptions

from .http_errors import UNION_TAGS


class TrainRequest(SFTOptions, AdapterFields):
    """``POST /train``: samples as token ids, and every optimizer setting as an
    optional top-level field (defaults in ``SFTOptions``); with ``adapter``, the job
    trains that adapter on the frozen base (``AdapterFields``)."""

    samples: list[TrainSample] = Field(min_length=1)
    mode: Literal["sft"] = "sft"
    wait: bool = Field(False, description="answer when the job is done (else at once, with its id)")

    @model_validator(mode="after")
    def _adapter_fields_need_adapter(self) -> "TrainRequest":
        self.adapter_spec()  # adapter_* fields without adapter: a ValueError, answered 422
        return self

    def options(self) -> SFTOptions:
        return SFTOptions(**{k: getattr(self, k) for k in SFTOptions.model_fields})


class BTRMTrainRequest(BaseModel):
    """``POST /train`` with ``"mode": "btrm"``: train reward heads on the served
    trunk. The config comes inline or as a path on the server; the samples as
    token ids (``hogwild.client`` tokenizes text), else the config's sources are
    read on the server."""

    model_config = ConfigDict(extra="forbid", strict=True)
    mode: Literal["btrm"]
    config: BTRMConfig | None = None
    config_path: str | None = Field(None, max_length=4096)
    samples: list[BTRMSample] | None = Field(None, min_length=1)
    wait: bool = False

    @model_validator(mode="after")
    def _one_config(self) -> "BTRMTrainRequest":
        if (self.config is None) == (self.config_path is None):
            raise ValueError("give exactly one of config (inline) and config_path")
        return self


class CircuitBreakerTrainRequest(BaseModel):
    """``POST /train`` with ``"mode": "circuit_breaker"``: train a circuit-breaker
    LoRA on the served model and merge it into the served weights if it passes
    its guards and the coherence check. Samples as token ids, or a JSONL dataset
    on the server (``dataset_path``) with the same schema."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["circuit_breaker"]
    samples: list[CBSample] | None = Field(None, min_length=1)
    dataset_path: str | None = Field(None, max_length=4096)
    config: CBConfig = Field(default_factory=CBConfig)
    wait: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "CircuitBreakerTrainRequest":
        if (self.samples is None) == (self.dataset_path is None):
            raise ValueError("give exactly one of samples (token ids) and dataset_path (JSONL on the server)")
        return self


class RevertRequest(BaseModel):
    """``POST /train/revert``: subtract a merged circuit-breaker adapter (default: the latest)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    job_id: str | None = Field(None, max_length=64)
    wait: bool = False


class PreferenceTrainRequest(PreferenceOptions, AdapterFields):
    """``POST /train`` with ``"mode": "preference"``: pairs of replies to one context, the
    wanted one and the other, as token ids; the objective, its settings and every optimizer
    setting as optional top-level fields (defaults in ``PreferenceOptions``)."""

    samples: list[PreferenceSample] = Field(min_length=1)
    mode: Literal["preference"]
    wait: bool = Field(False, description="answer when the job is done (else at once, with its id)")

    @model_validator(mode="after")
    def _adapter_fields_need_adapter(self) -> "PreferenceTrainRequest":
        self.adapter_spec()
        return self

    def options(self) -> PreferenceOptions:
        return PreferenceOptions(**{k: getattr(self, k) for k in PreferenceOptions.model_fields})


class RLTrainRequest(RLOptions, AdapterFields):
    """``POST /train`` with ``"mode": "rl"``: completions the server sampled, as token ids with
    the engine's log-probability of each token, and a reward within a group (or an advantage);
    the objective, its settings and every optimizer setting as optional top-level fields
    (defaults in ``RLOptions``)."""

    samples: list[RLSample] = Field(min_length=1)
    mode: Literal["rl"]
    wait: bool = Field(False, description="answer when the job is done (else at once, with its id)")

    @model_validator(mode="after")
    def _rewards_whole(self) -> "RLTrainRequest":
        problem = reward_source_problem(self.samples, self.reward_heads)
        if problem:
            raise ValueError(problem)
        if self.adapter_spec() is not None and self.max_staleness is not None:
            raise ValueError("max_staleness counts the base's weight versions, which an adapter job does not move: "
                             "leave it out with adapter")
        return self

    def options(self) -> RLOptions:
        return RLOptions(**{k: getattr(self, k) for k in RLOptions.model_fields})


TRAIN_MODES = ("sft", "btrm", "circuit_breaker", "preference", "rl")
UNION_TAGS.update(TRAIN_MODES)


def _train_mode(body) -> str:
    mode = body.get("mode", "sft") if isinstance(body, dict) else getattr(body, "mode", "sft")
    return mode if mode in TRAIN_MODES else "sft"  # an unknown mode then fails the sft schema, naming it


TrainBody = Annotated[Union[Annotated[TrainRequest, Tag("sft")], Annotated[BTRMTrainRequest, Tag("btrm")],
                            Annotated[CircuitBreakerTrainRequest, Tag("circuit_breaker")],
                            Annotated[PreferenceTrainRequest, Tag("preference")], Annotated[RLTrainRequest, Tag("rl")]],
                      Discriminator(_train_mode)]


ScoreRange = Annotated[list[int], Field(min_length=2, max_length=2)]


class MultiModalData(BaseModel):
    """Images as base64 data URIs (``data:image/png;base64,...``): a list, or one."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image: Annotated[list[str], Field(min_length=1, max_length=64)] | str  # the bound is on the list, not a URI's length

    def images(self) -> list[str]:
        return [self.image] if isinstance(self.image, str) else list(self.image)


class ScoreRequest(BaseModel):
    """``POST /v1/score``: total log-likelihood of token ranges of a prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: list[TokenId] = Field(min_length=1)
    score_ranges: list[ScoreRange] = Field(min_length=1, description="half-open [start, end) positions into prompt")
    logprobs: int = Field(1, ge=0, le=20, description="accepted for client compatibility; totals use the prompt tokens' own logprobs")
    heads: bool | list[str] = Field(False, description="add reward-head scores, read at each range's last token")
    priority: int = Field(0, description="the engine's priority for this request (with --scheduling-policy priority; "
                          "lower runs first, as for completions)")
    multi_modal_data: MultiModalData | None = Field(None, description="images of the prompt: one placeholder token each "
                                                    "in prompt; ranges refer to prompt's positions")


class CheckpointRequest(BaseModel):
    """``POST /checkpoint``: sync the served weights to disk now."""

    model_config = ConfigDict(extra="forbid", strict=True)
    target: str | None = Field(None, max_length=4096, description="a model directory; default: the served one")


class ReadoutLoadRequest(BaseModel):
    """``POST /readout/load``: read out with another vector set from now on."""

    model_config = ConfigDict(extra="forbid", strict=True)
    vectors: str = Field(max_length=4096, description="a readout.safetensors on the server")
    manifest: str | None = Field(None, max_length=4096, description="default: readout.json beside the vectors")


class ReadoutTrainRequest(BaseModel):
    """``POST /readout/train``: train concept vectors on the live weights (as
    ``hogwild readout train`` does offline), write them to ``out`` and read out
    with them from then on."""

    model_config = ConfigDict(extra="forbid", strict=True)
    stories: str = Field(max_length=4096, description="a corpus directory on the server (see stories/README.md)")
    layers: list[int] = Field(min_length=1, max_length=1024)
    aggregator: Literal["mean", "pca", "logistic"] = "mean"
    out: str = Field(max_length=4096, description="where readout.safetensors, readout.json and the quality report go")
    min_positives: int = Field(4, ge=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    wait: bool = False


class RangeScore(BaseModel):
    range_index: int
    total_logprob: float
    n_tokens: int
    heads: dict[str, float] | None = None


class ScoreResponse(BaseModel):
    scores: list[RangeScore]

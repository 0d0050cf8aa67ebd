"""The job requests the trainer queues: one class per training mode (its contract entry).

Each says, for the one validation path of the API server and the trainer, how many
samples it carries, every list of token ids in it (with where it is, for messages),
every sequence the model reads whole (to fit the served max length), and how many
optimizer steps it plans. Adding a mode adds one class here (and its ``*_config``),
to ``JOB_REQUESTS``, and one module to the trainer's registry (``hogwild.worker.kinds``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .btrm_config import BTRMConfig
from .circuit_breaker_config import CBConfig, CBSample
from .preference_config import PreferenceOptions
from .rl_config import RLOptions
from .served_adapter import ADAPTER_NAME, AdapterSpec
from .sft_config import SFTOptions, count_steps

TokenId = Annotated[int, Field(ge=0)]

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"  # on job requests (the IETF httpapi draft's header)
IDEMPOTENCY_KEY_MAX = 256


class JobInfo(BaseModel):
    """A training job as the routes report it (the reply to every job request)."""

    job_id: str
    trainer_id: str  # the trainer process instance that owns the job
    mode: str
    state: JobState
    n_samples: int
    skipped_ids: list[str] = []  # sample ids already in the ledger, not trained again
    warnings: list[str] = []  # known at submission, e.g. a learning rate too small for bf16 weights
    step: int = 0
    total_steps: int = 0
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    weights_version: int | None = None  # the weights' version when the job ended
    adapter: str | None = None  # the adapter the job trains (None: the full weights)
    # The submission's Idempotency-Key header; a request sent again with it is answered with this job.
    idempotency_key: str | None = None
    request_sha256: str | None = None  # of the request (key aside): the same key with another request is refused

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


class JobRequestBase(BaseModel):
    """What every job request tells the validation (none of it by default); the
    trainer answers it with the job's ``JobInfo``."""

    model_config = ConfigDict(extra="forbid")
    Result: ClassVar = JobInfo
    # From the HTTP Idempotency-Key header: the trainer admits one job per key (kept while the job is).
    idempotency_key: str | None = Field(None, min_length=1, max_length=IDEMPOTENCY_KEY_MAX)

    def request_sha256(self) -> str:
        """What identifies the request itself: a resubmission under the same key must match it."""
        return hashlib.sha256(self.model_dump_json(exclude={"idempotency_key"}).encode()).hexdigest()

    def sample_count(self) -> int:
        return 0

    def token_lists(self) -> Iterator[tuple[str, list[int]]]:
        """(where, token ids) of every list of token ids the request carries."""
        return iter(())

    def sequence_lengths(self) -> Iterator[tuple[str, int]]:
        """(where, length) of every sequence the model reads whole: each must fit the served max length."""
        return iter(())

    def planned_steps(self) -> int:
        return 0

    def adapter_name(self) -> str | None:
        """The served adapter the job trains or changes (None: the full weights, or nothing served)."""
        return None


class TrainSample(BaseModel):
    """One supervised sample, as token ids (no tokenizer on the server side)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    context_ids: list[TokenId] = Field(min_length=1, description="tokens the model reads (no loss)")
    continuation_ids: list[TokenId] = Field(min_length=1, description="tokens the model learns to produce")
    id: str | None = Field(None, min_length=1, max_length=256, description="dedup key: a sample already trained is skipped")
    weight: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="scales this sample's token losses")


class SubmitOp(JobRequestBase):
    """Supervised training (``mode: sft``) of the full weights, or of ``adapter`` on the frozen base."""

    op: Literal["submit"] = "submit"
    mode: Literal["sft"] = "sft"
    samples: list[TrainSample] = Field(min_length=1)
    options: SFTOptions = SFTOptions()
    adapter: AdapterSpec | None = None

    def sample_count(self) -> int:
        return len(self.samples)

    def token_lists(self):
        for i, s in enumerate(self.samples):
            yield f"samples.{i}.context_ids", s.context_ids
            yield f"samples.{i}.continuation_ids", s.continuation_ids

    def sequence_lengths(self):
        for i, s in enumerate(self.samples):
            yield f"samples.{i}: context + continuation", len(s.context_ids) + len(s.continuation_ids)

    def planned_steps(self) -> int:
        return count_steps(len(self.samples), self.options)

    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter is not None else None


class SubmitAdapterDeleteOp(JobRequestBase):
    """Forget a served adapter (``DELETE /adapters/<name>``): the trainer deletes its copies, then
    vLLM stops serving it. A job, so that it comes after the jobs queued before it."""

    op: Literal["submit_adapter_delete"] = "submit_adapter_delete"
    mode: Literal["adapter_delete"] = "adapter_delete"
    name: str = Field(pattern=ADAPTER_NAME)

    def adapter_name(self) -> str | None:
        return self.name


class BTRMSample(BaseModel):
    """One text for the reward heads, as token ids already wrapped in the config's
    meta-prompt, with its label for each head it takes part in."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[TokenId] = Field(min_length=1)
    labels: dict[str, str] = Field(min_length=1, description='head name -> "positive" or a negative tier (e.g. "soft_neg")')


class SubmitBTRMOp(JobRequestBase):
    """Train the reward heads on the served trunk (frozen). Without samples, the
    config's sources (absolute paths, already confined) are read and tokenized
    by the trainer. The trainer keeps each text's last ``max_length`` tokens."""

    op: Literal["submit_btrm"] = "submit_btrm"
    mode: Literal["btrm"] = "btrm"
    config: BTRMConfig
    samples: list[BTRMSample] | None = None

    def sample_count(self) -> int:
        return len(self.samples or [])

    def token_lists(self):
        for i, s in enumerate(self.samples or []):
            yield f"samples.{i}.ids", s.ids

    def planned_steps(self) -> int:
        batches = math.ceil(len(self.samples) / self.config.batch_size) if self.samples else 1
        return self.config.epochs * batches + (self.config.trunk_lora_epochs * batches if self.config.trunk_lora else 0)


class SubmitCircuitBreakerOp(JobRequestBase):
    """Train a circuit-breaker LoRA on the served model and, if it passes its
    guards and the coherence check, merge it into the served weights. Samples
    inline, or a JSONL dataset (absolute path, already confined) read by the trainer."""

    op: Literal["submit_circuit_breaker"] = "submit_circuit_breaker"
    mode: Literal["circuit_breaker"] = "circuit_breaker"
    config: CBConfig
    samples: list[CBSample] | None = None
    dataset_path: str | None = None

    def sample_count(self) -> int:
        return len(self.samples or [])

    def token_lists(self):
        for i, s in enumerate(self.samples or []):
            yield f"samples.{i}.ids", s.ids
        for i, prompt in enumerate(self.config.coherence_prompts or []):
            yield f"config.coherence_prompts.{i}", prompt

    def sequence_lengths(self):
        for i, s in enumerate(self.samples or []):
            yield f"samples.{i}", len(s.ids)

    def planned_steps(self) -> int:
        return self.config.steps


class SubmitRevertOp(JobRequestBase):
    """Subtract a merged circuit-breaker adapter from the served weights (the
    latest one by default; an older one only once those after it are reverted)."""

    op: Literal["submit_revert"] = "submit_revert"
    mode: Literal["revert"] = "revert"
    job_id: str | None = None  # the job that merged the adapter


class SubmitReadoutOp(JobRequestBase):
    """Train readout concept vectors on the served weights as they are now, write
    them to ``out`` and (when the server reads out) make them the current set.
    Paths are absolute and already confined by the API server."""

    op: Literal["submit_readout"] = "submit_readout"
    mode: Literal["readout"] = "readout"
    stories: str
    layers: list[int] = Field(min_length=1)
    aggregator: Literal["mean", "pca", "logistic"] = "mean"
    out: str
    min_positives: int = Field(4, ge=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class PreferenceSample(BaseModel):
    """A context, the reply wanted and the reply not wanted, as token ids. The reference
    policy's log-probabilities of both replies (summed over their tokens, e.g. from
    ``/v1/score`` when the rejected reply was generated) may come with it; else the
    trainer computes them from the served model as the job starts."""

    model_config = ConfigDict(extra="forbid", strict=True)
    context_ids: list[TokenId] = Field(min_length=1, description="tokens the model reads (no loss)")
    chosen_ids: list[TokenId] = Field(min_length=1, description="the reply wanted")
    rejected_ids: list[TokenId] = Field(min_length=1, description="the reply not wanted")
    id: str | None = Field(None, min_length=1, max_length=256, description="dedup key: a pair already trained is skipped")
    weight: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="scales this pair's loss")
    ref_chosen_logprob: float | None = Field(None, le=0, allow_inf_nan=False)
    ref_rejected_logprob: float | None = Field(None, le=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _a_real_pair(self) -> "PreferenceSample":
        if self.chosen_ids == self.rejected_ids:
            raise ValueError("chosen_ids and rejected_ids are the same reply: a pair needs two different ones")
        if (self.ref_chosen_logprob is None) != (self.ref_rejected_logprob is None):
            raise ValueError("give both ref_chosen_logprob and ref_rejected_logprob, or neither")
        return self


class SubmitPreferenceOp(JobRequestBase):
    """Preference training (``mode: preference``) of the served weights, in place, or of
    ``adapter`` on the frozen base: the reference is the served model (or the adapter) as the
    job starts (its log-probabilities, kept as numbers)."""

    op: Literal["submit_preference"] = "submit_preference"
    mode: Literal["preference"] = "preference"
    samples: list[PreferenceSample] = Field(min_length=1)
    options: PreferenceOptions = PreferenceOptions()
    adapter: AdapterSpec | None = None

    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter is not None else None

    def sample_count(self) -> int:
        return len(self.samples)

    def token_lists(self):
        for i, s in enumerate(self.samples):
            yield f"samples.{i}.context_ids", s.context_ids
            yield f"samples.{i}.chosen_ids", s.chosen_ids
            yield f"samples.{i}.rejected_ids", s.rejected_ids

    def sequence_lengths(self):
        for i, s in enumerate(self.samples):
            yield f"samples.{i}: context + chosen", len(s.context_ids) + len(s.chosen_ids)
            yield f"samples.{i}: context + rejected", len(s.context_ids) + len(s.rejected_ids)

    def planned_steps(self) -> int:
        return count_steps(len(self.samples), self.options)


Logprob = Annotated[float, Field(le=0, allow_inf_nan=False)]


class RLSample(BaseModel):
    """A completion the server sampled, as token ids, with the log-probability the sampling
    engine gave each of its tokens (``/v1/completions`` with ``logprobs`` and
    ``return_token_ids``), and its reward within a group of completions of the same prompt,
    or its advantage."""

    model_config = ConfigDict(extra="forbid", strict=True)
    context_ids: list[TokenId] = Field(min_length=1, description="the prompt (no loss)")
    completion_ids: list[TokenId] = Field(min_length=1, description="the sampled completion")
    logprobs: list[Logprob] = Field(min_length=1, description="the engine's log-probability of each completion token")
    reward: float | None = Field(None, allow_inf_nan=False, description="compared within its group for the advantage")
    group: str | None = Field(None, min_length=1, max_length=256, description="the completions compared with each other "
                              "(those of one prompt)")
    advantage: float | None = Field(None, allow_inf_nan=False, description="instead of reward and group")
    id: str | None = Field(None, min_length=1, max_length=256, description="dedup key: a sample already trained is skipped")
    weights_version: int | None = Field(None, ge=0, description="the weights' version the completion was sampled at")

    @model_validator(mode="after")
    def _consistent(self) -> "RLSample":
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(f"logprobs has {len(self.logprobs)} numbers for {len(self.completion_ids)} completion tokens: "
                             "give one per token")
        if self.advantage is not None:
            if self.reward is not None or self.group is not None:
                raise ValueError("give advantage, or reward and group, not both")
        elif self.reward is not None and self.group is None:
            raise ValueError("give reward and group (the completions it is compared with), or advantage")
        return self


def reward_source_problem(samples: list[RLSample], reward_heads: dict[str, float] | None) -> str | None:
    """Where each sample's advantage comes from must be whole: with ``reward_heads``, every sample
    names its group and nothing else (the heads give the rewards); without, every sample gives
    reward and group, or advantage."""
    for i, s in enumerate(samples):
        if reward_heads is not None and (s.reward is not None or s.advantage is not None or s.group is None):
            return (f"samples.{i}: with reward_heads the heads give the rewards: give group (the completions compared "
                    "with each other), not reward or advantage")
        if reward_heads is None and s.reward is None and s.advantage is None:
            return f"samples.{i}: give reward and group (the completions it is compared with), or advantage"
    return None


class SubmitRLOp(JobRequestBase):
    """Policy-gradient training (``mode: rl``) of the served weights, in place, or of ``adapter``
    on the frozen base, on completions the server sampled (under that adapter): the trainer's
    log-probabilities as the job starts are the ratio's reference and the KL's, computed once and
    kept as numbers (``training.rl``)."""

    op: Literal["submit_rl"] = "submit_rl"
    mode: Literal["rl"] = "rl"
    samples: list[RLSample] = Field(min_length=1)
    options: RLOptions = RLOptions()
    adapter: AdapterSpec | None = None

    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter is not None else None

    @model_validator(mode="after")
    def _rewards_whole(self) -> "SubmitRLOp":
        problem = reward_source_problem(self.samples, self.options.reward_heads)
        if problem:
            raise ValueError(problem)
        return self

    def sample_count(self) -> int:
        return len(self.samples)

    def token_lists(self):
        for i, s in enumerate(self.samples):
            yield f"samples.{i}.context_ids", s.context_ids
            yield f"samples.{i}.completion_ids", s.completion_ids

    def sequence_lengths(self):
        for i, s in enumerate(self.samples):
            yield f"samples.{i}: context + completion", len(s.context_ids) + len(s.completion_ids)

    def planned_steps(self) -> int:
        return count_steps(len(self.samples), self.options)


JOB_REQUESTS = (SubmitOp, SubmitBTRMOp, SubmitCircuitBreakerOp, SubmitRevertOp, SubmitReadoutOp, SubmitPreferenceOp,
                SubmitRLOp, SubmitAdapterDeleteOp)
JobRequest = Annotated[Union[JOB_REQUESTS], Field(discriminator="op")]

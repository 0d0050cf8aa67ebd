"""Wire protocol between the API server(s) and the training subprocess.

Transport: ZMQ over an owner-only ipc socket in the session directory; the
trainer binds a ROUTER, each API server process connects a DEALER. Every frame
is one JSON document validated by the pydantic models below and carrying the
protocol version ``v``; nothing is pickled. Requests get exactly one reply with
the same ``id``; the trainer also pushes events (a job finished, the weights
changed) to every client it has heard from.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from hogwild.training.btrm_data import BTRMConfig
from hogwild.training.circuit_breaker import CBConfig, CBSample
from hogwild.training.sft import SFTOptions

PROTOCOL_VERSION = 1
SOCKET_NAME = "trainer.sock"  # in the session directory

TokenId = Annotated[int, Field(ge=0)]


class TrainSample(BaseModel):
    """One supervised sample, as token ids (no tokenizer on the server side)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    context_ids: list[TokenId] = Field(min_length=1, description="tokens the model reads (no loss)")
    continuation_ids: list[TokenId] = Field(min_length=1, description="tokens the model learns to produce")
    id: str | None = Field(None, min_length=1, max_length=256, description="dedup key: a sample already trained is skipped")
    weight: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="scales this sample's token losses")


# ---- requests -------------------------------------------------------------


class StatusOp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["status"] = "status"


class SubmitOp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["submit"] = "submit"
    mode: Literal["sft"] = "sft"
    samples: list[TrainSample] = Field(min_length=1)
    options: SFTOptions = SFTOptions()


class BTRMSample(BaseModel):
    """One text for the reward heads, as token ids already wrapped in the config's
    meta-prompt, with its label for each head it takes part in."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[TokenId] = Field(min_length=1)
    labels: dict[str, str] = Field(min_length=1, description='head name -> "positive" or a negative tier (e.g. "soft_neg")')


class SubmitBTRMOp(BaseModel):
    """Train the reward heads on the served trunk (frozen). Without samples, the
    config's sources (absolute paths, already confined) are read and tokenized
    by the trainer."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["submit_btrm"] = "submit_btrm"
    mode: Literal["btrm"] = "btrm"
    config: BTRMConfig
    samples: list[BTRMSample] | None = None


class SubmitCircuitBreakerOp(BaseModel):
    """Train a circuit-breaker LoRA on the served model and, if it passes its
    guards and the coherence check, merge it into the served weights. Samples
    inline, or a JSONL dataset (absolute path, already confined) read by the trainer."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["submit_circuit_breaker"] = "submit_circuit_breaker"
    mode: Literal["circuit_breaker"] = "circuit_breaker"
    config: CBConfig
    samples: list[CBSample] | None = None
    dataset_path: str | None = None


class SubmitRevertOp(BaseModel):
    """Subtract a merged circuit-breaker adapter from the served weights (the
    latest one by default; an older one only once those after it are reverted)."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["submit_revert"] = "submit_revert"
    mode: Literal["revert"] = "revert"
    job_id: str | None = None  # the job that merged the adapter


class SubmitReadoutOp(BaseModel):
    """Train readout concept vectors on the served weights as they are now, write
    them to ``out`` and (when the server reads out) make them the current set.
    Paths are absolute and already confined by the API server."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["submit_readout"] = "submit_readout"
    mode: Literal["readout"] = "readout"
    stories: str
    layers: list[int] = Field(min_length=1)
    aggregator: Literal["mean", "pca", "logistic"] = "mean"
    out: str
    min_positives: int = Field(4, ge=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class HeadScoresOp(BaseModel):
    """Reward-head scores at ``positions`` of ``token_ids`` (one trunk forward)."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["head_scores"] = "head_scores"
    token_ids: list[TokenId] = Field(min_length=1)
    positions: list[int] = Field(min_length=1)
    heads: list[str] | None = None  # default: every head


class JobOp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["job"] = "job"
    job_id: str


class CancelOp(BaseModel):
    """Cancel a queued job, or stop a running one after its current step."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["cancel"] = "cancel"
    job_id: str


class CheckpointOp(BaseModel):
    """Sync the served weights (and the trainer's state) into a model directory."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["checkpoint"] = "checkpoint"
    target: str | None = None  # default: the served model's directory


class ParityOp(BaseModel):
    """vLLM's log-probabilities of the trainer's probe prompt (positions 1..n-1), from
    the engine: the trainer compares its own and opens training, or keeps it off."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["parity"] = "parity"
    engine_logprobs: list[float] = Field(min_length=1)


class TokenLogprobsOp(BaseModel):
    """log P(token_ids[p] | token_ids[:p]) for p >= 1, from the trainer's model."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["token_logprobs"] = "token_logprobs"
    token_ids: list[TokenId] = Field(min_length=2)


Op = Annotated[Union[StatusOp, SubmitOp, SubmitBTRMOp, SubmitCircuitBreakerOp, SubmitRevertOp, SubmitReadoutOp, JobOp, CancelOp, CheckpointOp,
                     TokenLogprobsOp, HeadScoresOp, ParityOp], Field(discriminator="op")]
# What the journal keeps.
JobRequest = Annotated[Union[SubmitOp, SubmitBTRMOp, SubmitCircuitBreakerOp, SubmitRevertOp, SubmitReadoutOp],
                      Field(discriminator="op")]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    id: str
    body: Op


# ---- replies and events ---------------------------------------------------


ErrorCode = Literal["invalid", "unsupported", "unavailable", "not_found", "busy", "too_large", "conflict", "internal", "version"]


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str


class OpError(Exception):
    """An op refused by the trainer; becomes an error reply with ``code``."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


class Reply(BaseModel):
    v: int = PROTOCOL_VERSION
    id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class JobInfo(BaseModel):
    """A training job as the routes report it."""

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

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


class Event(BaseModel):
    v: int = PROTOCOL_VERSION
    event: Literal["job_finished"]
    trainer_id: str  # a new id each time the trainer process starts
    job: JobInfo
    weights_version: int
    weights_changed: bool
    trainer_idle: bool  # no job queued after this one


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()

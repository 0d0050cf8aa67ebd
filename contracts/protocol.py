"""Wire protocol between the API server(s) and the training subprocess.

Transport: ZMQ over an owner-only ipc socket in the session directory; the
trainer binds a ROUTER, each API server process connects a DEALER. Every frame
is one JSON document validated by the pydantic models below and carrying the
protocol version ``v``; nothing is pickled. Requests get exactly one reply with
the same ``id``, whose ``result`` is the op's ``Result`` type (validated on both
sides); the trainer also pushes events (a job finished, the weights changed) to
every client it has heard from. The job requests themselves are in ``jobs``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .served_adapter import ServedAdapter
from .jobs import JOB_REQUESTS, TERMINAL_STATES, JobInfo, JobRequest, JobState, TokenId

PROTOCOL_VERSION = 2
SOCKET_NAME = "trainer.sock"  # in the session directory

# ---- replies of the other ops ----------------------------------------------


class TrainerStatus(BaseModel):
    """The trainer's state, queue, optimizer, memory and checkpoints (``GET /train/status``)."""

    trainer_id: str
    pid: int
    state: Literal["starting", "verifying", "ready", "unsupported", "failed"]
    reason: str | None = None
    model: str | None = None
    architectures: list[str] = []
    dtype: str | None = None
    backend: str | None = None
    model_class: str | None = None
    quantization: str | None = None  # the served base's quantization method: it trains adapters only
    frozen: dict[str, str] = {}  # parameters kept frozen (not views of the served weights), with why
    parity: dict[str, Any] = {}  # the parity gate: state, probe_ids, max_abs_diff, ...
    vision_tower: str | None = None
    queue: list[JobInfo] = []
    running: JobInfo | None = None
    recent: list[JobInfo] = []
    max_queued_jobs: int
    weights_version: int
    ledger_size: int
    heads: dict[str, Any] | None = None
    adapters: list[dict[str, Any]] = []  # circuit-breaker adapters merged into the weights
    served_adapters: list[ServedAdapter] = []  # adapters trained on the frozen base, served by name (--enable-lora)
    checkpoint: dict[str, Any] = {}
    optimizer: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    totals: dict[str, Any] = {}  # what this trainer process has done (jobs, tokens, steps, checkpoints), for metrics
    # {"unreadable": [{"file", "job_id", "reason"}, ...]}: journal records that no longer parse, kept aside
    journal: dict[str, Any] = {}
    # The trainer's ranks: {"size": 1}, or under tensor parallel {"size": N, "ranks": [{"rank", "pid",
    # "param_bytes", "shared_param_bytes", "binding_private_bytes"}, ...]} (one per vLLM rank).
    tensor_parallel: dict[str, Any] = {}
    # The replica group this trainer trains with (``replica_group.GroupInfo`` as JSON); None: a replica alone.
    group: dict[str, Any] | None = None


class CheckpointReport(BaseModel):
    """What a checkpoint sync wrote (``POST /checkpoint``)."""

    model_config = ConfigDict(extra="allow")  # the sync's own report fields
    target: str
    blocks_written: int
    bytes_written: int
    seconds: float
    weights_version: int


class HeadScores(BaseModel):
    heads: list[str]
    scores: list[list[float]]  # one row per position, one column per head


class TokenLogprobs(BaseModel):
    logprobs: list[float]


class ParityReport(BaseModel):
    state: Literal["pending", "passed", "failed"]
    probe_ids: list[int] = []
    max_abs_diff: float | None = None
    position: int | None = None
    tolerance: list[float] | None = None
    positions_beyond: int | None = None  # positions beyond the tolerance (a few are allowed: parity.OUTLIER_SHARE)
    first_differing_tensor: str | None = None


# ---- requests -------------------------------------------------------------


class StatusOp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["status"] = "status"
    Result: ClassVar = TrainerStatus


class JobOp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["job"] = "job"
    job_id: str
    Result: ClassVar = JobInfo


class CancelOp(BaseModel):
    """Cancel a queued job, or stop a running one after its current step."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["cancel"] = "cancel"
    job_id: str
    Result: ClassVar = JobInfo


class CheckpointOp(BaseModel):
    """Sync the served weights (and the trainer's state) into a model directory."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["checkpoint"] = "checkpoint"
    target: str | None = None  # default: the served model's directory
    adapters: list[str] | None = None  # only these served adapters (an adapter key's checkpoint), not the weights
    Result: ClassVar = CheckpointReport


class HeadScoresOp(BaseModel):
    """Reward-head scores at ``positions`` of ``token_ids`` (one trunk forward)."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["head_scores"] = "head_scores"
    token_ids: list[TokenId] = Field(min_length=1)
    positions: list[int] = Field(min_length=1)
    heads: list[str] | None = None  # default: every head
    Result: ClassVar = HeadScores


class ParityOp(BaseModel):
    """vLLM's log-probabilities of the trainer's probe prompt (positions 1..n-1), from
    the engine: the trainer compares its own and opens training, or keeps it off."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["parity"] = "parity"
    engine_logprobs: list[float] = Field(min_length=1)
    Result: ClassVar = ParityReport


class TokenLogprobsOp(BaseModel):
    """log P(token_ids[p] | token_ids[:p]) for p >= 1, from the trainer's model."""

    model_config = ConfigDict(extra="forbid")
    op: Literal["token_logprobs"] = "token_logprobs"
    token_ids: list[TokenId] = Field(min_length=2)
    Result: ClassVar = TokenLogprobs


Op = Annotated[Union[(StatusOp, JobOp, CancelOp, CheckpointOp, HeadScoresOp, ParityOp, TokenLogprobsOp, *JOB_REQUESTS)],
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
    result: dict[str, Any] | None = None  # the op's Result, as JSON
    error: ErrorInfo | None = None


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


__all__ = ["JobRequest", "JobState", "TERMINAL_STATES", "PROTOCOL_VERSION", "SOCKET_NAME", "JobInfo", "TrainerStatus", "CheckpointReport", "HeadScores",
           "TokenLogprobs", "ParityReport", "StatusOp", "JobOp", "CancelOp", "CheckpointOp", "HeadScoresOp", "ParityOp",
           "TokenLogprobsOp", "Op", "Request", "ErrorCode", "ErrorInfo", "OpError", "Reply", "Event", "encode"]

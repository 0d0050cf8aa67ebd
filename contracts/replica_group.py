"""Messages between the trainers of serving replicas that train as one data-parallel group.

Each replica (a ``vllm serve`` with the plugin) has its own trainer; the trainers join one
group (``HOGWILD_GROUP``: the ``host:port`` of a c10d TCP store that replica 0's trainer
hosts, ``HOGWILD_GROUP_SIZE``, ``HOGWILD_GROUP_RANK``). Replica 0 leads: it admits every job
(a follower forwards the requests it gets, ``ForwardedRequest``, through the store) and tells
the others what to run over the group's ``torch.distributed`` process group, one
``GroupEnvelope`` at a time (a length, then JSON bytes: typed, versioned, never pickled).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .jobs import JobInfo, JobRequest
from .protocol import Request

GROUP_PROTOCOL_VERSION = 1
GroupState = Literal["alone", "forming", "syncing", "ready", "inconsistent", "refused"]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = GROUP_PROTOCOL_VERSION


class ShareCommand(_Command):
    """Train your share of every step of this job (already admitted by the leader), then
    compare fingerprints."""

    op: Literal["share"] = "share"
    job: JobInfo
    request: JobRequest


class EndedCommand(_Command):
    """The job ended on the leader as ``job`` says: report it to this replica's callers."""

    op: Literal["ended"] = "ended"
    job: JobInfo


GroupCommand = Annotated[Union[ShareCommand, EndedCommand], Field(discriminator="op")]


class GroupEnvelope(BaseModel):
    """The one frame type on the group's channel."""

    command: GroupCommand


class ForwardedRequest(BaseModel):
    """A request a follower got for the group (a job, a job's state, a cancel), for the
    leader to answer under the store key ``reply_key``."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = GROUP_PROTOCOL_VERSION
    reply_key: str
    request: Request


class MemberRecord(BaseModel):
    """What each replica's trainer publishes about itself in the store, about once a second."""

    rank: int
    host: str
    pid: int
    trainer_id: str
    state: GroupState
    stale: bool  # has not had the group's weights since it started: a load balancer may hold it out
    weights_version: int
    fingerprint: str | None = None
    seen_at: float


class GroupInfo(BaseModel):
    """``group`` in ``GET /train/status``: this replica's place in its group and whether the
    replicas agree. ``consistent``: the last comparison of every replica's fingerprint
    (None before the first); ``catch_up``: what the last sync sent this replica."""

    size: int
    rank: int
    state: GroupState
    reason: str | None = None
    consistent: bool | None = None
    stale: bool
    weights_version: int
    fingerprint: str | None = None
    generation: int = 0
    catch_up: dict[str, Any] | None = None
    last_job: dict[str, Any] | None = None  # the last job run on the group: {job_id, allreduce_bytes} (this replica's)
    members: list[MemberRecord] = []
    members_read_at: float | None = None  # when ``members`` was last read from the group's store (epoch seconds)

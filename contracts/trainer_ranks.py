"""Messages between the trainer's tensor-parallel ranks (one process per vLLM rank).

Rank 0 is the trainer the API server talks to; it tells the other ranks what to run
next by broadcasting one of these commands over the ranks' torch.distributed group
(a length, then the JSON bytes: typed, versioned, never pickled). Every rank then runs
the same code on its own shard, so their collectives meet.
"""

from __future__ import annotations

import signal
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .jobs import JobRequest

RANKS_PROTOCOL_VERSION = 1
# Rank 0's exit status when another rank died or the ranks fell out of step: its supervisor
# (the API server) reports the running job failed and starts a new group.
RANK_DIED_EXIT = 75


def how_it_ended(returncode: int) -> str:
    """A process's exit status in words, as the supervisors report it."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = RANKS_PROTOCOL_VERSION


class LogprobsCommand(_Command):
    """log P(token_ids[p] | token_ids[:p]) from the model (the parity gate, token log-probs)."""

    op: Literal["logprobs"] = "logprobs"
    token_ids: list[int]


class TrainCommand(_Command):
    """Run a job of a kind every rank can run, on these (already admitted) samples."""

    op: Literal["train"] = "train"
    request: JobRequest


class WriteTensorsCommand(_Command):
    """Gather the named tensors, one at a time, for rank 0 to write (a checkpoint sync)."""

    op: Literal["write_tensors"] = "write_tensors"
    names: list[str]


class SaveOptimizerCommand(_Command):
    """Save each rank's optimizer state (``optimizer.tp<N>.rank<r>.*``) into the checkpoint
    ``directory``; every rank then reports whether it could (rank 0 answers once all have)."""

    op: Literal["save_optimizer"] = "save_optimizer"
    directory: str


class StopCommand(_Command):
    op: Literal["stop"] = "stop"


RankCommand = Annotated[Union[LogprobsCommand, TrainCommand, WriteTensorsCommand, SaveOptimizerCommand, StopCommand],
                        Field(discriminator="op")]


class RankEnvelope(BaseModel):
    """The one frame type on the ranks' channel."""

    command: RankCommand

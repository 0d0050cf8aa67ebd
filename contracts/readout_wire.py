"""Readout values on their way from vLLM's worker to the API server process.

One ZMQ message per forward step and API server: a JSON header (versioned,
typed below) and one float32 payload holding every row's values back to back.
Each API server process binds its own PULL socket in the session directory;
the join key it puts into the request's ``vllm_xargs`` names that socket.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import msgspec
import numpy as np

WIRE_VERSION = 2
KEY_ARG = "hogwild_readout"  # vllm_xargs: join key of a request whose readout is wanted
PROMPT_ARG = "hogwild_readout_prompt"  # vllm_xargs: 1 when every prompt position is wanted too
_KEY = re.compile(r"^(\d{1,10})\.[0-9a-f]{16}$")


def new_key(pid: int) -> str:
    """A join key for one HTTP request, naming the API server process that waits for it."""
    return f"{pid}.{secrets.token_hex(8)}"


def inbox_path(session: Path, key_or_pid: str | int) -> Path | None:
    """The socket of the API server process a key (or pid) belongs to; None for a malformed key."""
    if isinstance(key_or_pid, int):
        return Path(session) / f"readout-{key_or_pid}.sock"
    m = _KEY.match(key_or_pid)
    return Path(session) / f"readout-{m.group(1)}.sock" if m else None


class ReadoutStep(msgspec.Struct, frozen=True):
    """One step's rows for one API server, read out with one vector set.

    Columns, one entry per request: its rows are positions ``first_positions[i] ..
    first_positions[i] + counts[i] - 1`` of its sequence, stored back to back in
    the payload, each ``(n_layers, n_concepts)``. (Columns, not one record per
    request: encoding sixteen records every decode step cost the model step
    more than the numbers did.)"""

    set_version: str
    n_layers: int
    n_concepts: int
    keys: list[str]
    request_ids: list[str]  # vLLM's internal ids (external id, child index, random suffix)
    prompt_lens: list[int]
    first_positions: list[int]
    counts: list[int]
    v: int = WIRE_VERSION


def encode(step: ReadoutStep, values: np.ndarray) -> list[bytes]:
    """Header and payload frames; ``values`` is ``(sum(counts), n_layers, n_concepts)`` float32."""
    return [msgspec.json.encode(step), np.ascontiguousarray(values, dtype=np.float32).tobytes()]


def decode(frames: list[bytes]) -> tuple[ReadoutStep, np.ndarray]:
    """Inverse of ``encode``; raises ValueError on a message of another version or shape."""
    if len(frames) != 2:
        raise ValueError(f"readout message has {len(frames)} frames, expected 2")
    try:
        step = msgspec.json.decode(frames[0], type=ReadoutStep)
    except msgspec.MsgspecError as exc:
        version = msgspec.json.decode(frames[0]).get("v") if frames[0][:1] == b"{" else None
        raise ValueError(f"readout message version {version!r}, expected {WIRE_VERSION}" if version != WIRE_VERSION
                         else f"readout message header: {exc}") from None
    if step.v != WIRE_VERSION:
        raise ValueError(f"readout message version {step.v!r}, expected {WIRE_VERSION}")
    columns = (step.request_ids, step.prompt_lens, step.first_positions, step.counts)
    if any(len(c) != len(step.keys) for c in columns):
        raise ValueError("readout message header: columns of different lengths")
    flat = np.frombuffer(frames[1], dtype=np.float32)
    row = step.n_layers * step.n_concepts
    if row <= 0 or flat.size != sum(step.counts) * row:
        raise ValueError(f"readout message payload holds {flat.size} values, its header says "
                         f"{sum(step.counts) * row}")
    return step, flat.reshape(-1, step.n_layers, step.n_concepts)


def choice_index(request_id: str, n: int) -> int:
    """Which ``choices[i]`` of the HTTP response a worker-side request id feeds.

    vLLM 0.32 names requests ``<external id>-<8 random chars>``; with ``n > 1``
    each sample is ``<k>_<that>``; a completions request with several prompts
    gives prompt ``p`` the external id ``cmpl-<base>-<p>`` and its choices the
    indices ``p * n + k``.
    """
    child = 0
    if n > 1:
        head, sep, rest = request_id.partition("_")
        if sep and head.isdigit():
            child, request_id = int(head), rest
    external = request_id.rsplit("-", 1)[0]
    prompt = 0
    if external.startswith("cmpl-"):
        tail = external.rsplit("-", 1)[-1]
        prompt = int(tail) if tail.isdigit() else 0
    return prompt * n + child

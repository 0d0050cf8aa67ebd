"""Inside the API server: receive readout rows from the worker and hand them to
the HTTP request that waits for them.

Each API server process binds its own PULL socket (``readout_wire.inbox_path``)
and opens one entry per HTTP request (its join key). Rows are stored by
sequence position: the readout of generated token ``t`` is the row at position
``prompt_len - 1 + t``, a prompt readout is every row below ``prompt_len``.
Rows for keys nobody waits for (finished or unknown requests) are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hogwild.contracts.readout_wire import choice_index, decode, inbox_path, new_key

from .metrics import metrics

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it

# How long an answer waits for rows that have not arrived (they are sent before
# the token is sampled, so in practice they are always there first).
WAIT_S = 10.0


@dataclass
class _Choice:
    prompt_len: int
    rows: dict[int, np.ndarray] = field(default_factory=dict)  # position -> (n_layers, n_concepts)


@dataclass
class _Entry:
    n: int
    choices: dict[int, _Choice] = field(default_factory=dict)
    by_request: dict[str, _Choice] = field(default_factory=dict)  # vLLM's request id -> its choice
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ReadoutInbox:
    def __init__(self, session: Path):
        self.rows_received = 0
        self.path = inbox_path(session, os.getpid())
        self.entries: dict[str, _Entry] = {}
        self.socket = None
        self.task: asyncio.Task | None = None
        self.bad_messages = 0

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self.path.unlink(missing_ok=True)
        self.socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.bind(f"ipc://{self.path}")
        self.task = asyncio.create_task(self._receive(), name="hogwild-readout-inbox")

    async def _receive(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            try:
                self._store(decode(frames))
            except Exception as exc:  # one bad message must not stop the inbox
                self.bad_messages += 1
                logger.error("hogwild readout: bad message from the worker: %s", exc)

    def _store(self, decoded) -> None:
        step, values = decoded
        offset = 0
        for key, request_id, prompt_len, first, count in zip(step.keys, step.request_ids, step.prompt_lens,
                                                             step.first_positions, step.counts):
            entry = self.entries.get(key)
            if entry is not None:
                choice = entry.by_request.get(request_id)
                if choice is None:
                    choice = entry.choices.setdefault(choice_index(request_id, entry.n), _Choice(prompt_len))
                    entry.by_request[request_id] = choice
                for i in range(count):
                    choice.rows[first + i] = values[offset + i]
                entry.changed.set()
            offset += count
        self.rows_received += offset
        metrics().readout_rows.inc(offset)

    def open(self, n: int) -> str:
        """A join key for one HTTP request that produces ``n`` choices per prompt."""
        key = new_key(os.getpid())
        self.entries[key] = _Entry(n=n)
        return key

    def close(self, key: str) -> None:
        self.entries.pop(key, None)

    async def _wait(self, key: str, choice: int, positions) -> list[np.ndarray | None]:
        """The rows at ``positions(prompt_len)`` of one choice, waiting for late ones up to WAIT_S."""
        entry = self.entries[key]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            entry.changed.clear()  # before looking: rows that arrive while we wait set it again
            got = entry.choices.get(choice)
            if got is not None:
                wanted = positions(got.prompt_len)
                if all(p in got.rows for p in wanted):
                    return [got.rows[p] for p in wanted]
            left = deadline - loop.time()
            if left <= 0:
                logger.error("hogwild readout: rows of choice %d did not arrive within %.0f s", choice, WAIT_S)
                return [got.rows.get(p) for p in wanted] if got is not None else []
            try:
                await asyncio.wait_for(entry.changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass

    async def tokens(self, key: str, choice: int, first: int, count: int) -> list[np.ndarray | None]:
        """Readouts of generated tokens ``first .. first + count - 1`` of one choice."""
        return await self._wait(key, choice, lambda plen: range(plen - 1 + first, plen - 1 + first + count))

    async def prompt(self, key: str, choice: int) -> list[np.ndarray | None]:
        """Readouts of every prompt position of one choice."""
        return await self._wait(key, choice, lambda plen: range(plen))

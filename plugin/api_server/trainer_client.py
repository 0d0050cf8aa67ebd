"""Inside the API server: the asyncio ZMQ client of the training subprocess.

Never blocks the event loop: sends are non-blocking (``IMMEDIATE``: nothing is
queued for a trainer that is not connected, so a request can never be delivered
late to a restarted trainer), and replies are matched to requests by id on a
reader task. Events pushed by the trainer are handed to ``on_event``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio
from pydantic import BaseModel

from hogwild.contracts.protocol import SOCKET_NAME, Event, Reply, Request, encode

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it


class TrainerError(Exception):
    """The trainer answered with an error (``code`` as in the protocol)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class TrainerUnavailable(TrainerError):
    def __init__(self, message: str):
        super().__init__("unavailable", message)


class TrainerTimeout(TrainerError):
    """The trainer is there but did not answer in time (it may still be working on it)."""

    def __init__(self, message: str):
        super().__init__("timeout", message)


class TrainerClient:
    def __init__(self, session: Path, on_event: Callable[[Event], Awaitable[None]] | None = None):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(f"ipc://{session / SOCKET_NAME}")
        self.on_event = on_event
        self.pending: dict[str, asyncio.Future] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())
        self.tasks: set[asyncio.Task] = set()

    async def request(self, body: BaseModel, timeout: float = 30.0, connect_timeout: float = 1.0):
        """Send one op and return its result (the op's ``Result`` type); raises
        TrainerError: TrainerUnavailable when no trainer is connected or it died meanwhile,
        TrainerTimeout after ``timeout``. ``connect_timeout``: how long to wait for a
        connection to the trainer (a client made just now may need longer on a loaded machine)."""
        req_id = secrets.token_hex(8)
        future = asyncio.get_running_loop().create_future()
        self.pending[req_id] = future
        try:
            # POLLOUT only once a connection to a live trainer exists (IMMEDIATE).
            if not await self.sock.poll(int(connect_timeout * 1000), zmq.POLLOUT):
                raise TrainerUnavailable("the training process is not running (it may be starting or restarting)")
            await self.sock.send(encode(Request(id=req_id, body=body)), flags=zmq.NOBLOCK)
            try:
                reply: Reply = await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                what = getattr(body, "op", type(body).__name__)
                raise TrainerTimeout(f"the training process did not answer the {what} request within {timeout:.0f} s") from None
        finally:
            self.pending.pop(req_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: one set by ``fail_pending`` before the send is not an error to log
        if not reply.ok:
            raise TrainerError(reply.error.code, reply.error.message)
        return body.Result.model_validate(reply.result or {})

    async def _read(self) -> None:
        while True:
            try:
                payload = (await self.sock.recv_multipart())[-1]
                data = json.loads(payload)
                if "event" in data:
                    if self.on_event is not None:
                        task = asyncio.get_running_loop().create_task(self.on_event(Event.model_validate(data)))
                        self.tasks.add(task)
                        task.add_done_callback(self.tasks.discard)
                    continue
                reply = Reply.model_validate(data)
                future = self.pending.get(reply.id)
                if future is not None and not future.done():
                    future.set_result(reply)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("hogwild: unreadable message from the trainer")

    def fail_pending(self, reason: str) -> None:
        """The trainer process died: every request waiting for a reply fails now, saying why,
        instead of at its deadline."""
        for future in self.pending.values():
            if not future.done():
                future.set_exception(TrainerUnavailable(f"the training process ended before answering: {reason}"))

    def close(self) -> None:
        self.reader.cancel()
        self.sock.close()
        self.ctx.term()

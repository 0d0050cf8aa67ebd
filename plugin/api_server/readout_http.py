"""ASGI middleware: ``choices[i].readout`` on vLLM's own completion routes.

While readout is on, a request to ``/v1/completions`` or
``/v1/chat/completions`` gets a join key in its ``vllm_xargs`` (the worker's
tap reads it) and ``return_token_ids`` (so the answer says how many tokens
each choice or streamed chunk carries; removed again unless the caller asked).
The answer is then rewritten: a non-streamed choice gets
``readout: [n_tokens][n_layers][n_concepts]``, a streamed chunk
``readout: [n_layers][n_concepts]`` for the token it carries.

``"readout_prompt": true`` in the body asks for ``prompt_readout:
[n_prompt_tokens][n_layers][n_concepts]`` as well. Prompt positions served
from the prefix cache are not computed, so such a request gets a fresh
``cache_salt`` (vLLM's own per-request cache namespace): its prompt is computed
whole, however it is chunked.
"""

from __future__ import annotations

import secrets

import msgspec
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hogwild.contracts.readout_wire import KEY_ARG, PROMPT_ARG

from .http_errors import error_response
from .readout_inbox import ReadoutInbox

READOUT_PATHS = ("/v1/completions", "/v1/chat/completions")


def readout_json(rows) -> msgspec.Raw:
    """Readout rows (numpy float32 arrays, or a list of them with None for a row
    that never came) as JSON spliced into the answer: each value in the shortest
    form that reads back as the very same float32 (orjson's native float32
    formatting: 5x faster than going through Python floats, 10% fewer bytes)."""
    return msgspec.Raw(orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY))


class _Rewrite:
    """What one request asked for, and the rewriting of its answer."""

    def __init__(self, inbox: ReadoutInbox, key: str, wants_prompt: bool, wants_token_ids: bool):
        self.inbox, self.key = inbox, key
        self.wants_prompt, self.wants_token_ids = wants_prompt, wants_token_ids
        self.sent: dict[int, int] = {}  # choice -> tokens already given a readout (streams)

    def _strip(self, obj: dict) -> None:
        if not self.wants_token_ids:  # as vLLM answers when they were not asked for
            for name in ("token_ids", "prompt_token_ids"):
                if name in obj:
                    obj[name] = None

    async def response(self, body: dict) -> dict:
        for choice in body.get("choices") or []:
            index, ids = choice.get("index", 0), choice.get("token_ids") or []
            choice["readout"] = readout_json(await self.inbox.tokens(self.key, index, 0, len(ids)))
            if self.wants_prompt:
                choice["prompt_readout"] = readout_json(await self.inbox.prompt(self.key, index))
            self._strip(choice)
        self._strip(body)
        return body

    async def chunks(self, body: dict) -> list[dict]:
        """The chunk with readouts, split into one chunk per token where vLLM
        coalesced several tokens into one (it does when the client reads slower
        than the engine produces)."""
        choices = body.get("choices") or []
        if len(choices) == 1 and len(choices[0].get("token_ids") or []) > 1:
            return [await self._chunk(part) for part in split_tokens(body)]
        return [await self._chunk(body)]

    async def _chunk(self, body: dict) -> dict:
        for choice in body.get("choices") or []:
            index, ids = choice.get("index", 0), choice.get("token_ids") or []
            if self.wants_prompt and index not in self.sent:
                choice["prompt_readout"] = readout_json(await self.inbox.prompt(self.key, index))
            first = self.sent.setdefault(index, 0)
            if ids:
                rows = await self.inbox.tokens(self.key, index, first, len(ids))
                choice["readout"] = readout_json(rows[0] if len(rows) == 1 else rows)  # several: only if a chunk has several choices
                self.sent[index] = first + len(ids)
            self._strip(choice)
        self._strip(body)
        return body


def split_tokens(body: dict) -> list[dict]:
    """One chunk per token of a single-choice chunk: token ids and per-token
    logprobs are split; a chat delta's role goes with the first token, its text,
    the finish reason and usage with the last (vLLM also sends chunks with empty
    text while it holds text back)."""
    choice = body["choices"][0]
    ids, delta = choice["token_ids"], choice.get("delta")
    parts = []
    for i, token in enumerate(ids):
        first, last = i == 0, i == len(ids) - 1
        c = {**choice, "token_ids": [token], "logprobs": _logprobs_part(choice.get("logprobs"), i, len(ids))}
        if isinstance(delta, dict):
            c["delta"] = {key: value for key, value in delta.items() if (key == "role" and first) or (key != "role" and last)}
            c["delta"].setdefault("content", "")
        part = {**body, "choices": [c]}
        if not last:
            c["finish_reason"] = None
            if "stop_reason" in c:
                c["stop_reason"] = None
            if "text" in c:
                c["text"] = ""
            if "usage" in part:
                part["usage"] = None
        parts.append(part)
    return parts


def _logprobs_part(logprobs, i: int, k: int):
    """Token i's share of a chunk's logprobs (completions: parallel lists; chat: ``content``)."""
    if not isinstance(logprobs, dict):
        return logprobs
    out = {}
    for name, value in logprobs.items():
        out[name] = value[i: i + 1] if isinstance(value, list) and len(value) == k else (value if i == k - 1 else None)
    return out


class ReadoutMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in READOUT_PATHS:
            return await self.app(scope, receive, send)
        frontend = getattr(scope["app"].state, "hogwild", None)
        inbox = getattr(frontend, "readout_inbox", None)
        if inbox is None:
            return await self.app(scope, receive, send)
        raw, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("vllm_xargs") or {}, dict):
            return await self.app(scope, _replay(raw, receive), send)  # vLLM answers what is wrong with it
        wants_prompt = body.pop("readout_prompt", False)
        if not isinstance(wants_prompt, bool):
            return await error_response(400, "readout_prompt must be true or false")(scope, receive, send)
        n = body.get("n")
        key = inbox.open(n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1)  # else vLLM refuses it
        try:
            rewrite = _Rewrite(inbox, key, wants_prompt, bool(body.get("return_token_ids")))
            body["return_token_ids"] = True
            body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), KEY_ARG: key}
            if wants_prompt:
                body["vllm_xargs"][PROMPT_ARG] = 1
                body["cache_salt"] = secrets.token_hex(16)
            raw = msgspec.json.encode(body)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(raw)).encode())]}
            await self.app(scope, _replay(raw, receive), _rewriting_send(send, rewrite))
        finally:
            inbox.close(key)


def _replay(raw: bytes, receive: Receive) -> Receive:
    done = False

    async def replayed() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


def _rewriting_send(send: Send, rewrite: _Rewrite) -> Send:
    state: dict = {"start": None, "mode": None, "buffer": b""}

    async def rewritten(message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            if message["status"] != 200:
                state["mode"] = "pass"
            elif content_type.startswith(b"text/event-stream"):
                state["mode"] = "stream"
            else:
                state["mode"] = "json"
            if state["mode"] == "json":
                state["start"] = message  # sent with the rewritten body's length
                return
            return await send(message)
        if message["type"] != "http.response.body" or state["mode"] == "pass":
            return await send(message)
        state["buffer"] += message.get("body", b"")
        more = message.get("more_body", False)
        if state["mode"] == "json":
            if more:
                return
            # msgspec, not json: a readout is thousands of floats per answer (10x faster here).
            body = msgspec.json.encode(await rewrite.response(msgspec.json.decode(state["buffer"])))
            start = state["start"]
            headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body, "more_body": False})
        out = b""
        while b"\n\n" in state["buffer"]:
            event, state["buffer"] = state["buffer"].split(b"\n\n", 1)
            out += await _rewrite_event(event, rewrite) + b"\n\n"
        if not more and state["buffer"]:
            out, state["buffer"] = out + state["buffer"], b""
        if out or not more:
            await send({"type": "http.response.body", "body": out, "more_body": more})

    return rewritten


async def _rewrite_event(event: bytes, rewrite: _Rewrite) -> bytes:
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return event
    try:
        chunk = msgspec.json.decode(event[6:])
    except msgspec.DecodeError:
        return event
    if not isinstance(chunk, dict) or "choices" not in chunk:
        return event
    return b"\n\n".join(b"data: " + msgspec.json.encode(part) for part in await rewrite.chunks(chunk))

"""Per-request limits of the plugin's routes, from the environment.

| variable | default | answer when exceeded |
| --- | --- | --- |
| HOGWILD_MAX_SAMPLES | 4096 samples per /train | 413 |
| HOGWILD_MAX_TOKENS | 1,048,576 tokens per /train (all samples) | 413 |
| HOGWILD_MAX_STEPS | 100,000 optimizer steps per job | 413 |
| HOGWILD_MAX_BODY_BYTES | 64 MiB per request body | 413 |
| HOGWILD_MAX_QUEUED_JOBS | 16 queued jobs (enforced by the trainer) | 429 |
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from hogwild import envs

from .http_errors import error_response


@dataclass(frozen=True)
class Limits:
    max_samples: int
    max_tokens: int
    max_steps: int
    max_body_bytes: int

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(envs.max_samples(), envs.max_tokens(), envs.max_steps(), envs.max_body_bytes())


class BodySizeLimit:
    """ASGI middleware: bodies of the plugin's routes may not exceed the limit,
    whether they declare a Content-Length or arrive chunked."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...], max_bytes: int):
        self.app, self.prefixes, self.max_bytes = app, prefixes, max_bytes

    def too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (HOGWILD_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, self.too_large())(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self.too_large())
            return message

        await self.app(scope, counted, send)

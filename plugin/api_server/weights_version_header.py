"""ASGI middleware: every answer of vLLM's completion routes and of ``/score`` carries the
served weights' version as the request arrived (``X-Hogwild-Weights-Version``; the counter is
``contracts/weights_version.py``). An RL client sends it back with its samples
(``weights_version``), and ``max_staleness`` refuses samples drawn too many versions ago.

The weights may change while a completion is generated (HOGWILD): the version names the
oldest weights that drew any of its tokens; the engine's log-probs are those of the weights
that drew each token, which is what the importance weight corrects for.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hogwild.contracts.weights_version import HEADER

VERSIONED_PATHS = ("/v1/completions", "/v1/chat/completions", "/score", "/v1/score")
_HEADER = HEADER.lower().encode()


class WeightsVersionHeader:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        frontend = getattr(scope["app"].state, "hogwild", None) if scope["type"] == "http" else None
        if frontend is None or scope["path"] not in VERSIONED_PATHS:
            return await self.app(scope, receive, send)
        version = frontend.weights_version.read()
        if version is None:  # no trainer has started yet
            return await self.app(scope, receive, send)
        value = str(version).encode()

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (_HEADER, value)]}
            await send(message)

        await self.app(scope, receive, stamped)

"""``vllm.endpoint_plugins`` entry point: the plugin's routes in vLLM's API server."""

from __future__ import annotations

import logging
from argparse import Namespace

from fastapi import FastAPI

logger = logging.getLogger("hogwild.plugin")


class HogwildEndpoints:
    """Adds /train, /train/status, /train/{job_id} and /score (bare and /v1)."""

    name = "hogwild"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from .routes import router

        app.include_router(router)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:
            return
        from .frontend import Frontend

        fe = Frontend(engine_client, args)
        await fe.start()
        state.hogwild = fe

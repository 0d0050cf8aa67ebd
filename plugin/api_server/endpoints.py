"""``vllm.endpoint_plugins`` entry point: the plugin's routes in vLLM's API server."""

from __future__ import annotations

import logging
from argparse import Namespace

from fastapi import FastAPI

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it


class HogwildEndpoints:
    """Adds /train, /train/status, /train/{job_id} (GET, DELETE), /score, /checkpoint and the
    readout routes (each bare and under /v1), readouts on vLLM's completion routes, and the weights' version on their answers."""

    name = "hogwild"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from .limits import BodySizeLimit, Limits
        from .readout_http import ReadoutMiddleware
        from .routes import PATH_PREFIXES, router
        from .weights_version_header import WeightsVersionHeader

        app.include_router(router)
        app.add_middleware(ReadoutMiddleware)
        app.add_middleware(WeightsVersionHeader)
        app.add_middleware(BodySizeLimit, prefixes=PATH_PREFIXES, max_bytes=Limits.from_env().max_body_bytes)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:
            return
        from .frontend import Frontend

        fe = Frontend(engine_client, args, getattr(state, "openai_serving_models", None))
        await fe.start()
        state.hogwild = fe

"""Inside the API server: the trainer's adapters as vLLM serves them (``--enable-lora``).

The trainer reports each adapter it holds with its live PEFT directory and a version, one
more per optimizer step (``TrainerStatus.served_adapters``). ``sync`` makes vLLM serve what
the trainer holds, through vLLM's own paths only:

- an adapter vLLM does not know yet is registered as ``/v1/load_lora_adapter`` would
  (``OpenAIServingModels.load_lora_adapter``): from then on ``"model": "<name>"`` selects it on
  the completion routes and ``/v1/score``, and ``/v1/models`` lists it;
- a newer version is vLLM's model worker's to take: it copies it in itself before the next
  forward pass that uses the adapter (``model_runner/adapter_refresh.py``, from the trainer's stamp);
  here the prefix cache is reset (its blocks were computed with the old factors);
- an adapter the trainer no longer holds is unregistered and removed from the engine.

Each API server process keeps its own registration (vLLM's model list is per process).
Errors here never fail the caller's request: they are logged and retried at the next sync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from hogwild.contracts.served_adapter import DEFAULT_RANK, AdapterSpec, ServedAdapter

from ..model_runner.vllm_internals import adapter_registration, is_error_response
from .http_errors import ApiError

logger = logging.getLogger("vllm.hogwild")


class AdapterRegistry:
    def __init__(self, engine_client, serving_models, live_root: Path, served_names: list[str],
                 reset_cache: Callable[[], Awaitable[None]]):
        self.engine = engine_client
        self.models = serving_models  # vLLM's OpenAIServingModels (None: a server with no OpenAI routes)
        self.lora = engine_client.vllm_config.lora_config  # None without --enable-lora
        self.live_root = live_root.resolve()
        self.served_names = served_names
        self.reset_cache = reset_cache
        self.synced: dict[str, tuple[str, int]] = {}  # adapter -> (trainer id, version) vLLM serves
        self.failed: dict[str, str] = {}  # adapter -> why vLLM did not load its last version (retried at each sync)
        self.lock = asyncio.Lock()

    def check(self, spec: AdapterSpec) -> None:
        """Refuse, before the trainer sees it, a job whose adapter vLLM could not serve."""
        if self.lora is None or self.models is None:
            raise ApiError(501, "training an adapter needs vLLM's multi-LoRA: start the server with --enable-lora "
                           "(and --max-lora-rank at least the adapter's rank)", "adapter")
        known = self.models.lora_requests.get(spec.name)
        rank = spec.rank if spec.rank is not None or known is not None else DEFAULT_RANK  # a new adapter's default
        if rank is not None and rank > self.lora.max_lora_rank:
            given = f"adapter_rank {rank}" if spec.rank is not None else f"a new adapter's default rank {rank}"
            raise ApiError(422, f"{given} is above the server's --max-lora-rank "
                           f"{self.lora.max_lora_rank}: ask for a smaller rank or restart with a larger --max-lora-rank",
                           "adapter_rank")
        if spec.name in self.served_names:
            raise ApiError(422, f"adapter {spec.name!r} is the served model's name: name the adapter otherwise", "adapter")
        if known is not None and not self.is_ours(known.lora_path):
            raise ApiError(409, f"adapter {spec.name!r} is an adapter vLLM loaded from {known.lora_path} (--lora-modules "
                           "or /v1/load_lora_adapter), not one this server trains: name the adapter otherwise", "adapter")

    def knows(self, name: str) -> bool:
        """Whether vLLM serves an adapter of that name in this process."""
        return self.models is not None and name in self.models.lora_requests

    def is_ours(self, path: str) -> bool:
        return Path(path).resolve().parent == self.live_root

    def request_for(self, model: str | None):
        """vLLM's ``LoRARequest`` for ``model`` when it names an adapter; None for the base."""
        if model is None or model in self.served_names:
            return None
        request = self.models.lora_requests.get(model) if self.models is not None else None
        if request is None:
            adapters = sorted(self.models.lora_requests) if self.models is not None else []
            raise ApiError(404, f"The model `{model}` does not exist: the served model is {self.served_names[0]!r}"
                           + (f", its adapters {', '.join(adapters)}" if adapters else ""), "model")
        return request

    async def sync(self, trainer_id: str, adapters: list[ServedAdapter]) -> None:
        """Make vLLM serve the adapters the trainer holds, as they are now."""
        if self.lora is None or self.models is None:
            return
        async with self.lock:
            changed = False
            for adapter in adapters:
                if self.synced.get(adapter.name) == (trainer_id, adapter.version):
                    continue
                try:
                    changed |= await self._serve(adapter)
                except Exception as exc:
                    logger.exception("hogwild: vLLM could not load adapter %s (version %d)", adapter.name, adapter.version)
                    self.failed[adapter.name] = f"{type(exc).__name__}: {exc}"
                    continue
                self.synced[adapter.name] = (trainer_id, adapter.version)
                self.failed.pop(adapter.name, None)
            for name in set(self.synced) - {a.name for a in adapters}:
                await self._forget(name)
            if changed:
                await self.reset_cache()

    async def _serve(self, adapter: ServedAdapter) -> bool:
        """Register a new adapter; True when vLLM served an older version of it (which its model
        worker replaces before the adapter's next use)."""
        known = self.models.lora_requests.get(adapter.name)
        if known is None:
            result = await self.models.load_lora_adapter(adapter_registration(adapter.name, adapter.path))
            if is_error_response(result):
                raise RuntimeError(result.error.message)
            logger.info("hogwild: serving adapter %s (version %d)", adapter.name, adapter.version)
            return False
        if not self.is_ours(known.lora_path):
            raise RuntimeError(f"the name is taken by an adapter vLLM loaded from {known.lora_path}")
        return True

    async def _forget(self, name: str) -> None:
        known = self.models.lora_requests.get(name)
        self.synced.pop(name, None)
        if known is None or not self.is_ours(known.lora_path):
            return
        await self.models.unload_lora_adapter(adapter_registration(name))
        remove = getattr(self.engine, "remove_lora", None)  # not in the EngineClient protocol: AsyncLLM's
        if remove is not None:
            await remove(known.lora_int_id)
        logger.info("hogwild: adapter %s removed", name)

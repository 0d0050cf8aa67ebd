"""Inside the API server: the plugin's state and the work behind its routes.

Holds the engine client (public ``EngineClient`` methods only: ``generate``
for scoring and ``reset_prefix_cache`` after updates), the trainer client, and
the trainer process when this API server process owns it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from argparse import Namespace
from pathlib import Path

from hogwild.worker.protocol import Event, JobInfo, JobOp, StatusOp, SubmitOp

from .auth import Access
from .http_errors import ApiError
from .schemas import ScoreRequest, TrainRequest
from .scoring import prompt_token_logprobs, range_totals
from .session import ensure_session_dir
from .trainer_client import TrainerClient, TrainerError
from .trainer_process import TrainerProcess
from .weight_export import unsupported_reason

logger = logging.getLogger("hogwild.plugin")

# Trainer error code -> HTTP status.
STATUS_OF = {"invalid": 422, "not_found": 404, "unsupported": 501, "unavailable": 503}
RETRY_AFTER = {"Retry-After": "5"}


def default_state_dir(model: str) -> Path:
    """Where the trainer keeps what outlives it (ledger, later checkpoints'
    optimizer state): ``HOGWILD_STATE_DIR``, else one folder per model under
    ``$XDG_STATE_HOME/hogwild`` (``~/.local/state/hogwild``)."""
    if os.environ.get("HOGWILD_STATE_DIR"):
        return Path(os.environ["HOGWILD_STATE_DIR"])
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "hogwild"
    resolved = str(Path(model).resolve()) if Path(model).exists() else model
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(resolved).name or "model")[:64]
    return base / f"{slug}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def as_api_error(exc: TrainerError) -> ApiError:
    status = STATUS_OF.get(exc.code, 500)
    return ApiError(status, str(exc), headers=RETRY_AFTER if status == 503 else None)


class Frontend:
    def __init__(self, engine_client, args: Namespace):
        self.engine = engine_client
        config = engine_client.vllm_config
        self.vocab_size = config.model_config.get_vocab_size()
        self.max_model_len = config.model_config.max_model_len
        self.served_names = list(getattr(args, "served_model_name", None) or [args.model])
        self.access = Access(args)
        self.unsupported = unsupported_reason(config)
        self.session = ensure_session_dir()
        self.state_dir = default_state_dir(str(config.model_config.model))
        self.process = TrainerProcess(self.session, self.state_dir, threads=_env_int("HOGWILD_TRAINER_THREADS"))
        self.client: TrainerClient | None = None
        self.cache_state: tuple[str | None, int] = (None, -1)
        self.cache_lock = asyncio.Lock()

    async def start(self) -> None:
        if self.unsupported:
            logger.warning("hogwild: training disabled: %s", self.unsupported)
            return
        if self.process.try_own():
            self.process.start()
            self.process.watcher = asyncio.get_running_loop().create_task(self.process.watch())
        self.client = TrainerClient(self.session, on_event=self.on_event)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.process.stop()

    # ---- trainer calls ----------------------------------------------------

    async def call(self, body, timeout: float = 30.0) -> dict:
        if self.unsupported:
            raise ApiError(501, self.unsupported)
        try:
            return await self.client.request(body, timeout=timeout)
        except TrainerError as exc:
            raise as_api_error(exc) from None

    async def on_event(self, event: Event) -> None:
        if event.weights_changed:
            await self.refresh_prefix_cache(event.trainer_id, event.weights_version)

    async def refresh_prefix_cache(self, trainer_id: str, version: int) -> None:
        """Drop KV blocks computed with older weights (once per weight version).

        A plain reset only succeeds when no request holds KV blocks; otherwise
        running requests are preempted and recomputed with the new weights, so
        no cached block from before the update can answer a later request.
        """
        async with self.cache_lock:
            seen_trainer, seen_version = self.cache_state
            if seen_trainer == trainer_id and seen_version >= version:
                return
            if not await self.engine.reset_prefix_cache():
                await self.engine.reset_prefix_cache(reset_running_requests=True)
            self.cache_state = (trainer_id, version)

    # ---- routes' work -----------------------------------------------------

    def check_tokens(self, ids: list[int], where: str) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ApiError(422, f"{where}: token id {bad} is outside the vocabulary (size {self.vocab_size})", where)

    async def train(self, req: TrainRequest) -> JobInfo:
        for i, s in enumerate(req.samples):
            self.check_tokens(s.context_ids, f"samples.{i}.context_ids")
            self.check_tokens(s.continuation_ids, f"samples.{i}.continuation_ids")
            n = len(s.context_ids) + len(s.continuation_ids)
            if n > self.max_model_len:
                raise ApiError(422, f"samples.{i}: context + continuation is {n} tokens, longer than the model's "
                               f"max length {self.max_model_len}", f"samples.{i}")
        info = JobInfo(**await self.call(SubmitOp(mode=req.mode, samples=req.samples, options=req.options())))
        if req.wait:
            info = await self.wait(info.job_id)
        return info

    async def wait(self, job_id: str) -> JobInfo:
        """Poll the job until it ends, then make sure no stale KV cache remains."""
        while True:
            info = JobInfo(**await self.call(JobOp(job_id=job_id)))
            if info.done:
                break
            await asyncio.sleep(0.1)
        if info.weights_version is not None:
            await self.refresh_prefix_cache(info.trainer_id, info.weights_version)
        return info

    async def job(self, job_id: str) -> JobInfo:
        return JobInfo(**await self.call(JobOp(job_id=job_id)))

    async def status(self) -> dict:
        server = {"session": str(self.session), "state_dir": str(self.state_dir),
                  "trainer_restarts": self.process.restarts, "owns_trainer": self.process.lock_fd is not None}
        if self.unsupported:
            return {"state": "unsupported", "reason": self.unsupported, "server": server}
        try:
            status = await self.client.request(StatusOp(), timeout=10.0)
        except TrainerError as exc:
            return {"state": "unavailable", "reason": str(exc), "server": server}
        return {**status, "server": server}

    async def score(self, req: ScoreRequest) -> list[dict]:
        if req.model is not None and req.model not in self.served_names:
            raise ApiError(404, f"The model `{req.model}` does not exist.", "model")
        self.check_tokens(req.prompt, "prompt")
        if len(req.prompt) >= self.max_model_len:
            raise ApiError(422, f"prompt is {len(req.prompt)} tokens; scoring needs fewer than the model's max length "
                           f"({self.max_model_len})", "prompt")
        for i, (start, end) in enumerate(req.score_ranges):
            if not (0 <= start < end <= len(req.prompt)):
                raise ApiError(422, f"score_ranges.{i}: [{start}, {end}) must satisfy 0 <= start < end <= "
                               f"len(prompt) = {len(req.prompt)}", f"score_ranges.{i}")
        logprobs = await prompt_token_logprobs(self.engine, req.prompt)
        return range_totals(logprobs, req.score_ranges)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None

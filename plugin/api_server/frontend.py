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

from hogwild import envs
from hogwild.contracts.protocol import (
    CancelOp,
    CheckpointOp,
    CheckpointReport,
    Event,
    HeadScoresOp,
    JobInfo,
    JobOp,
    ParityOp,
    StatusOp,
    TrainerStatus,
)
from hogwild.contracts.jobs import SubmitAdapterDeleteOp
from hogwild.contracts.weights_version import WeightsVersionReader

from ..session import ensure_session_dir
from ..trainability import full_weight_refusal, unsupported_reason
from .adapter_registry import AdapterRegistry
from .auth import Access
from .http_errors import ApiError
from .job_requests import job_request
from .limits import Limits
from .metrics import metrics
from .paths import PathPolicy
from .readout_frontend import ReadoutFrontend
from .schemas import CheckpointRequest, ScoreRequest
from .scoring import BadImage, decode_images, prompt_token_logprobs, range_totals
from .trainer_client import TrainerClient, TrainerError, TrainerUnavailable
from .trainer_process import TrainerProcess
from .validation import check_token_ids, validate_job

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it

# Trainer error code -> HTTP status.
STATUS_OF = {"invalid": 422, "not_found": 404, "conflict": 409, "too_large": 413, "busy": 429, "unsupported": 501,
             "unavailable": 503, "timeout": 504}
RETRY_AFTER = {"Retry-After": "5"}
HEARTBEAT_S = 2.0
# How long `wait` keeps waiting through a trainer restart before answering 503.
WAIT_THROUGH_RESTART_S = 300.0
# A `wait` caller is answered by the job_finished event; it asks again this often in case
# the event was lost (the trainer restarted, or the job ended before the caller listened).
WAIT_FALLBACK_POLL_S = 5.0


def default_state_dir(model: str) -> Path:
    """Where the trainer keeps what outlives it (ledger, later checkpoints'
    optimizer state): ``HOGWILD_STATE_DIR``, else one folder per model under
    ``$XDG_STATE_HOME/hogwild`` (``~/.local/state/hogwild``)."""
    if envs.state_dir():
        return envs.state_dir()
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "hogwild"
    resolved = str(Path(model).resolve()) if Path(model).exists() else model
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(resolved).name or "model")[:64]
    return base / f"{slug}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def as_api_error(exc: TrainerError) -> ApiError:
    status = STATUS_OF.get(exc.code, 500)
    return ApiError(status, str(exc), headers=RETRY_AFTER if status in (429, 503, 504) else None)


class Frontend:
    def __init__(self, engine_client, args: Namespace, serving_models=None):
        self.engine = engine_client
        config = engine_client.vllm_config
        self.vocab_size = config.model_config.get_vocab_size()
        self.max_model_len = config.model_config.max_model_len
        self.served_names = list(getattr(args, "served_model_name", None) or [args.model])
        self.access = Access(args)
        self.limits = Limits.from_env()
        self.unsupported = unsupported_reason(config)
        self.adapters_only = full_weight_refusal(config)  # a quantized base: why its weights do not train
        self.session = ensure_session_dir()
        self.state_dir = default_state_dir(str(config.model_config.model))
        model_path = Path(str(config.model_config.model))
        self.paths = PathPolicy.from_env(([model_path] if model_path.is_dir() else []) + [self.state_dir])
        self.process = TrainerProcess(self.session, self.state_dir, threads=envs.trainer_threads())
        self.client: TrainerClient | None = None
        self.cache_state: tuple[str | None, int] = (None, -1)
        self.cache_lock = asyncio.Lock()
        self.heartbeat: asyncio.Task | None = None
        self.waiters: dict[str, list[asyncio.Future]] = {}  # job id -> `wait` callers, answered by job_finished
        self.wait_timeout = envs.wait_timeout_s()
        self.readout = ReadoutFrontend.if_enabled(self.session, config.model_config)
        self.weights_version = WeightsVersionReader(self.state_dir)  # stamped on completions
        # The trainer's adapters, served by vLLM's multi-LoRA (the trainer's live copies are in the session).
        self.adapters = AdapterRegistry(engine_client, serving_models, self.session / "served-adapters", self.served_names,
                                        self.reset_prefix_cache)

    @property
    def readout_inbox(self):
        """What the readout middleware waits on; None while readout is off."""
        return self.readout.inbox if self.readout is not None else None

    async def start(self) -> None:
        if self.readout is not None:
            await self.readout.start()
        if self.access.refusal:
            logger.warning("hogwild: %s", self.access.refusal)
        if self.unsupported:
            logger.warning("hogwild: training disabled: %s", self.unsupported)
            return
        if self.process.try_own():
            self.process.start()
            self.process.watcher = asyncio.get_running_loop().create_task(self.process.watch())
        self.client = TrainerClient(self.session, on_event=self.on_event)
        self.process.on_exit = self.client.fail_pending
        self.heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Keep in touch with the trainer. A trainer we have not seen before means
        the last one died, possibly in the middle of a step: no KV block cached
        before now can be trusted."""
        while True:
            try:
                status = await self.client.request(StatusOp(), timeout=10.0)
                if status.state == "verifying":
                    await self.check_parity(status.parity["probe_ids"])
                    status = await self.client.request(StatusOp(), timeout=10.0)
                self.publish(status)
                if status.state == "ready":
                    self.process.ready_pid = status.pid
                    await self.adapters.sync(status.trainer_id, status.served_adapters)
                idle = status.running is None and not status.queue
                if status.trainer_id != self.cache_state[0] or (idle and status.weights_version != self.cache_state[1]):
                    await self.refresh_prefix_cache(status.trainer_id, status.weights_version)
            except TrainerError:
                self.publish(None)
            except Exception:
                logger.exception("hogwild: heartbeat failed")
            await asyncio.sleep(HEARTBEAT_S)

    def publish(self, status: TrainerStatus | None) -> None:
        """The trainer's figures on /metrics: from the API server process that owns the trainer
        only, so that with several processes they are counted once (``metrics.py``)."""
        if self.process.lock_fd is not None:
            metrics().refresh(status, self.process.restarts)

    async def check_parity(self, probe: list[int]) -> None:
        """The parity gate: vLLM's log-probabilities of the trainer's probe prompt, from
        the engine, for the trainer to compare with its own (``worker/parity.py``)."""
        logprobs = await prompt_token_logprobs(self.engine, probe)
        result = await self.client.request(ParityOp(engine_logprobs=logprobs[1:]), timeout=120.0)
        logger.log(logging.INFO if result.state == "passed" else logging.ERROR,
                   "hogwild: parity gate %s (max |d log p| %.3g over %d positions)", result.state,
                   result.max_abs_diff if result.max_abs_diff is not None else float("nan"), len(probe) - 1)

    # ---- trainer calls ----------------------------------------------------

    async def call(self, body, timeout: float = 30.0):
        """The op's typed result from the trainer; its errors as HTTP errors."""
        if self.unsupported:
            raise ApiError(501, self.unsupported)
        try:
            return await self.client.request(body, timeout=timeout)
        except TrainerUnavailable as exc:
            raise as_api_error(TrainerUnavailable(self.why_unavailable(exc))) from None
        except TrainerError as exc:
            raise as_api_error(exc) from None

    def why_unavailable(self, exc: TrainerUnavailable) -> str:
        """The error, with why the last trainer process ended when this process knows."""
        last = self.process.last_exit
        return f"{exc}; {last} ({self.process.restarts} restarts so far)" if last else str(exc)

    async def on_event(self, event: Event) -> None:
        status = None
        if self.process.lock_fd is not None or event.job.adapter is not None:
            try:
                status = await self.client.request(StatusOp(), timeout=10.0)
            except TrainerError:
                pass
        if status is not None and self.process.lock_fd is not None:  # the metrics show the job before anyone hears it ended
            self.publish(status)
        if status is not None and event.job.adapter is not None:  # vLLM serves what the job trained before anyone hears it ended
            await self.adapters.sync(status.trainer_id, status.served_adapters)
        for waiter in self.waiters.pop(event.job.job_id, []):
            if not waiter.done():
                waiter.set_result(event.job)
        # While jobs run back to back, requests see the weights mid-training anyway
        # (HOGWILD); the cache is reset once the trainer falls idle, and always
        # before a `wait` caller is answered.
        if event.trainer_idle and (event.trainer_id, event.weights_version) != self.cache_state:
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
            await self.reset_prefix_cache()
            self.cache_state = (trainer_id, version)

    async def reset_prefix_cache(self) -> None:
        """Drop every cached KV block; if requests hold some, they are preempted and recomputed."""
        if not await self.engine.reset_prefix_cache():
            await self.engine.reset_prefix_cache(reset_running_requests=True)

    async def sync_adapters(self) -> None:
        """vLLM serves the trainer's adapters as they are now (``AdapterRegistry.sync``)."""
        try:
            status = await self.client.request(StatusOp(), timeout=10.0)
        except TrainerError as exc:
            logger.warning("hogwild: adapters not synced: %s", exc)
            return
        await self.adapters.sync(status.trainer_id, status.served_adapters)

    # ---- routes' work -----------------------------------------------------

    async def submit(self, body, wait: bool, idempotency_key: str | None = None) -> JobInfo:
        """Any job: its request built from the body, validated once, queued (once per
        ``idempotency_key``: the trainer answers a key it knows with its job); with ``wait``, its end."""
        op = job_request(body, self.paths).model_copy(update={"idempotency_key": idempotency_key})
        validate_job(op, self.limits, self.vocab_size, self.max_model_len)
        if getattr(op, "adapter", None) is not None:
            if not self.adapters.knows(op.adapter.name) and self.client is not None:
                await self.sync_adapters()  # one the trainer holds but this process has not registered yet
            self.adapters.check(op.adapter)
        elif self.adapters_only and op.adapter_name() is None:
            raise ApiError(501, self.adapters_only)
        info = await self.call(op)
        return await self.wait(info.job_id) if wait else info

    async def wait(self, job_id: str) -> JobInfo:
        """The job's final state, from the job_finished event (asked again every few seconds
        in case the event was lost), once no stale KV cache remains. Waits through a
        trainer restart: the journal lets the next trainer report the job. Gives up after
        ``HOGWILD_WAIT_TIMEOUT_S`` with a 504 that says where the job is (it goes on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        unreachable_since, info = None, None
        while True:
            if loop.time() >= deadline:
                where = f"it is {info.state} (step {info.step} of {info.total_steps})" if info else "its state is unknown"
                raise ApiError(504, f"waited {self.wait_timeout:g} s for job {job_id} to end and {where}; it goes on: "
                               f"GET /train/{job_id} reports its end", headers=RETRY_AFTER)
            waiter = loop.create_future()
            self.waiters.setdefault(job_id, []).append(waiter)  # before asking: an event in between is not missed
            try:
                info = await self.call(JobOp(job_id=job_id))
                unreachable_since = None
                if not info.done:
                    info = await asyncio.wait_for(waiter, max(0.0, min(WAIT_FALLBACK_POLL_S, deadline - loop.time())))
                break
            except asyncio.TimeoutError:
                continue
            except ApiError as exc:
                if exc.status not in (503, 504):  # unreachable, or too busy to answer: ask again
                    raise
                unreachable_since = unreachable_since or loop.time()
                if loop.time() - unreachable_since > WAIT_THROUGH_RESTART_S:
                    raise
                await asyncio.sleep(0.5)
            finally:
                if waiter in self.waiters.get(job_id, []):
                    self.waiters[job_id].remove(waiter)
                    if not self.waiters[job_id]:
                        del self.waiters[job_id]
        if info.weights_version is not None:
            await self.refresh_prefix_cache(info.trainer_id, info.weights_version)
        if info.adapter is not None:
            await self.sync_adapters()
            if info.adapter in self.adapters.failed:  # trained, but vLLM serves an older version (or none)
                info.warnings.append(f"vLLM could not load adapter {info.adapter!r}: {self.adapters.failed[info.adapter]}")
        return info

    async def delete_adapter(self, name: str) -> JobInfo:
        """Queue the adapter's deletion and answer when vLLM no longer serves it."""
        info = await self.call(SubmitAdapterDeleteOp(name=name))
        return await self.wait(info.job_id)

    async def job(self, job_id: str) -> JobInfo:
        return await self.call(JobOp(job_id=job_id))

    async def checkpoint(self, req: CheckpointRequest, adapters: list[str] | None = None) -> CheckpointReport:
        """The whole trainer's state; with ``adapters`` (an adapter key's), those adapters only."""
        target = str(self.paths.confine(req.target, "target")) if req.target is not None else None
        return await self.call(CheckpointOp(target=target, adapters=adapters), timeout=24 * 3600)

    async def cancel(self, job_id: str) -> JobInfo:
        return await self.call(CancelOp(job_id=job_id))

    async def status(self) -> tuple[int, dict]:
        """(HTTP status, body): 503 while the trainer cannot be reached."""
        server = {"session": str(self.session), "state_dir": str(self.state_dir), "trainer_restarts": self.process.restarts,
                  "readout_rows_received": self.readout.inbox.rows_received if self.readout is not None else 0,
                  "owns_trainer": self.process.lock_fd is not None, "training_routes_refused": self.access.refusal,
                  "limits": vars(self.limits), "path_roots": [str(r) for r in self.paths.roots]}
        if self.unsupported:
            return 200, {"state": "unsupported", "reason": self.unsupported, "server": server}
        try:
            status = await self.client.request(StatusOp(), timeout=10.0)
        except TrainerUnavailable as exc:
            return 503, {"state": "unavailable", "reason": self.why_unavailable(exc), "server": server}
        return 200, {**status.model_dump(), "server": server}

    def images_of(self, req: ScoreRequest) -> tuple[list | None, int | None]:
        """The request's images, decoded, and the model's image placeholder token; 422 for
        images a text-only model cannot take, or that are not images."""
        if req.multi_modal_data is None:
            return None, None
        try:
            images = decode_images(req.multi_modal_data.images())
        except BadImage as exc:
            raise ApiError(422, str(exc), str(exc).partition(":")[0]) from None
        config = self.engine.vllm_config.model_config
        placeholder = getattr(config.hf_config, "image_token_id", None)
        if not config.supports_multimodal_inputs or placeholder is None:
            raise ApiError(422, f"multi_modal_data: the served model takes no images ({config.architecture}"
                           f"{', served with --language-model-only' if config.is_multimodal_model else ''})", "multi_modal_data")
        found = sum(t == placeholder for t in req.prompt)
        if found != len(images):
            raise ApiError(422, f"multi_modal_data: {len(images)} images, but the prompt has {found} image placeholder "
                           f"tokens ({placeholder}), one per image", "multi_modal_data")
        return images, placeholder

    async def score(self, req: ScoreRequest) -> list[dict]:
        adapter = self.adapters.request_for(req.model)
        if adapter is not None and req.heads:
            raise ApiError(422, "heads: the reward heads read the base model; score heads without model (or with the "
                           "served model's name)", "heads")
        check_token_ids([("prompt", req.prompt)], self.vocab_size)
        if len(req.prompt) >= self.max_model_len:
            raise ApiError(422, f"prompt is {len(req.prompt)} tokens; scoring needs fewer than the model's max length "
                           f"({self.max_model_len})", "prompt")
        for i, (start, end) in enumerate(req.score_ranges):
            if not (0 <= start < end <= len(req.prompt)):
                raise ApiError(422, f"score_ranges.{i}: [{start}, {end}) must satisfy 0 <= start < end <= "
                               f"len(prompt) = {len(req.prompt)}", f"score_ranges.{i}")
        images, placeholder = self.images_of(req)
        logprobs = await prompt_token_logprobs(self.engine, req.prompt, req.priority, images, placeholder, adapter)
        scores = range_totals(logprobs, req.score_ranges)
        if req.heads:
            # One trunk forward in the trainer, every head at each range's last token.
            wanted = req.heads if isinstance(req.heads, list) else None
            positions = [end - 1 for _, end in req.score_ranges]
            heads = await self.call(HeadScoresOp(token_ids=req.prompt, positions=positions, heads=wanted))
            for entry, row in zip(scores, heads.scores):
                entry["heads"] = dict(zip(heads.heads, row))
        return scores

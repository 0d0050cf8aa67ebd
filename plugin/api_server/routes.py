"""The plugin's HTTP routes, each served bare and under /v1."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse

from hogwild.contracts.jobs import IDEMPOTENCY_KEY_HEADER, IDEMPOTENCY_KEY_MAX
from hogwild.contracts.protocol import CheckpointReport, JobInfo
from hogwild.contracts.served_adapter import ADAPTER_NAME

from .frontend import RETRY_AFTER, Frontend
from .http_errors import ApiError, PluginRoute
from .schemas import (
    CheckpointRequest,
    ReadoutLoadRequest,
    ReadoutTrainRequest,
    RevertRequest,
    ScoreRequest,
    ScoreResponse,
    TrainBody,
)

router = APIRouter(route_class=PluginRoute)
# A job request sent again with the key it was first sent with is answered with that job, never
# queued twice: a client may retry a /train whose answer it lost.
IdempotencyKey = Annotated[str | None, Header(alias=IDEMPOTENCY_KEY_HEADER, min_length=1, max_length=IDEMPOTENCY_KEY_MAX)]


def frontend(request: Request) -> Frontend:
    fe = getattr(request.app.state, "hogwild", None)
    if fe is None:
        raise ApiError(503, "the hogwild plugin has no engine in this server (render-only server?)")
    return fe


def admin(request: Request) -> Frontend:
    fe = frontend(request)
    fe.access.require_admin(request)
    return fe


def reader(request: Request) -> Frontend:
    fe = frontend(request)
    fe.access.require_reader(request)
    return fe


def both(path: str) -> list[str]:
    return [path, "/v1" + path]


PATH_PREFIXES = tuple(p for base in ("/train", "/score", "/checkpoint", "/readout", "/adapters") for p in both(base))


async def train(body: TrainBody, request: Request, key: IdempotencyKey = None, fe: Frontend = Depends(frontend)) -> JobInfo:
    """Queue a supervised full-weight update (default mode ``sft``; with ``adapter``, of that
    adapter on the frozen base), a reward-head training (mode ``btrm``) or a circuit-breaker
    LoRA merged into the served weights (mode ``circuit_breaker``); ``wait: true`` answers
    when it is done. The admin key, or an adapter key for its own adapters."""
    fe.access.require_adapter(request, getattr(body, "adapter", None))
    return await fe.submit(body, body.wait, key)


async def delete_adapter(name: Annotated[str, Path(pattern=ADAPTER_NAME)], request: Request, fe: Frontend = Depends(frontend)) -> JobInfo:
    """Forget a served adapter once the jobs queued before are done: vLLM stops serving it and
    its copies are deleted. The admin key, or an adapter key for its own adapters."""
    fe.access.require_adapter(request, name)
    return await fe.delete_adapter(name)


async def revert(body: RevertRequest | None = None, key: IdempotencyKey = None, fe: Frontend = Depends(admin)) -> JobInfo:
    """Subtract a merged circuit-breaker adapter from the served weights, bit for
    bit when nothing was trained after it (latest first; ``job_id`` names one)."""
    body = body or RevertRequest()
    return await fe.submit(body, body.wait, key)


async def train_status(fe: Frontend = Depends(reader)) -> JSONResponse:
    """Queue, running job with progress, recent results, optimizer and memory
    (503 with Retry-After while the trainer restarts)."""
    code, body = await fe.status()
    return JSONResponse(body, status_code=code, headers=RETRY_AFTER if code == 503 else None)


async def train_job(job_id: str, fe: Frontend = Depends(reader)) -> JobInfo:
    """One job's state and result."""
    return await fe.job(job_id)


async def cancel_job(job_id: str, fe: Frontend = Depends(admin)) -> JobInfo:
    """Cancel a queued job, or stop a running one after its current step (409 if it has ended)."""
    return await fe.cancel(job_id)


async def checkpoint(request: Request, body: CheckpointRequest | None = None,
                     fe: Frontend = Depends(frontend)) -> CheckpointReport:
    """Sync the served weights into the model directory now (changed 4 KiB blocks only),
    with the optimizer state, the ledger and each served adapter as a PEFT directory in
    ``adapters/<name>``; the report says what was written. An adapter key checkpoints its
    own adapters only, into the served directory."""
    scope = fe.access.require_trainer(request)
    body = body or CheckpointRequest()
    if scope is not None and body.target is not None:
        raise ApiError(403, "an adapter key checkpoints its adapters into the served directory only: leave target out")
    return await fe.checkpoint(body, sorted(scope) if scope is not None else None)


async def score(body: ScoreRequest, fe: Frontend = Depends(reader)) -> ScoreResponse:
    """Total log-likelihood of each range of the prompt, from vLLM's engine."""
    return ScoreResponse(scores=await fe.score(body))


def readout(fe: Frontend):
    if fe.readout is None:
        raise ApiError(404, "readout is off: start the server with VLLM_READOUT_VECTORS=/path/readout.safetensors")
    return fe.readout


async def readout_manifest(fe: Frontend = Depends(reader)) -> dict:
    """The concept vectors' manifest (concepts, layers, hidden_size, dtype) and
    the set's version; 404 while readout is off."""
    return readout(fe).manifest()


async def readout_load(body: ReadoutLoadRequest, fe: Frontend = Depends(admin)) -> dict:
    """Check a vector set against the served model and read out with it from the
    next request on (requests already running keep theirs); 422 if it does not fit."""
    state = readout(fe)
    manifest = fe.paths.confine(body.manifest, "manifest") if body.manifest is not None else None
    return state.load(fe.paths.confine(body.vectors, "vectors"), manifest)


async def readout_train(body: ReadoutTrainRequest, key: IdempotencyKey = None, fe: Frontend = Depends(admin)) -> JobInfo:
    """Train concept vectors on the live weights in the training process (inference
    goes on), write them to ``out`` and, while readout is on, read out with them
    from then on; ``wait: true`` answers when it is done."""
    return await fe.submit(body, body.wait, key)


for path in both("/readout/train"):
    router.add_api_route(path, readout_train, methods=["POST"], response_model=JobInfo)
for path in both("/readout/manifest"):
    router.add_api_route(path, readout_manifest, methods=["GET"])
for path in both("/readout/load"):
    router.add_api_route(path, readout_load, methods=["POST"])
for path in both("/train"):
    router.add_api_route(path, train, methods=["POST"], response_model=JobInfo)
for path in both("/train/revert"):
    router.add_api_route(path, revert, methods=["POST"], response_model=JobInfo)
for path in both("/train/status"):
    router.add_api_route(path, train_status, methods=["GET"])
for path in both("/train/{job_id}"):
    router.add_api_route(path, train_job, methods=["GET"], response_model=JobInfo)
    router.add_api_route(path, cancel_job, methods=["DELETE"], response_model=JobInfo)
for path in both("/adapters/{name}"):
    router.add_api_route(path, delete_adapter, methods=["DELETE"], response_model=JobInfo)
for path in both("/checkpoint"):
    router.add_api_route(path, checkpoint, methods=["POST"])
for path in both("/score"):
    router.add_api_route(path, score, methods=["POST"], response_model=ScoreResponse, response_model_exclude_none=True)

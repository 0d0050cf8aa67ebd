"""From a ``/train`` (or ``/train/revert``, ``/readout/train``) body to the trainer's job
request: every path confined to the path roots first, a BTRM config read from the
server when given by path."""

from __future__ import annotations

from pathlib import Path

from hogwild.contracts.btrm_config import BTRMConfig, load_config
from hogwild.contracts.jobs import (
    SubmitBTRMOp,
    SubmitCircuitBreakerOp,
    SubmitOp,
    SubmitPreferenceOp,
    SubmitReadoutOp,
    SubmitRevertOp,
    SubmitRLOp,
)

from .http_errors import ApiError
from .paths import PathPolicy
from .schemas import (
    BTRMTrainRequest,
    CircuitBreakerTrainRequest,
    PreferenceTrainRequest,
    ReadoutTrainRequest,
    RevertRequest,
    RLTrainRequest,
    TrainRequest,
)


def job_request(body, paths: PathPolicy):
    """The job request for a validated HTTP body."""
    if isinstance(body, TrainRequest):
        return SubmitOp(mode=body.mode, samples=body.samples, options=body.options(), adapter=body.adapter_spec())
    if isinstance(body, PreferenceTrainRequest):
        return SubmitPreferenceOp(samples=body.samples, options=body.options(), adapter=body.adapter_spec())
    if isinstance(body, RLTrainRequest):
        return SubmitRLOp(samples=body.samples, options=body.options(), adapter=body.adapter_spec())
    if isinstance(body, BTRMTrainRequest):
        return _btrm(body, paths)
    if isinstance(body, CircuitBreakerTrainRequest):
        dataset = str(paths.confine(body.dataset_path, "dataset_path")) if body.dataset_path is not None else None
        return SubmitCircuitBreakerOp(config=body.config, samples=body.samples, dataset_path=dataset)
    if isinstance(body, RevertRequest):
        return SubmitRevertOp(job_id=body.job_id)
    if isinstance(body, ReadoutTrainRequest):
        return SubmitReadoutOp(stories=str(paths.confine(body.stories, "stories")), layers=body.layers,
                               aggregator=body.aggregator, out=str(paths.confine(body.out, "out")),
                               min_positives=body.min_positives, dtype=body.dtype)
    raise TypeError(f"no job request for {type(body).__name__}")


def _btrm(body: BTRMTrainRequest, paths: PathPolicy) -> SubmitBTRMOp:
    if body.config_path is not None:
        path = paths.confine(body.config_path, "config_path")
        try:
            config, base = load_config(path), path.parent
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise ApiError(422, f"config_path: {exc}", "config_path") from None
    else:
        config, base = body.config, paths.roots[0]
    if body.samples is None:  # the trainer reads the config's sources: confine them first
        config = _confined_sources(config, base, paths)
    return SubmitBTRMOp(config=config, samples=body.samples)


def _confined_sources(config: BTRMConfig, base: Path, paths: PathPolicy) -> BTRMConfig:
    """The config with every source path absolute and inside the path roots."""
    def fix(spec, where):
        p = Path(spec.path)
        return spec.model_copy(update={"path": str(paths.confine(str(p if p.is_absolute() else base / p), where))})

    heads = [h.model_copy(update={
        "positive_sources": [fix(s, f"config.heads.{i}.positive_sources.{j}.path") for j, s in enumerate(h.positive_sources)],
        "negative_sources": [fix(s, f"config.heads.{i}.negative_sources.{j}.path") for j, s in enumerate(h.negative_sources)],
    }) for i, h in enumerate(config.heads)]
    shared = [fix(s, f"config.shared_negatives.{j}.path") for j, s in enumerate(config.shared_negatives)]
    return config.model_copy(update={"heads": heads, "shared_negatives": shared})

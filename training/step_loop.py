"""The one step loop of every full-weight training mode (SFT, preference, RL).

A mode is a loss on it (``ModeLoss``: as TRL's ``compute_loss``, a function of a micro-batch
of the mode's items) with its own metrics; everything else is the same for every mode and is
here, readable top to bottom: plan the steps, measure the loss (and the mode's metrics) on a
bounded sample, then for each step stop if asked, take one step of the server's one
optimizer (``SFTTrainer.step``: non-finite steps refused with the weights untouched,
clipping, bf16 rounding), keep its history and tell the caller; then measure again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from hogwild.contracts.sft_config import SFTOptions, count_steps

if TYPE_CHECKING:
    from .sft import SFTTrainer

HISTORY = 512  # per-step numbers kept in a job's result


class ModeLoss(Protocol):
    """What a training mode gives the loop."""

    def weight(self, item) -> float:
        """The item's weight in its step's loss: a step's loss is the mean of its micro-batches'
        losses, each weighted by the summed weight of its items (so micro-batching changes nothing)."""

    def tokens(self, item) -> int:
        """The tokens the item trains, as the result's ``tokens`` counts them."""

    def __call__(self, items: list) -> tuple[torch.Tensor, Any]:
        """(the items' loss, the mode's statistics of them for ``metrics``, detached)."""

    def metrics(self, stats: list) -> dict[str, float]:
        """The mode's numbers over the statistics of a step's (or a measurement's) micro-batches."""


@dataclass
class StepsResult:
    """What the loop did; each mode's result adds its own measurements."""

    steps: int = 0
    steps_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    last_loss: float | None = None
    last_grad_norm: float | None = None
    tokens: int = 0  # what the mode's ``tokens`` counts, over the optimizer steps taken
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    optimizer_reset: bool = False
    optimizer_step: int = 0  # global step count after this job
    stopped_early: bool = False
    rounding: str = "nearest"  # how updates were written into bf16/fp16 weights
    last_step_at: float | None = None  # wall-clock time the last optimizer step ended
    history: list[dict] = field(default_factory=list)  # per step (the first HISTORY): loss, grad_norm, the mode's metrics

    def as_dict(self) -> dict:
        return asdict(self)


def plan_steps(n_samples: int, options: SFTOptions) -> list[list[int]]:
    """Sample indices of each optimizer step, epoch by epoch."""
    batch = options.batch_size or n_samples
    rng = random.Random(options.seed)
    total = count_steps(n_samples, options)
    plan: list[list[int]] = []
    while len(plan) < total:
        order = list(range(n_samples))
        if options.shuffle:
            rng.shuffle(order)
        plan.extend(order[i : i + batch] for i in range(0, n_samples, batch))
    return plan[:total]


def evaluation_items(items: Sequence, max_tokens: int, labelled: Callable[[Any], int]) -> list:
    """The first items up to ``max_tokens`` labelled tokens (at least one; none if 0): what
    the before and after measurements are made on, so that a job pays a bounded price for
    them, not two extra passes over all its data."""
    chosen, tokens = [], 0
    for item in items if max_tokens > 0 else ():
        if chosen and tokens + labelled(item) > max_tokens:
            break
        chosen.append(item)
        tokens += labelled(item)
    return chosen


def micro_batches(loss: ModeLoss, items: list, micro_batch_size: int, stats: list,
                  total: float | None = None) -> Iterator[tuple[torch.Tensor, float]]:
    """(loss, share of the step) of each micro-batch of ``items``, its forward run when asked
    for; each micro-batch's statistics are appended to ``stats``. ``total``: the step's whole
    weight, when ``items`` are only this replica's share of it (data parallel)."""
    total = sum(loss.weight(item) for item in items) if total is None else total
    for i in range(0, len(items), micro_batch_size):
        chunk = items[i : i + micro_batch_size]
        value, chunk_stats = loss(chunk)
        stats.append(chunk_stats)
        yield value, sum(loss.weight(item) for item in chunk) / total


@torch.no_grad()
def measure(loss: ModeLoss, items: list, micro_batch_size: int) -> dict | None:
    """The mode's metrics and its loss over ``items``, without touching any state (None: no items)."""
    if not items:
        return None
    stats: list = []
    value = sum(float(v) * share for v, share in micro_batches(loss, items, micro_batch_size, stats))
    return {**loss.metrics(stats), "loss": value}


def run_steps(weights: SFTTrainer, loss: ModeLoss, items: Sequence, options: SFTOptions, result: StepsResult,
              evaluated: list, on_step: Callable[[int, int, Any], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[dict | None, dict | None]:
    """Train on ``items`` with the server's optimizer (``weights``) as ``options`` say, filling
    ``result``; returns the measurements on ``evaluated`` before the first step and after the last."""
    result.optimizer_reset, result.rounding = weights.prepare(options)
    plan = plan_steps(len(items), options)
    before = measure(loss, evaluated, options.micro_batch_size)
    started = time.perf_counter()
    for i, index in enumerate(plan):
        if should_stop is not None and should_stop():
            result.stopped_early = True
            break
        batch = [items[j] for j in index]
        stats: list = []
        # Across replicas (data parallel) each trains its share, weighted as a part of the whole batch.
        mine = weights.data_parallel.share(batch, loss.weight) if weights.data_parallel is not None else batch
        parts = micro_batches(loss, mine, options.micro_batch_size, stats, sum(loss.weight(item) for item in batch))
        value, grad_norm, skip_reason = weights.step(parts, options)
        result.last_loss, result.last_grad_norm = value, grad_norm
        if skip_reason is None:
            result.steps += 1
            result.tokens += sum(loss.tokens(item) for item in batch)
            if len(result.history) < HISTORY:
                result.history.append({"step": weights.global_step, "loss": value, "grad_norm": grad_norm, **loss.metrics(stats)})
        else:
            result.steps_skipped += 1
            result.skip_reasons.append(f"step {i}: {skip_reason}")
        result.last_step_at = time.time()
        if on_step is not None:
            on_step(i + 1, len(plan), result)
    result.train_seconds = time.perf_counter() - started
    result.tokens_per_s = result.tokens / result.train_seconds if result.train_seconds > 0 else 0.0
    after = measure(loss, evaluated, options.micro_batch_size)
    result.optimizer_step = weights.global_step
    return before, after

"""Supervised full-weight training on (context, continuation) samples.

The trainer is a loop you can read top to bottom: plan the batches, then for each
one run forward/backward over micro-batches, refuse the step if the loss or the
gradients are not finite (the weights stay bit-identical), clip, and take one
APOLLO step. One optimizer lives across calls, so its state persists between jobs;
preference training (``preference.py``) steps the same one (``prepare``, ``step``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from hogwild.contracts.sft_config import ApolloHyper, ApolloStructure, Rounding, SFTOptions, count_steps

from .apollo import apply_hyper, build_optimizer, is_projected, optimizer_state_bytes
from .batches import Sample, collate
from .losses import continuation_nll, token_nll
from .optimizer_state import load_optimizer_state, optimizer_state_to_bytes, read_extra
from .rounding import default_rounding, rounding_generator, small_update_warning, typical_spacing
from .tensor_parallel import global_grad_norm, sync_gradients, sync_replicated

HISTORY = 512  # per-step numbers kept in a job's result


@dataclass
class SFTResult:
    """What a job did, as reported by ``/train/status``."""

    steps: int = 0
    steps_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    loss_before: float | None = None
    loss_after: float | None = None
    last_loss: float | None = None
    last_grad_norm: float | None = None
    tokens: int = 0  # labelled (continuation) tokens processed by optimizer steps
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    optimizer_reset: bool = False
    optimizer_step: int = 0  # global step count after this job
    stopped_early: bool = False
    rounding: Rounding = "nearest"  # how updates were written into bf16/fp16 weights
    eval_samples: int = 0  # the samples loss_before and loss_after were measured on
    last_step_at: float | None = None  # wall-clock time the last optimizer step ended
    history: list[dict] = field(default_factory=list)  # per step (the first HISTORY): loss, grad_norm

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


def evaluation_sample(samples: Sequence[Sample], max_tokens: int) -> list[Sample]:
    """The first samples up to ``max_tokens`` continuation tokens (at least one; none if 0):
    what loss_before and loss_after are measured on, so that a job pays a bounded price
    for them, not two extra passes over all its data."""
    if max_tokens <= 0:
        return []
    chosen, tokens = [], 0
    for s in samples:
        if chosen and tokens + len(s.continuation_ids) > max_tokens:
            break
        chosen.append(s)
        tokens += len(s.continuation_ids)
    return chosen


def warmup_lr(peak: float, warmup_steps: int, step: int) -> float:
    """Linear warm-up: step 0 gets peak/(warmup+1), full lr from step ``warmup_steps``."""
    if step >= warmup_steps:
        return peak
    return peak * (step + 1) / (warmup_steps + 1)


class SFTTrainer:
    """Holds a causal LM and one APOLLO optimizer across jobs."""

    def __init__(self, model: torch.nn.Module, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id
        self.optimizer: torch.optim.Optimizer | None = None
        self.structure: ApolloStructure | None = None
        self.hyper: ApolloHyper | None = None
        self.global_step = 0
        self.device = next(model.parameters()).device
        # A tensor-parallel rank's model (``tensor_parallel.parallelize``): its logits are split by vocabulary.
        self.tensor_parallel = getattr(model, "hogwild_tensor_parallel", None)
        self.token_nll = self.tensor_parallel.vocab.nll if self.tensor_parallel else token_nll
        # The smallest change a typical projected weight can hold (None in fp32).
        self.weight_spacing = typical_spacing([p for n, p in model.named_parameters() if is_projected(n, p)])

    def warnings(self, n_samples: int, options: SFTOptions) -> list[str]:
        """What a user should know before this job runs (a learning rate too small for the weights' dtype)."""
        warning = small_update_warning(options.lr, count_steps(n_samples, options), self.weight_spacing)
        return [warning] if warning else []

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer_bytes(self) -> int:
        return optimizer_state_bytes(self.optimizer) if self.optimizer is not None else 0

    def save_state(self) -> tuple[bytes, bytes] | None:
        """The optimizer's state and settings and the step count (see ``optimizer_state``)."""
        if self.optimizer is None:
            return None
        extra = {"structure": self.structure.model_dump(), "hyper": self.hyper.model_dump(), "global_step": self.global_step}
        return optimizer_state_to_bytes(self.optimizer, extra)

    def restore_state(self, tensor_bytes: bytes, json_bytes: bytes) -> None:
        """Rebuild the optimizer saved by ``save_state`` over this model's parameters."""
        extra = read_extra(json_bytes)
        structure, hyper = ApolloStructure(**extra["structure"]), ApolloHyper(**extra["hyper"])
        optimizer = build_optimizer(self.model, structure, hyper)
        load_optimizer_state(optimizer, tensor_bytes, json_bytes)
        self.optimizer, self.structure, self.hyper, self.global_step = optimizer, structure, hyper, int(extra["global_step"])

    @torch.no_grad()
    def evaluate(self, samples: Sequence[Sample], micro_batch_size: int = 8) -> float:
        """Weighted mean NLL of the continuations, without touching any state."""
        total, weight = 0.0, 0.0
        for i in range(0, len(samples), micro_batch_size):
            batch = collate(list(samples[i : i + micro_batch_size]), self.pad_id).to(self.device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, w = continuation_nll(logits, batch.labels, batch.token_weights, self.token_nll)
            total += float(loss) * float(w)
            weight += float(w)
        return total / weight if weight else float("nan")

    def run(
        self,
        samples: Sequence[Sample],
        options: SFTOptions,
        on_step: Callable[[int, int, SFTResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> SFTResult:
        """Train on ``samples`` as ``options`` say; returns what happened."""
        result = SFTResult()
        result.optimizer_reset, result.rounding = self.prepare(options)
        plan = plan_steps(len(samples), options)
        measured = evaluation_sample(samples, options.eval_tokens)
        result.loss_before = self.evaluate(measured, options.micro_batch_size) if measured else None
        started = time.perf_counter()
        for i, indices in enumerate(plan):
            if should_stop is not None and should_stop():
                result.stopped_early = True
                break
            batch = [samples[j] for j in indices]
            loss, grad_norm, skip_reason = self.step(self._micro_batches(batch, options.micro_batch_size), options)
            result.last_loss, result.last_grad_norm = loss, grad_norm
            if skip_reason is None:
                result.steps += 1
                result.tokens += sum(len(s.continuation_ids) for s in batch)
                if len(result.history) < HISTORY:
                    result.history.append({"step": self.global_step, "loss": loss, "grad_norm": grad_norm})
            else:
                result.steps_skipped += 1
                result.skip_reasons.append(f"step {i}: {skip_reason}")
            result.last_step_at = time.time()
            if on_step is not None:
                on_step(i + 1, len(plan), result)
        result.train_seconds = time.perf_counter() - started
        result.tokens_per_s = result.tokens / result.train_seconds if result.train_seconds > 0 else 0.0
        result.loss_after = self.evaluate(measured, options.micro_batch_size) if measured else None
        result.eval_samples = len(measured)
        result.optimizer_step = self.global_step
        return result

    def prepare(self, options: SFTOptions) -> tuple[bool, Rounding]:
        """The server's optimizer set for a job: rebuilt when its structure changes (returns
        whether it was), its per-step settings applied, the rounding chosen and seeded."""
        reset = False
        structure = options.structure()
        if self.optimizer is None or structure != self.structure or options.reset_optimizer:
            reset = self.optimizer is not None
            self.optimizer = build_optimizer(self.model, structure, options.hyper())
            self.structure = structure
        self.hyper = options.hyper()
        rounding = self.hyper.rounding or default_rounding(self.model)
        self.optimizer.rounding = rounding
        self.optimizer.generator = rounding_generator(self.device, options.seed, self.global_step)
        return reset, rounding

    def _micro_batches(self, batch: list[Sample], micro_batch_size: int):
        """(loss, share of the step) of each micro-batch: the continuation NLL, weighted."""
        total_w = sum(s.weight * len(s.continuation_ids) for s in batch)
        for i in range(0, len(batch), micro_batch_size):
            mb = collate(batch[i : i + micro_batch_size], self.pad_id).to(self.device)
            logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            loss, w = continuation_nll(logits, mb.labels, mb.token_weights, self.token_nll)
            yield loss, float(w) / total_w

    def step(self, micro_batches: Iterable[tuple[torch.Tensor, float]], options: SFTOptions) -> tuple[float, float | None, str | None]:
        """One optimizer step: backward through each (loss, share) of ``micro_batches`` (a
        generator: each forward runs as it is asked for), refuse the step if the loss or
        the gradient is not finite (weights untouched), clip, and step.
        Returns (loss, grad norm, skip reason)."""
        apply_hyper(self.optimizer, self.hyper, warmup_lr(options.lr, options.warmup_steps, self.global_step))
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for loss, share in micro_batches:
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                return float(loss.detach()), None, "loss is not finite; step skipped, weights unchanged"
            (loss * share).backward()
            loss_value += float(loss.detach()) * share
        tp = self.tensor_parallel
        if tp is not None:
            sync_gradients(self.model, tp)
            grad_norm = global_grad_norm(self.model, tp)  # the same on every rank: they skip or clip alike
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, float(grad_norm), "gradient is not finite; step skipped, weights unchanged"
        if options.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, options.max_grad_norm, grad_norm)
        self.optimizer.step()
        if tp is not None:
            sync_replicated(self.model, tp)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return loss_value, float(grad_norm), None

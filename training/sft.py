"""Supervised full-weight training on (context, continuation) samples, and the server's one optimizer.

SFT is one loss on the shared step loop (``step_loop``): the weighted mean NLL of the
continuation tokens. ``SFTTrainer`` holds the model and one APOLLO optimizer across calls,
so its state persists between jobs; every full-weight mode steps it (``prepare``, ``step``):
forward/backward over micro-batches, the step refused if the loss or the gradients are not
finite (the weights stay bit-identical), clipping, one APOLLO step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from hogwild.contracts.sft_config import ApolloHyper, ApolloStructure, Rounding, SFTOptions, count_steps

from .apollo import apply_hyper, build_optimizer, is_projected, optimizer_state_bytes
from .batches import Sample, collate
from .data_parallel import DataParallel
from .losses import continuation_nll, token_nll
from .optimizer_state import load_optimizer_state, optimizer_state_to_bytes, read_extra
from .rounding import default_rounding, rounding_generator, small_update_warning, typical_spacing
from .step_loop import StepsResult, evaluation_items, run_steps
from .tensor_parallel import global_grad_norm, sync_gradients, sync_replicated


@dataclass
class SFTResult(StepsResult):
    """What a job did, as reported by ``/train/status``; ``tokens`` counts continuation tokens."""

    loss_before: float | None = None
    loss_after: float | None = None
    eval_samples: int = 0  # the samples loss_before and loss_after were measured on


class ContinuationLoss:
    """SFT on the step loop: the NLL of the continuation tokens, each weighted by its sample's
    weight, averaged over the weighted tokens of the step."""

    def __init__(self, weights: SFTTrainer):
        self.weights = weights

    def weight(self, sample: Sample) -> float:
        return sample.weight * len(sample.continuation_ids)

    def tokens(self, sample: Sample) -> int:
        return len(sample.continuation_ids)

    def __call__(self, samples: list[Sample]) -> tuple[torch.Tensor, None]:
        w = self.weights
        batch = collate(samples, w.pad_id).to(w.device)
        logits = w.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, _ = continuation_nll(logits, batch.labels, batch.token_weights, w.token_nll)
        return loss, None

    def metrics(self, stats: list) -> dict[str, float]:
        return {}


def warmup_lr(peak: float, warmup_steps: int, step: int) -> float:
    """Linear warm-up: step 0 gets peak/(warmup+1), full lr from step ``warmup_steps``."""
    if step >= warmup_steps:
        return peak
    return peak * (step + 1) / (warmup_steps + 1)


class SFTTrainer:
    """Holds a causal LM and one APOLLO optimizer across jobs."""

    projects = True  # APOLLO projects the gradients of the blocks' matrices (``apollo.build_optimizer``)

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
        # Set while a job of a replica group trains (``data_parallel.DataParallel``): each step's gradients are summed across replicas.
        self.data_parallel: DataParallel | None = None
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
        optimizer = build_optimizer(self.model, structure, hyper, self.projects)
        load_optimizer_state(optimizer, tensor_bytes, json_bytes)
        self.optimizer, self.structure, self.hyper, self.global_step = optimizer, structure, hyper, int(extra["global_step"])

    def run(
        self,
        samples: Sequence[Sample],
        options: SFTOptions,
        on_step: Callable[[int, int, SFTResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> SFTResult:
        """Train on ``samples`` as ``options`` say; returns what happened."""
        result = SFTResult()
        measured = evaluation_items(samples, options.eval_tokens, lambda s: len(s.continuation_ids))
        before, after = run_steps(self, ContinuationLoss(self), samples, options, result, measured, on_step, should_stop)
        result.loss_before = before["loss"] if before else None
        result.loss_after = after["loss"] if after else None
        result.eval_samples = len(measured)
        return result

    def prepare(self, options: SFTOptions) -> tuple[bool, Rounding]:
        """The server's optimizer set for a job: rebuilt when its structure changes (returns
        whether it was), its per-step settings applied, the rounding chosen and seeded."""
        reset = False
        structure = options.structure()
        if self.optimizer is None or structure != self.structure or options.reset_optimizer:
            reset = self.optimizer is not None
            self.optimizer = build_optimizer(self.model, structure, options.hyper(), self.projects)
            self.structure = structure
        self.hyper = options.hyper()
        rounding = self.hyper.rounding or default_rounding(self.model)
        self.optimizer.rounding = rounding
        self.optimizer.generator = rounding_generator(self.device, options.seed, self.global_step)
        return reset, rounding

    def step(self, micro_batches: Iterable[tuple[torch.Tensor, float]], options: SFTOptions) -> tuple[float, float | None, str | None]:
        """One optimizer step: backward through each (loss, share) of ``micro_batches`` (a
        generator: each forward runs as it is asked for), refuse the step if the loss or
        the gradient is not finite (weights untouched), clip, and step.
        Returns (loss, grad norm, skip reason)."""
        apply_hyper(self.optimizer, self.hyper, warmup_lr(options.lr, options.warmup_steps, self.global_step))
        self.optimizer.zero_grad(set_to_none=True)
        loss_value, bad_loss = 0.0, None
        for loss, share in micro_batches:
            if not torch.isfinite(loss):
                bad_loss = float(loss.detach())
                break
            (loss * share).backward()
            loss_value += float(loss.detach()) * share
        finite = bad_loss is None
        if self.data_parallel is not None:  # every replica's gradients summed, before any weight is written
            reduced = self.data_parallel.reduce_step(self.params, loss_value, finite)
            loss_value, finite = reduced.loss, reduced.finite
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return bad_loss if bad_loss is not None else loss_value, None, "loss is not finite; step skipped, weights unchanged"
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

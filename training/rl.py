"""Policy-gradient training (RL) of the served weights in place, on completions the server sampled.

A sample is a completion of a context, the sampling engine's log-probability of each of its
tokens, and a reward within a group of completions (or an advantage). Before the first step the
trainer computes its own log-probability of every completion token once, with no gradient (the
policy as the job starts: the ratio's reference and the KL's; no second model) and keeps them as
numbers, 4 bytes a token; the groups' rewards become advantages. Then RL is a loss on the shared
step loop (``PolicyGradientLoss``; the formulas are ``rl_losses``'), so the optimizer, rounding,
clipping and the refusal of non-finite steps are SFT's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from hogwild.contracts.rl_config import RLOptions

from .batches import Sample, collate
from .losses import IGNORE_INDEX, token_logprobs
from .rl_losses import RLStats, aggregate, group_advantages, rl_stats, rl_token_loss
from .sft import SFTTrainer
from .step_loop import StepsResult, evaluation_items, run_steps


@dataclass(frozen=True)
class Completion:
    context_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    sampler_logprobs: tuple[float, ...]  # the engine's, one per completion token
    reward: float | None = None
    group: str | None = None
    advantage: float | None = None  # given, or made from the group's rewards before the first step
    id: str | None = None
    start_logprobs: tuple[float, ...] | None = None  # the trainer's as the job starts (filled in by ``RLTrainer.run``)
    head_scores: dict[str, float] | None = None  # the reward heads' scores the reward was made from


@dataclass
class RLResult(StepsResult):
    """What a job did; ``tokens`` counts completion tokens; ``history`` adds each step's
    ratio_mean, clip_fraction, truncated_fraction, kl, advantage_mean, logprob_gap_mean/max."""

    objective: str = "grpo"
    loss_type: str = "bnpo"
    reference_seconds: float = 0.0  # the pass that computed the log-probabilities as the job started
    advantages: list[float] = field(default_factory=list)  # each trained sample's, in order
    rewards: list[float | None] = field(default_factory=list)  # each trained sample's (None: it gave its advantage)
    head_scores: list[dict[str, float]] | None = None  # with reward_heads: each sample's scores, in order
    zero_advantage_groups: list[str] = field(default_factory=list)  # a group of one, or of equal rewards: nothing to learn
    before: dict = field(default_factory=dict)  # the loss and the diagnostics on a bounded sample
    after: dict = field(default_factory=dict)
    eval_samples: int = 0


def with_advantages(completions: Sequence[Completion], scale_rewards: bool) -> tuple[list[Completion], list[str]]:
    """Each completion with its advantage: as given, or from its group's rewards
    (``rl_losses.group_advantages``); and the groups that gave zero advantage."""
    grouped = [i for i, c in enumerate(completions) if c.advantage is None]
    names = sorted({completions[i].group for i in grouped})
    advantages, flat = group_advantages(torch.tensor([completions[i].reward for i in grouped], dtype=torch.float64),
                                        torch.tensor([names.index(completions[i].group) for i in grouped]), scale_rewards)
    done = list(completions)
    for i, a in zip(grouped, advantages.tolist()):
        done[i] = replace(completions[i], advantage=a)
    zero = sorted({completions[i].group for i, f in zip(grouped, flat.tolist()) if f})
    return done, zero


def on_tokens(rows: Sequence[Sequence[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-token numbers of each row, placed at the row's labelled positions of a (batch, seq)
    grid (row-major, as each row's completion tokens are), 0 elsewhere."""
    grid = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    grid[mask] = torch.tensor([v for row in rows for v in row], dtype=torch.float32, device=mask.device)
    return grid


class RLTrainer:
    """Runs RL jobs with the optimizer ``weights`` holds (one per server)."""

    def __init__(self, weights: SFTTrainer):
        self.weights = weights

    def logprobs(self, completions: Sequence[Completion]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's log-probability of each completion token, (batch, seq), and where the tokens are."""
        w = self.weights
        batch = collate([Sample(c.context_ids, c.completion_ids) for c in completions], w.pad_id).to(w.device)
        logits = w.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return token_logprobs(logits, batch.labels, w.token_nll), batch.labels != IGNORE_INDEX

    @torch.no_grad()
    def start_logprobs(self, completions: Sequence[Completion], micro_batch_size: int) -> list[tuple[float, ...]]:
        """The model's log-probabilities of every completion's tokens as it is now (before any step of this job)."""
        kept: list[tuple[float, ...]] = []
        for i in range(0, len(completions), micro_batch_size):
            logp, mask = self.logprobs(completions[i : i + micro_batch_size])
            kept.extend(tuple(row[m].float().tolist()) for row, m in zip(logp, mask))
        return kept

    def run(self, completions: Sequence[Completion], options: RLOptions,
            on_step: Callable[[int, int, RLResult], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RLResult:
        result = RLResult(objective=options.objective, loss_type=options.loss_type)
        completions, result.zero_advantage_groups = with_advantages(completions, options.scale_rewards)
        result.advantages = [c.advantage for c in completions]
        result.rewards = [c.reward for c in completions]
        if any(c.head_scores is not None for c in completions):
            result.head_scores = [c.head_scores for c in completions]
        started = time.perf_counter()
        start = self.start_logprobs(completions, options.micro_batch_size)
        result.reference_seconds = time.perf_counter() - started
        completions = [replace(c, start_logprobs=s) for c, s in zip(completions, start)]
        longest = options.max_completion_length or max(len(c.completion_ids) for c in completions)
        measured = evaluation_items(completions, options.eval_tokens, lambda c: len(c.completion_ids))
        before, after = run_steps(self.weights, PolicyGradientLoss(self, options, longest), completions, options, result,
                                  measured, on_step, should_stop)
        result.before, result.after, result.eval_samples = before or {}, after or {}, len(measured)
        return result


class PolicyGradientLoss:
    """RL on the step loop: the objective's per-token loss (``rl_losses.rl_token_loss``),
    aggregated as ``loss_type`` says over the step's completion tokens, and the per-step
    diagnostics (``rl_losses.rl_stats``)."""

    def __init__(self, trainer: RLTrainer, options: RLOptions, max_completion_length: int):
        self.trainer, self.options, self.max_completion_length = trainer, options, max_completion_length

    def weight(self, completion: Completion) -> float:
        # bnpo averages over the step's tokens; dr_grpo divides by its sample count (x a constant).
        return len(completion.completion_ids) if self.options.loss_type == "bnpo" else 1.0

    def tokens(self, completion: Completion) -> int:
        return len(completion.completion_ids)

    def __call__(self, completions: list[Completion]) -> tuple[torch.Tensor, RLStats]:
        o = self.options
        logp, mask = self.trainer.logprobs(completions)
        start = on_tokens([c.start_logprobs for c in completions], mask)
        sampler = on_tokens([c.sampler_logprobs for c in completions], mask)
        advantages = torch.tensor([c.advantage for c in completions], dtype=torch.float32, device=logp.device)
        token_loss = rl_token_loss(o.objective, logp, start, sampler, advantages, o.clip_low, o.clip_high, o.is_cap, o.kl_coef)
        loss = aggregate(token_loss, mask, o.loss_type, self.max_completion_length)
        return loss, rl_stats(o.objective, logp, start, sampler, advantages, mask, o.clip_low, o.clip_high, o.is_cap)

    def metrics(self, stats: list[RLStats]) -> dict[str, float]:
        return sum(stats, RLStats()).summary()

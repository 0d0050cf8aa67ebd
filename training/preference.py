"""Preference training of the served weights in place, with no second model for the reference.

For each pair the model reads the context and each reply; the loss is on the reply tokens
only (``preference_losses``: DPO, IPO, DPOP, ORPO, SimPO as plain functions of the replies'
log-probabilities). The reference policy is the served model as the job starts: before the
first step its log-probabilities of both replies are computed once, with the same model and no
gradient, and only those numbers are kept (or the client's, when it sent them). The steps are
the shared step loop's (``step_loop``) with the server's one optimizer, so the rounding of bf16
updates, clipping and the refusal of non-finite steps are SFT's; preference is a loss on it
(``PairwiseLoss``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from hogwild.contracts.preference_config import PreferenceOptions

from .batches import Sample, collate
from .losses import sequence_logprobs
from .preference_losses import NEEDS_REFERENCE, PairLoss, dpo_loss, dpop_loss, ipo_loss, metrics, orpo_loss, simpo_loss
from .sft import SFTTrainer
from .step_loop import StepsResult, evaluation_items, run_steps


@dataclass(frozen=True)
class Pair:
    context_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    weight: float = 1.0
    id: str | None = None
    ref_chosen: float | None = None  # the reference's summed log-probabilities, when the client sent them
    ref_rejected: float | None = None


@dataclass
class PreferenceResult(StepsResult):
    """What a job did; ``tokens`` counts every token of both sequences of each pair trained,
    and ``history`` adds each step's rewards/margins, rewards/accuracies, ... (TRL's)."""

    objective: str = "dpo"
    reference: str = "none"  # served model at the job's start | given by the client | none (the objective needs none)
    reference_seconds: float = 0.0
    before: dict = field(default_factory=dict)  # TRL's metrics (rewards/..., logps/...) and the loss, on a bounded sample
    after: dict = field(default_factory=dict)
    eval_pairs: int = 0


def pair_losses(options: PreferenceOptions, pi_c, pi_r, n_c, n_r, ref_c, ref_r) -> PairLoss:
    """The objective's per-pair losses from summed log-probabilities and reply lengths."""
    beta = options.beta
    if options.objective == "dpo":
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, options.label_smoothing)
    if options.objective == "ipo":
        return ipo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, beta)
    if options.objective == "dpop":
        return dpop_loss(pi_c, pi_r, ref_c, ref_r, beta, options.dpop_lambda)
    if options.objective == "orpo":
        return orpo_loss(pi_c / n_c, pi_r / n_r, -pi_c / n_c, beta, options.orpo_lambda)
    return simpo_loss(pi_c / n_c, pi_r / n_r, beta, options.simpo_gamma, options.label_smoothing)


class PreferenceTrainer:
    """Runs preference jobs with the optimizer ``weights`` holds (one per server)."""

    def __init__(self, weights: SFTTrainer):
        self.weights = weights

    def reply_logprobs(self, pairs: Sequence[Pair]) -> tuple[torch.Tensor, ...]:
        """(chosen, rejected) summed log-probabilities and (chosen, rejected) token counts:
        one forward over the pairs' 2 x len(pairs) sequences."""
        samples = [Sample(p.context_ids, p.chosen_ids) for p in pairs] + [Sample(p.context_ids, p.rejected_ids) for p in pairs]
        batch = collate(samples, self.weights.pad_id).to(self.weights.device)
        logits = self.weights.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        sums, counts = sequence_logprobs(logits, batch.labels, self.weights.token_nll)
        n = len(pairs)
        return sums[:n], sums[n:], counts[:n].float(), counts[n:].float()

    @torch.no_grad()
    def reference(self, pairs: Sequence[Pair], micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's summed log-probabilities of each pair's replies: the client's where
        given, else the model's as it is now (before any step of this job)."""
        chosen, rejected = [], []
        for i in range(0, len(pairs), micro_batch_size):
            chunk = pairs[i : i + micro_batch_size]
            if all(p.ref_chosen is not None for p in chunk):
                c, r = torch.tensor([p.ref_chosen for p in chunk]), torch.tensor([p.ref_rejected for p in chunk])
            else:
                c, r, _, _ = self.reply_logprobs(chunk)
                given = [j for j, p in enumerate(chunk) if p.ref_chosen is not None]
                c[given] = torch.tensor([chunk[j].ref_chosen for j in given], device=c.device)
                r[given] = torch.tensor([chunk[j].ref_rejected for j in given], device=r.device)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def run(self, pairs: Sequence[Pair], options: PreferenceOptions,
            on_step: Callable[[int, int, PreferenceResult], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> PreferenceResult:
        result = PreferenceResult(objective=options.objective)
        if options.objective in NEEDS_REFERENCE:
            started = time.perf_counter()
            refs = self.reference(pairs, options.micro_batch_size)
            result.reference_seconds = time.perf_counter() - started
            computed = any(p.ref_chosen is None for p in pairs)
            result.reference = "served model at the job's start" if computed else "given by the client"
            # The loss reads each pair's reference from the pair: the computed ones filled in.
            pairs = [replace(p, ref_chosen=float(c), ref_rejected=float(r)) for p, c, r in zip(pairs, *refs)]
        measured = evaluation_items(pairs, options.eval_tokens, lambda p: len(p.chosen_ids) + len(p.rejected_ids))
        before, after = run_steps(self.weights, PairwiseLoss(self, options), pairs, options, result, measured, on_step,
                                  should_stop)
        result.before, result.after, result.eval_pairs = before or {}, after or {}, len(measured)
        return result


class PairwiseLoss:
    """Preference training on the step loop: the objective's pair losses, weighted by each
    pair's ``weight``, averaged over the step's pairs; TRL's metrics per step. The pairs
    carry their reference log-probabilities when the objective needs them."""

    def __init__(self, trainer: PreferenceTrainer, options: PreferenceOptions):
        self.trainer, self.options = trainer, options

    def weight(self, pair: Pair) -> float:
        return pair.weight

    def tokens(self, pair: Pair) -> int:
        return len(pair.chosen_ids) + len(pair.rejected_ids) + 2 * len(pair.context_ids)

    def __call__(self, pairs: list[Pair]) -> tuple[torch.Tensor, tuple]:
        pi_c, pi_r, n_c, n_r = self.trainer.reply_logprobs(pairs)
        ref_c = ref_r = None
        if self.options.objective in NEEDS_REFERENCE:
            ref_c = torch.tensor([p.ref_chosen for p in pairs], device=pi_c.device)
            ref_r = torch.tensor([p.ref_rejected for p in pairs], device=pi_c.device)
        pair = pair_losses(self.options, pi_c, pi_r, n_c, n_r, ref_c, ref_r)
        w = torch.tensor([p.weight for p in pairs], device=pi_c.device)
        return (pair.losses * w).sum() / w.sum(), (pair, pi_c.detach(), pi_r.detach())

    def metrics(self, stats: list) -> dict[str, float]:
        """TRL's metrics over every (pair losses, chosen, rejected) of ``stats``."""
        if not stats:
            return {}
        pair = PairLoss(*(torch.cat([getattr(p, k) for p, _, _ in stats])
                          for k in ("losses", "chosen_rewards", "rejected_rewards")))
        return metrics(pair, torch.cat([c for _, c, _ in stats]), torch.cat([r for _, _, r in stats]))

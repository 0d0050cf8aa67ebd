"""Preference training of the served weights in place, with no second model for the reference.

For each pair the model reads the context and each reply; the loss is on the reply tokens
only (``preference_losses``: DPO, IPO, DPOP, ORPO, SimPO as plain functions of the replies'
log-probabilities). The reference policy is the served model as the job starts: before the
first step its log-probabilities of both replies are computed once, with the same model and no
gradient, and only those numbers are kept (or the client's, when it sent them). The steps are
the server's one optimizer's (``SFTTrainer.prepare``/``step``), so the rounding of bf16 updates,
clipping and the refusal of non-finite steps are SFT's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from hogwild.contracts.preference_config import PreferenceOptions

from .batches import Sample, collate
from .losses import sequence_logprobs
from .preference_losses import NEEDS_REFERENCE, PairLoss, dpo_loss, dpop_loss, ipo_loss, metrics, orpo_loss, simpo_loss
from .sft import HISTORY, SFTTrainer, plan_steps


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
class PreferenceResult:
    objective: str = "dpo"
    steps: int = 0
    steps_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    last_loss: float | None = None
    last_grad_norm: float | None = None
    tokens: int = 0  # every token of both sequences of each pair trained
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    reference: str = "none"  # served model at the job's start | given by the client | none (the objective needs none)
    reference_seconds: float = 0.0
    optimizer_reset: bool = False
    optimizer_step: int = 0
    rounding: str = "nearest"
    stopped_early: bool = False
    before: dict = field(default_factory=dict)  # TRL's metrics (rewards/..., logps/...) and the loss, on a bounded sample
    after: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # per step: loss, rewards/margins, rewards/accuracies
    eval_pairs: int = 0
    last_step_at: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


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

    def _micro_batches(self, pairs, index: list[int], refs, options: PreferenceOptions, seen: list):
        """(loss, share of the step) of each micro-batch of the step's pairs ``index``;
        each micro-batch's pair losses and rewards are appended to ``seen``."""
        total_w = sum(pairs[i].weight for i in index)
        for start in range(0, len(index), options.micro_batch_size):
            chunk = index[start : start + options.micro_batch_size]
            pi_c, pi_r, n_c, n_r = self.reply_logprobs([pairs[i] for i in chunk])
            where = torch.tensor(chunk)
            ref_c, ref_r = (refs[0][where].to(pi_c.device), refs[1][where].to(pi_c.device)) if refs else (None, None)
            pair = pair_losses(options, pi_c, pi_r, n_c, n_r, ref_c, ref_r)
            w = torch.tensor([pairs[i].weight for i in chunk], device=pi_c.device)
            seen.append((pair, pi_c.detach(), pi_r.detach()))
            yield (pair.losses * w).sum() / w.sum(), float(w.sum()) / total_w

    @torch.no_grad()
    def measure(self, pairs, index: list[int], refs, options: PreferenceOptions) -> dict:
        """TRL's metrics and the mean loss over the pairs ``index``, without touching any state."""
        seen: list = []
        losses = [float(loss) * share for loss, share in self._micro_batches(pairs, index, refs, options, seen)]
        return {**_summary(seen), "loss": sum(losses)} if index else {}

    def run(self, pairs: Sequence[Pair], options: PreferenceOptions,
            on_step: Callable[[int, int, PreferenceResult], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> PreferenceResult:
        result = PreferenceResult(objective=options.objective)
        weights = self.weights
        result.optimizer_reset, result.rounding = weights.prepare(options)
        refs = None
        if options.objective in NEEDS_REFERENCE:
            started = time.perf_counter()
            refs = self.reference(pairs, options.micro_batch_size)
            result.reference_seconds = time.perf_counter() - started
            computed = any(p.ref_chosen is None for p in pairs)
            result.reference = "served model at the job's start" if computed else "given by the client"
        plan = plan_steps(len(pairs), options)
        measured = _evaluation_index(pairs, options.eval_tokens)
        result.before, result.eval_pairs = self.measure(pairs, measured, refs, options), len(measured)
        started = time.perf_counter()
        for i, index in enumerate(plan):
            if should_stop is not None and should_stop():
                result.stopped_early = True
                break
            seen: list = []
            loss, grad_norm, skip_reason = weights.step(self._micro_batches(pairs, index, refs, options, seen), options)
            result.last_loss, result.last_grad_norm = loss, grad_norm
            if skip_reason is None:
                result.steps += 1
                result.tokens += sum(len(pairs[j].chosen_ids) + len(pairs[j].rejected_ids) + 2 * len(pairs[j].context_ids)
                                     for j in index)
                if len(result.history) < HISTORY:
                    result.history.append({"step": weights.global_step, "loss": loss, **_summary(seen)})
            else:
                result.steps_skipped += 1
                result.skip_reasons.append(f"step {i}: {skip_reason}")
            result.last_step_at = time.time()
            if on_step is not None:
                on_step(i + 1, len(plan), result)
        result.train_seconds = time.perf_counter() - started
        result.tokens_per_s = result.tokens / result.train_seconds if result.train_seconds > 0 else 0.0
        result.after = self.measure(pairs, measured, refs, options)
        result.optimizer_step = weights.global_step
        return result


def _summary(seen: list) -> dict:
    """TRL's metrics over every (pair losses, chosen, rejected) of ``seen``."""
    if not seen:
        return {}
    pair = PairLoss(*(torch.cat([getattr(p, k) for p, _, _ in seen]) for k in ("losses", "chosen_rewards", "rejected_rewards")))
    return metrics(pair, torch.cat([c for _, c, _ in seen]), torch.cat([r for _, _, r in seen]))


def _evaluation_index(pairs: Sequence[Pair], max_tokens: int) -> list[int]:
    """The first pairs up to ``max_tokens`` reply tokens (at least one; none if 0)."""
    index, tokens = [], 0
    for i, p in enumerate(pairs):
        n = len(p.chosen_ids) + len(p.rejected_ids)
        if max_tokens <= 0 or (index and tokens + n > max_tokens):
            break
        index.append(i)
        tokens += n
    return index

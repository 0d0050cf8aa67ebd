"""Circuit breakers by representation rerouting (Zou et al. 2024), as a LoRA.

A LoRA is trained so that, at the target layers, the model's representations
of harmful completions turn away from what the original model computes
(``ReLU(cos(h_lora, h_ref))`` -> 0) while on retain data they stay put
(``||h_lora - h_ref||``). The reference is the same model with the adapter
disabled: no second model in memory. Both losses count only loss-masked
tokens (by default the assistant's response, found from the model's own chat
template).

The loop reads top to bottom: sample a harmful and a retain batch (stratified
by priority class), compute both representations, the scheduled mixture
``cs(t) * L_rr + cr(t) * L_retain`` (+ the guards' auxiliary term), step, and
every ``eval_every`` steps check the tripwires on a validation metric and keep
the last good adapter state to roll back to.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hogwild.contracts.circuit_breaker_config import CURRICULUM, CBConfig, CBSample

from . import guards
from .chat_masks import assistant_markers, loss_mask
from .hf_model import decoder_layers
from .lora import attached_lora, lora_factors


def schedule(step: int, total: int, alpha_max: float) -> tuple[float, float]:
    """``cs(t) = alpha_max * max(0, 1 - t/(2T))``, ``cr(t) = 0.5 + 0.5 t/T``."""
    return alpha_max * max(0.0, 1 - step / (2 * total)), 0.5 + 0.5 * step / total


def clamp_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Target layers within ``[0, n_layers)``, sorted, without repeats."""
    return sorted({min(max(int(i), 0), n_layers - 1) for i in layers})


# ---- loss masks from the chat template -----------------------------------


def masked_cosines(h_lora: torch.Tensor, h_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cosine over masked tokens; (B,)."""
    cos = torch.nn.functional.cosine_similarity(h_lora.float(), h_ref.float(), dim=-1)
    m = mask.float()
    return (cos * m).sum(-1) / m.sum(-1).clamp_min(1)


def rerouting_loss(h_lora: torch.Tensor, h_ref: torch.Tensor, mask: torch.Tensor,
                   sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``ReLU(cos(h_lora, h_ref))`` averaged over masked tokens (weighted by sample)."""
    cos = torch.relu(torch.nn.functional.cosine_similarity(h_lora.float(), h_ref.float(), dim=-1))
    m = mask.float() * (sample_weight[:, None] if sample_weight is not None else 1.0)
    return (cos * m).sum() / m.sum().clamp_min(1e-12)


def retain_loss(h_lora: torch.Tensor, h_ref: torch.Tensor, mask: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """L2 distance ``||h_lora - h_ref||`` averaged over masked tokens (weighted by sample)."""
    dist = (h_lora.float() - h_ref.float()).norm(dim=-1)
    m = mask.float() * (sample_weight[:, None] if sample_weight is not None else 1.0)
    return (dist * m).sum() / m.sum().clamp_min(1e-12)


# ---- sampling --------------------------------------------------------------


class StratifiedSampler:
    """Batches that visit every priority class of a split in turn (shuffled
    round robin), so a rare class is never starved by a common one."""

    def __init__(self, samples: Sequence[int], classes: Sequence[str], seed: int):
        self.rng = random.Random(seed)
        self.pools: dict[str, list[int]] = {}
        for i, c in zip(samples, classes):
            self.pools.setdefault(c, []).append(i)
        self.cursor = {c: len(p) for c, p in self.pools.items()}  # exhausted: reshuffle on first use
        self.order: list[str] = []

    def _next_of(self, c: str) -> int:
        if self.cursor[c] >= len(self.pools[c]):
            self.rng.shuffle(self.pools[c])
            self.cursor[c] = 0
        self.cursor[c] += 1
        return self.pools[c][self.cursor[c] - 1]

    def batch(self, size: int) -> list[int]:
        out = []
        while len(out) < size:
            if not self.order:
                self.order = list(self.pools)
                self.rng.shuffle(self.order)
            out.append(self._next_of(self.order.pop()))
        return out


def class_weights(config: CBConfig, step: int) -> dict[str, float]:
    if not config.curriculum:
        return config.priority_weights
    t = step / config.steps
    return [w for start, w in CURRICULUM if t >= start][-1]


# ---- the trainer -----------------------------------------------------------


class _Stop(Exception):
    """Raised by the hook after the last target layer: later layers are not needed."""


@dataclass
class CBResult:
    steps: int = 0
    tripped: str | None = None
    rolled_back_to_step: int | None = None
    harmful_cos_before: float | None = None
    harmful_cos_after: float | None = None
    retain_cos_after: float | None = None
    retain_l2_after: float | None = None
    retain_l2_relative_after: float | None = None  # / mean ||h_ref||
    target_layers: list[int] = field(default_factory=list)
    lora_layers: list[int] = field(default_factory=list)
    mask: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    diagnostics: list[dict] = field(default_factory=list)
    coherence: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mergeable(self) -> bool:
        return self.tripped is None and bool(self.coherence.get("passed"))

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["mergeable"] = self.mergeable
        return d


class CircuitBreakerTrainer:
    """Trains one circuit-breaker LoRA on ``model`` (the live model; its own
    weights are not changed). ``run`` returns the result and the adapter's
    factors (module name -> (A, B, scaling)), or no factors when it must not be
    merged."""

    def __init__(self, model, tokenizer, config: CBConfig, pad_id: int = 0):
        self.model, self.tokenizer, self.config, self.pad_id = model, tokenizer, config, pad_id
        n_layers = model.config.num_hidden_layers
        self.target_layers = clamp_layers(config.target_layers, n_layers)
        self.markers = assistant_markers(tokenizer) if tokenizer is not None else None

    # -- data --

    def _masks(self, samples: Sequence[CBSample]) -> tuple[list[list[bool]], dict]:
        masks, missing, kept, total = [], [], 0, 0
        for i, s in enumerate(samples):
            mask, found = loss_mask(s.ids, self.markers, self.config.loss_mask)
            masks.append(mask)
            kept, total = kept + sum(mask), total + len(mask)
            if not found:
                missing.append(s.id or i)
        stats = {"policy": self.config.loss_mask, "template_markers_found": self.markers is not None,
                 "masked_token_fraction": kept / max(total, 1), "samples_without_assistant_span": len(missing),
                 "examples_without_assistant_span": missing[:8]}
        if missing and self.config.loss_mask == "assistant":
            stats["note"] = (f"{len(missing)} sample(s) had no assistant span under the chat template: "
                             "their whole sequence counts")
        return masks, stats

    def _batch(self, samples, masks, index: list[int]):
        width = max(len(samples[i].ids) for i in index)
        ids = torch.full((len(index), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(index), width), dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.bool)
        for row, i in enumerate(index):
            n = len(samples[i].ids)
            ids[row, :n] = torch.tensor(samples[i].ids)
            attention[row, :n] = 1
            mask[row, :n] = torch.tensor(masks[i])
        device = next(self.model.parameters()).device
        return ids.to(device), attention.to(device), mask.to(device)

    # -- representations --

    def _representations(self, model, ids, attention) -> torch.Tensor:
        """Residual stream after each target layer, stacked: (L, B, T, H). The
        forward stops after the last target layer."""
        captured: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model)
        last = self.target_layers[-1]

        def hook(index):
            def capture(_module, _inputs, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == last:
                    raise _Stop
            return capture

        handles = [layers[i].register_forward_hook(hook(i)) for i in self.target_layers]
        try:
            model(input_ids=ids, attention_mask=attention, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([captured[i] for i in self.target_layers])

    def _pair(self, peft_model, ids, attention, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), peft_model.disable_adapter():
            ref = self._representations(peft_model, ids, attention)
        with torch.set_grad_enabled(grad):
            lora = self._representations(peft_model, ids, attention)
        return lora, ref

    def _evaluate(self, peft_model, samples, masks, index: list[int]) -> dict:
        """Mean cosine and L2 over masked tokens of ``index``, in batches."""
        cos_sum, l2_sum, ref_norm, n = 0.0, 0.0, 0.0, 0
        for start in range(0, len(index), self.config.batch_size):
            chunk = index[start:start + self.config.batch_size]
            ids, attention, mask = self._batch(samples, masks, chunk)
            lora, ref = self._pair(peft_model, ids, attention, grad=False)
            m = mask[None].expand(lora.shape[:-1]).float()
            cos = torch.nn.functional.cosine_similarity(lora.float(), ref.float(), dim=-1)
            cos_sum += float((cos * m).sum())
            l2_sum += float(((lora.float() - ref.float()).norm(dim=-1) * m).sum())
            ref_norm += float((ref.float().norm(dim=-1) * m).sum())
            n += float(m.sum())
        n = max(n, 1)
        return {"cos": cos_sum / n, "l2": l2_sum / n, "l2_relative": l2_sum / max(ref_norm, 1e-12)}

    # -- the loop --

    def run(self, samples: Sequence[CBSample], on_step: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] | None = None):
        """Train; returns ``(CBResult, factors or None)``."""
        config = self.config
        started = time.perf_counter()
        harmful = [i for i, s in enumerate(samples) if s.split == "harmful"]
        retain = [i for i, s in enumerate(samples) if s.split == "retain"]
        if not harmful or not retain:
            raise ValueError("a circuit-breaker run needs both harmful and retain samples")
        masks, mask_stats = self._masks(samples)
        result = CBResult(target_layers=self.target_layers, lora_layers=list(range(self.target_layers[-1] + 1)),
                          mask=mask_stats)
        if log:
            log("loss mask: " + ", ".join(f"{k}={v}" for k, v in mask_stats.items()))
        rng = random.Random(config.seed)
        validation = rng.sample(retain, min(len(retain), max(2, config.batch_size)))
        samplers = {split: StratifiedSampler(index, [samples[i].priority_class for i in index], config.seed + k)
                    for k, (split, index) in enumerate((("harmful", harmful), ("retain", retain)))}
        counters = guards.GuardCounters()
        trip = guards.Tripwire(max_val_drop=config.max_val_drop, val_patience=config.val_patience,
                               rho_pinned_steps=config.rho_pinned_steps)
        torch.manual_seed(config.seed)
        with attached_lora(self.model, config.r, config.lora_alpha, config.lora_dropout,
                           layers=result.lora_layers) as peft_model:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.lr)
            result.harmful_cos_before = self._evaluate(peft_model, samples, masks, harmful)["cos"]
            trip.check_validation(self._evaluate(peft_model, samples, masks, validation)["cos"])
            good_state, good_step = _snapshot(params), 0
            peft_model.train()
            for step in range(config.steps):
                if should_stop and should_stop():
                    result.tripped = "cancelled"
                    break
                cs, cr = schedule(step, config.steps, config.alpha_max)
                weights = class_weights(config, step)
                h_index = samplers["harmful"].batch(config.batch_size)
                r_index = samplers["retain"].batch(config.batch_size)
                h_w = torch.tensor([weights.get(samples[i].priority_class, 1.0) for i in h_index])
                r_w = torch.tensor([weights.get(samples[i].priority_class, 1.0) for i in r_index])
                h_ids, h_att, h_mask = self._batch(samples, masks, h_index)
                r_ids, r_att, r_mask = self._batch(samples, masks, r_index)
                h_lora, h_ref = self._pair(peft_model, h_ids, h_att, grad=True)
                r_lora, r_ref = self._pair(peft_model, r_ids, r_att, grad=True)
                h_mask_l = h_mask[None].expand(h_lora.shape[:-1])
                r_mask_l = r_mask[None].expand(r_lora.shape[:-1])
                h_cos = masked_cosines(h_lora.flatten(0, 1), h_ref.flatten(0, 1), h_mask_l.flatten(0, 1))
                r_cos = masked_cosines(r_lora.flatten(0, 1), r_ref.flatten(0, 1), r_mask_l.flatten(0, 1))
                h_weight = h_w.to(h_lora.device).repeat(len(self.target_layers))
                r_weight = r_w.to(r_lora.device).repeat(len(self.target_layers))
                if config.guards:  # lean on the samples still close to where they started
                    h_weight = h_weight * (1 + guards.boost(h_cos.detach()))
                l_rr = rerouting_loss(h_lora.flatten(0, 1), h_ref.flatten(0, 1), h_mask_l.flatten(0, 1), h_weight)
                l_ret = retain_loss(r_lora.flatten(0, 1), r_ref.flatten(0, 1), r_mask_l.flatten(0, 1), r_weight)
                loss = cs * l_rr + cr * l_ret
                lam = rho = None
                cos_pos, cos_neg = _value(r_cos.mean()), _value(h_cos.mean())
                frac = guards.PhaseSchedule(target_frac=config.target_frac).frac(step, config.steps) if config.guards else 0
                if frac > 0:
                    if guards.signs_bad(cos_pos, cos_neg):
                        counters.skipped_bad_signs += 1
                    else:
                        norm_ratio = (r_lora.float().norm(dim=-1) / r_ref.float().norm(dim=-1).clamp_min(1e-12))[r_mask_l]
                        aux = (guards.directional_loss(r_cos.mean(), h_cos.mean())
                               + 1e-3 * guards.positive_floor(r_cos.mean()) + 1e-3 * guards.norm_penalty(norm_ratio))
                        choice = guards.adaptive_lambda(_value(loss), _value(aux), frac)
                        lam, rho = choice.lam, choice.rho
                        counters.rescaled += choice.rescaled
                        counters.aux_steps += 1
                        loss = loss + lam * aux
                reason = trip.check_loss(_value(loss)) or trip.check_rho(rho)
                if reason is None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
                    if not math.isfinite(float(grad_norm)):
                        reason = f"the gradient norm is {float(grad_norm)}"
                    else:
                        optimizer.step()
                        result.steps = step + 1
                if reason is None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
                    peft_model.eval()
                    val = self._evaluate(peft_model, samples, masks, validation)["cos"]
                    peft_model.train()
                    reason = trip.check_validation(val)
                    if trip.healthy:
                        good_state, good_step = _snapshot(params), step + 1
                if step % config.log_every == 0 or reason is not None or step + 1 == config.steps:
                    entry = {"step": step, "cs": cs, "cr": cr, "loss": _value(loss), "rerouting": _value(l_rr),
                             "retain": _value(l_ret), "harmful_cos": cos_neg, "retain_cos": cos_pos, "lambda_eff": lam,
                             "rho": rho, "skipped_bad_signs": counters.skipped_bad_signs, "rescaled": counters.rescaled,
                             "grad_norm": float(grad_norm) if reason is None else None}
                    result.diagnostics.append(entry)
                    if log:
                        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
                if on_step:
                    on_step(step + 1, config.steps)
                if reason is not None:
                    result.tripped = reason
                    _restore(params, good_state)
                    result.rolled_back_to_step = good_step
                    break
            peft_model.eval()
            counters.rho_at_cap_run = trip.pinned
            result.counters = counters.__dict__
            harmful_eval = self._evaluate(peft_model, samples, masks, harmful)
            retain_eval = self._evaluate(peft_model, samples, masks, retain)
            result.harmful_cos_after = harmful_eval["cos"]
            result.retain_cos_after, result.retain_l2_after = retain_eval["cos"], retain_eval["l2"]
            result.retain_l2_relative_after = retain_eval["l2_relative"]
            if result.tripped is None:
                result.coherence = self.coherence(peft_model, [samples[i] for i in retain], masks_of=[masks[i] for i in retain])
            factors = lora_factors(peft_model) if result.mergeable else None
        result.seconds = time.perf_counter() - started
        return result, factors

    # -- coherence --

    def coherence(self, peft_model, retain: Sequence[CBSample], masks_of: Sequence[list[bool]]) -> dict:
        """Greedy generations on the prompt set with the adapter, against the same
        prompts without it, judged by ``judge_coherence``."""
        config = self.config
        prompts = config.coherence_prompts or [_prompt_of(s.ids, m) for s, m in zip(retain[:4], masks_of[:4])]
        device = next(peft_model.parameters()).device
        adapted, original = [], []
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():
                adapted.append(self._generate(peft_model, ids))
                with peft_model.disable_adapter():
                    original.append(self._generate(peft_model, ids))
        return judge_coherence([self.tokenizer.decode(t) for t in adapted], [self.tokenizer.decode(t) for t in original],
                               config.max_word_run, config.min_vocab_ratio)

    def _generate(self, model, ids: torch.Tensor) -> list[int]:
        out = []
        for _ in range(self.config.coherence_tokens):  # greedy, no cache: a few dozen tokens on a short prompt
            logits = model(input_ids=ids, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
        return out


def _prompt_of(ids: list[int], mask: list[bool]) -> list[int]:
    """The tokens before the first masked (assistant) token: what the model is asked."""
    first = mask.index(True) if True in mask else len(ids)
    return ids[:first] if first > 0 else ids[: max(1, len(ids) // 2)]


def _longest_run(words: list[str]) -> int:
    best = run = 0
    for i, w in enumerate(words):
        run = run + 1 if i and w == words[i - 1] else 1
        best = max(best, run)
    return best


def judge_coherence(texts: Sequence[str], original_texts: Sequence[str], max_word_run: int, min_vocab_ratio: float) -> dict:
    """The adapter's generations (``texts``) against the base model's on the same prompts
    (``original_texts``, one each). The adapter is judged by what it changes: on a prompt
    where the base itself repeats a word ``max_word_run`` times or more in a row, the
    adapter fails only by a longer run there; elsewhere a run of ``max_word_run`` fails.
    The distinct words may not fall below ``min_vocab_ratio`` of the base's."""
    runs = [_longest_run(t.split()) for t in texts]
    original_runs = [_longest_run(t.split()) for t in original_texts]
    reasons = []
    for i, (run, original_run) in enumerate(zip(runs, original_runs)):
        allowed = max(max_word_run - 1, original_run)  # the base's own run is not the adapter's doing
        if run > allowed:
            reasons.append(f"prompt {i}: a word repeats {run} times in a row (limit {max_word_run - 1}; "
                           f"{original_run} without the adapter)")
    words = [w for t in texts for w in t.split()]
    original_words = {w for t in original_texts for w in t.split()}
    distinct = len(set(words))
    if distinct < min_vocab_ratio * len(original_words):
        reasons.append(f"{distinct} distinct words against {len(original_words)} without the adapter "
                       f"(at least {min_vocab_ratio:.0%} required)")
    return {"passed": not reasons, "reasons": reasons, "longest_word_run": max(runs, default=0),
            "longest_word_run_original": max(original_runs, default=0), "distinct_words": distinct,
            "distinct_words_original": len(original_words), "samples": list(texts[:4])}


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)

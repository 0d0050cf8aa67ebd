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
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import guards
from .hf_model import decoder_layers
from .lora import attached_lora, lora_factors

PRIORITY_WEIGHTS = {
    "adversarial_safe": 2.0,
    "injection_resisted": 1.5,
    "benign_twin": 1.2,
    "tool_capability": 1.0,
    "general_conversation": 0.8,
    "borderline": 1.0,
    "harmful_flip": 1.0,
}

# The optional curriculum: (start fraction of steps, class weights). First hold on
# to capability (retain-side classes up), then the default mix, then lean on the
# hard cases. The owner's notes name the three phases; these weights are ours.
CURRICULUM = (
    (0.0, {**PRIORITY_WEIGHTS, "general_conversation": 1.2, "tool_capability": 1.5, "adversarial_safe": 1.0}),
    (0.3, PRIORITY_WEIGHTS),
    (0.7, {**PRIORITY_WEIGHTS, "adversarial_safe": 3.0, "injection_resisted": 2.0, "harmful_flip": 1.5}),
)

PRESETS = {
    "stage1": {"alpha_max": 10.0, "target_layers": [10, 20], "lr": 5e-5, "steps": 500, "max_grad_norm": 1.0},
    "stage2": {"alpha_max": 0.5, "target_layers": [15], "lr": 3e-5, "steps": 300, "max_grad_norm": 0.5},
}


class CBSample(BaseModel):
    """One conversation as token ids, with its label."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[int] = Field(min_length=2, max_length=1_048_576)
    split: Literal["harmful", "retain"]
    priority_class: str = Field("general_conversation", max_length=64)
    id: str | None = Field(None, max_length=256)


class CBConfig(BaseModel):
    """Every setting of a circuit-breaker run. ``preset`` fills the fields it
    names unless they are given explicitly."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["stage1", "stage2"] | None = None
    target_layers: list[int] = Field([15], min_length=1, description="clamped to the model's depth")
    r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    alpha_max: float = Field(0.5, gt=0, le=100, description="cs(t) = alpha_max * max(0, 1 - t/(2T))")
    lr: float = Field(3e-5, gt=0, le=1)
    steps: int = Field(300, ge=1, le=100_000)
    max_grad_norm: float | None = Field(0.5, gt=0)
    batch_size: int = Field(4, ge=1, le=256, description="harmful and retain samples per step, each")
    loss_mask: Literal["assistant", "all"] = Field("assistant", description="assistant responses only, or every token")
    priority_weights: dict[str, float] = Field(default_factory=lambda: dict(PRIORITY_WEIGHTS))
    curriculum: bool = False
    guards: bool = True
    target_frac: float = Field(0.2, ge=0, le=1, description="the guards' auxiliary term as a fraction of the main loss")
    eval_every: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)
    max_val_drop: float = Field(0.25, gt=0, le=1, description="tripwire: the retain cosine may fall this fraction")
    val_patience: int = Field(2, ge=1, description="... for this many evaluations in a row before the run stops")
    rho_pinned_steps: int = Field(20, ge=1)
    coherence_prompts: list[list[int]] | None = Field(None, description="default: the retain samples' prompts")
    coherence_tokens: int = Field(24, ge=1, le=512)
    max_word_run: int = Field(6, ge=2, description="a word repeated this many times in a row fails coherence")
    min_vocab_ratio: float = Field(0.5, ge=0, le=1, description="distinct words vs. the original model's")
    seed: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = {**PRESETS[data["preset"]], **data}
        return data


def schedule(step: int, total: int, alpha_max: float) -> tuple[float, float]:
    """``cs(t) = alpha_max * max(0, 1 - t/(2T))``, ``cr(t) = 0.5 + 0.5 t/T``."""
    return alpha_max * max(0.0, 1 - step / (2 * total)), 0.5 + 0.5 * step / total


def clamp_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Target layers within ``[0, n_layers)``, sorted, without repeats."""
    return sorted({min(max(int(i), 0), n_layers - 1) for i in layers})


# ---- loss masks from the chat template -----------------------------------


@dataclass(frozen=True)
class AssistantMarkers:
    """Token ids that open and close an assistant turn, read off the template."""

    header: tuple[int, ...]
    end: tuple[int, ...]


def assistant_markers(tokenizer) -> AssistantMarkers | None:
    """Render a conversation with the model's own chat template and read the
    assistant header (what the generation prompt adds) and the end-of-turn
    marker (what follows the reply). Works for ChatML (Qwen), Llama-3 headers,
    and any template that supports ``add_generation_prompt``; None when the
    tokenizer has no template or the markers cannot be found."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "USERTEXT"}]
    reply = "ASSISTANTREPLY"
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": reply}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no usable markers
        return None
    if not prompt.startswith(bare) or reply not in full:
        return None
    header = prompt[len(bare):]
    end = full[full.index(reply) + len(reply):].strip()
    end = re.match(r"\S+", end).group(0) if end else ""
    header_ids = tuple(tokenizer.encode(header.strip() or header, add_special_tokens=False))
    end_ids = tuple(tokenizer.encode(end, add_special_tokens=False)) if end else ()
    return AssistantMarkers(header_ids, end_ids) if header_ids else None


def _find(seq: list[int], sub: tuple[int, ...], start: int) -> int:
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if tuple(seq[i:i + n]) == sub:
            return i
    return -1


def assistant_spans(ids: list[int], markers: AssistantMarkers) -> list[tuple[int, int]]:
    """Half-open token spans of every assistant reply in ``ids``: from after the
    header to the end-of-turn marker included (the model must learn to stop),
    or to the end of the sequence."""
    spans, pos = [], 0
    while (at := _find(ids, markers.header, pos)) >= 0:
        start = at + len(markers.header)
        # The header as tokenized alone may lack the newline that follows it in context.
        while start < len(ids) and ids[start] in markers.header:
            start += 1
        stop = _find(ids, markers.end, start) if markers.end else -1
        end = stop + len(markers.end) if stop >= 0 else len(ids)
        if end > start:
            spans.append((start, end))
        pos = end
    return spans


def loss_mask(ids: list[int], markers: AssistantMarkers | None, policy: str) -> tuple[list[bool], bool]:
    """Per-token mask and whether an assistant span was found. ``policy``
    ``assistant``: only assistant replies count, falling back to the whole
    sequence when there is none; ``all``: every token."""
    if policy == "all":
        return [True] * len(ids), True
    spans = assistant_spans(ids, markers) if markers else []
    if not spans:
        return [True] * len(ids), False
    mask = [False] * len(ids)
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    return mask, True


# ---- losses ----------------------------------------------------------------


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
        prompts without it: no word may repeat ``max_word_run`` times in a row,
        and the distinct words may not fall below ``min_vocab_ratio`` of the
        original model's."""
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
        texts = [self.tokenizer.decode(t) for t in adapted]
        words = [w for t in texts for w in t.split()]
        original_words = {w for t in original for w in self.tokenizer.decode(t).split()}
        run = _longest_run([t.split() for t in texts])
        original_run = _longest_run([self.tokenizer.decode(t).split() for t in original])
        distinct = len(set(words))
        reasons = []
        if run >= config.max_word_run:
            reasons.append(f"a word repeats {run} times in a row (limit {config.max_word_run - 1}; "
                           f"{original_run} without the adapter)")
        floor = config.min_vocab_ratio * len(original_words)
        if distinct < floor:
            reasons.append(f"{distinct} distinct words against {len(original_words)} without the adapter "
                           f"(at least {config.min_vocab_ratio:.0%} required)")
        return {"passed": not reasons, "reasons": reasons, "longest_word_run": run, "longest_word_run_original": original_run,
                "distinct_words": distinct,
                "distinct_words_original": len(original_words), "samples": texts[:4]}

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


def _longest_run(sequences: list[list[str]]) -> int:
    best = 0
    for words in sequences:
        run = 0
        for i, w in enumerate(words):
            run = run + 1 if i and w == words[i - 1] else 1
            best = max(best, run)
    return best


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)

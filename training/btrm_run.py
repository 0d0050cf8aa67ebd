"""A whole BTRM training run: config -> labelled texts -> trunk features -> heads.

Used by ``hogwild btrm train`` (any Hugging Face causal LM) and by the training
subprocess (the served model's shared trunk). The trunk is frozen: each text's
last-token feature is computed once, then the heads train on the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hogwild.contracts.btrm_config import BTRMConfig

from .btrm import HeadTrainingLog, RewardHeads, last_token_features, pairwise_accuracy, train_heads
from .btrm_data import LabelledSet


def encode(tokenizer, config: BTRMConfig, texts: list[str]) -> list[list[int]]:
    """Token ids of each text wrapped in the meta-prompt, cut from the left to
    ``max_length`` (the heads read the end)."""
    return [tokenizer.encode(config.wrap(t), add_special_tokens=False)[-config.max_length :] for t in texts]


@dataclass
class BTRMResult:
    heads: RewardHeads
    log: HeadTrainingLog
    held_out_accuracy: dict[str, float | None]
    positive_scores: dict[str, dict[str, float]]  # per head: count, mean, median of held-out positives
    report: dict

    def summary(self) -> dict:
        return {"held_out_accuracy": self.held_out_accuracy, "positive_scores": self.positive_scores,
                "final_loss": self.log.losses[-1] if self.log.losses else None, "data": self.report}


def train_on_features(config: BTRMConfig, names: list[str], positive: torch.Tensor, negative_weight: torch.Tensor,
                      features: torch.Tensor, heads: RewardHeads | None = None, report: dict | None = None,
                      progress=None) -> BTRMResult:
    """Split, train the heads on precomputed features, measure the held-out set.

    ``positive`` (N, H) bool and ``negative_weight`` (N, H) label each feature row;
    ``heads`` with the same names and cap continue training, else new ones start.
    """
    train_idx, test_idx = held_out_split(features.shape[0], config)
    if heads is None or heads.names != names or heads.cap != config.cap or heads.proj.in_features != features.shape[1]:
        heads = RewardHeads(features.shape[1], names, cap=config.cap)
    negative = negative_weight > 0
    held_out = (features[test_idx], positive[test_idx], negative[test_idx]) if len(test_idx) else None
    log = train_heads(heads, features[train_idx], positive[train_idx], negative_weight[train_idx], held_out,
                      epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
                      lam=config.logsq_lambda, form=config.logsq, seed=config.seed, progress=progress)
    evaluate = held_out or (features, positive, negative)
    with torch.no_grad():
        scores = heads(evaluate[0])
    return _result(heads, log, scores, evaluate[1], evaluate[2], report)


def held_out_split(n: int, config: BTRMConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices: a seeded ``held_out_fraction`` of the n texts held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    cut = int(round(n * (1 - config.held_out_fraction)))
    return order[:cut], order[cut:]


def _result(heads: RewardHeads, log: HeadTrainingLog, scores: torch.Tensor, positive: torch.Tensor,
            negative: torch.Tensor, report: dict | None) -> BTRMResult:
    """Per-head pairwise accuracy and positive-score centre of the evaluated rows' ``scores``."""
    accuracy = dict(zip(heads.names, pairwise_accuracy(scores, positive, negative)))
    positives = {}
    for h, name in enumerate(heads.names):
        s = scores[positive[:, h], h]
        positives[name] = {"count": s.numel(), "mean": float(s.mean()), "median": float(s.median())} if s.numel() else {}
    return BTRMResult(heads, log, accuracy, positives, report or {})


def train_btrm(model, tokenizer, config: BTRMConfig, labelled: LabelledSet, progress=None) -> BTRMResult:
    """Features from the frozen ``model`` for every text, then the heads."""
    ids = encode(tokenizer, config, labelled.texts)
    features = last_token_features(model, ids, progress=(lambda done, total: progress("features", done, total)) if progress else None)
    return train_on_features(config, labelled.head_names, labelled.positive, labelled.negative_weight, features,
                             report=labelled.report,
                             progress=(lambda e, total, log: progress("epochs", e, total)) if progress else None)


def train_btrm_with_trunk_lora(peft_model, ids: list[list[int]], names: list[str], positive: torch.Tensor,
                               negative_weight: torch.Tensor, config: BTRMConfig, report: dict | None = None,
                               progress=None) -> BTRMResult:
    """Heads and a LoRA on the trunk. ``peft_model`` is the trunk with the LoRA
    attached (``training.lora.attached_lora``, r=16, alpha=32): the trunk's own
    weights never change and the adapter is never merged.

    Two phases (LP-FT, Kumar et al. 2022): ``epochs`` of the heads alone on the
    trunk's features (the fresh adapter is the identity), then
    ``trunk_lora_epochs`` of heads and adapter together, the adapter at
    ``trunk_lora_lr``, gradients clipped. Trained together from the start, the
    untrained heads dragged the features around and heads collapsed in 1 run of 4.
    """
    from .btrm import btrm_loss

    total = config.epochs + config.trunk_lora_epochs
    peft_model.eval()
    features = last_token_features(peft_model, ids)
    probe = train_on_features(config, names, positive, negative_weight, features, report=report,
                              progress=(lambda e, _, log: progress("epochs", e, total)) if progress else None)
    negative = negative_weight > 0
    train_idx, test_idx = held_out_split(len(ids), config)  # the same split as the probe
    device = next(peft_model.parameters()).device
    heads, log = probe.heads.to(device), probe.log
    adapter = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": list(heads.parameters()), "lr": config.lr},
                                   {"params": adapter, "lr": config.trunk_lora_lr}], weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.trunk_lora_epochs):
        peft_model.train()
        losses = []
        shuffled = [train_idx[i] for i in torch.randperm(len(train_idx), generator=gen).tolist()]
        for start in range(0, len(shuffled), config.batch_size):
            batch = shuffled[start : start + config.batch_size]
            scores = heads(last_token_features(peft_model, [ids[i] for i in batch], batch_size=len(batch), grad=True))
            out = btrm_loss(scores, positive[batch].to(scores.device), negative_weight[batch].to(scores.device),
                            config.logsq_lambda, config.logsq)
            if not out.active.any():
                continue
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([*heads.parameters(), *adapter], config.max_grad_norm)
            optimizer.step()
            losses.append(float(out.loss.detach()))
        peft_model.eval()
        log.losses.append(sum(losses) / max(1, len(losses)))
        if test_idx:
            with torch.no_grad():
                held = heads(last_token_features(peft_model, [ids[i] for i in test_idx])).cpu()
            log.accuracy.append(pairwise_accuracy(held, positive[test_idx], negative[test_idx]))
            log.epochs.append(config.epochs + epoch + 1)
        if progress is not None:
            progress("epochs", config.epochs + epoch + 1, total)
    rows = test_idx or list(range(len(ids)))
    with torch.no_grad():
        scores = heads(last_token_features(peft_model, [ids[i] for i in rows])).cpu()
    return _result(heads.cpu(), log, scores, positive[rows], negative[rows], report)


def plot_training(log: HeadTrainingLog, names: list[str], path: Path) -> None:
    """Loss per epoch and held-out pairwise accuracy per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(range(1, len(log.losses) + 1), log.losses)
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    left.set_yscale("log")
    for h, name in enumerate(names):
        right.plot(log.epochs, [a[h] if a[h] is not None else float("nan") for a in log.accuracy], label=name)
    right.set_xlabel("epoch")
    right.set_ylabel("held-out pairwise accuracy")
    right.set_ylim(0.4, 1.02)
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

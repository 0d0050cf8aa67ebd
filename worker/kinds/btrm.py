"""Reward heads (``mode: btrm``): heads trained on the served trunk's features (the
served weights untouched), optionally with a private trunk LoRA that is never merged."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hogwild.contracts.jobs import SubmitBTRMOp
from hogwild.contracts.protocol import OpError
from hogwild.training.btrm import last_token_features
from hogwild.training.btrm_data import build_labelled_set
from hogwild.training.btrm_run import encode, train_btrm_with_trunk_lora, train_on_features
from hogwild.training.lora import lora_factors

from ..reward_heads import TRUNK_LORA_ALPHA, TRUNK_LORA_R
from .base import Admission, JobKind, Services


def labels_of(op: SubmitBTRMOp, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative weight): one row per sample, one column per head."""
    positive = torch.zeros(len(op.samples), len(names), dtype=torch.bool)
    negative_weight = torch.zeros(len(op.samples), len(names))
    for i, sample in enumerate(op.samples):
        for head, label in sample.labels.items():
            if label == "positive":
                positive[i, names.index(head)] = True
            else:
                negative_weight[i, names.index(head)] = op.config.tier_weights[label]
    return positive, negative_weight


class BTRM(JobKind):
    request = SubmitBTRMOp

    def admit(self, service: Services, op: SubmitBTRMOp) -> Admission:
        names = {h.name for h in op.config.heads}
        for i, sample in enumerate(op.samples or []):
            for head, label in sample.labels.items():
                if head not in names:
                    raise OpError("invalid", f"samples[{i}]: no head {head!r} in the config (heads: {sorted(names)})")
                if label != "positive" and label not in op.config.tier_weights:
                    raise OpError("invalid", f"samples[{i}]: label {label!r} is neither 'positive' nor a tier of "
                                  f"tier_weights {sorted(op.config.tier_weights)}")
        return Admission(op.sample_count())

    def run(self, service: Services, job):
        op: SubmitBTRMOp = job.op
        config = op.config
        names = [h.name for h in config.heads]
        if op.samples:
            ids = [s.ids[-config.max_length :] for s in op.samples]
            positive, negative_weight = labels_of(op, names)
            report = {"samples": len(ids)}
        else:
            labelled = build_labelled_set(config, Path("/"))
            ids = encode(service.tokenizer(), config, labelled.texts)
            positive, negative_weight, report = labelled.positive, labelled.negative_weight, labelled.report
        if not ids:
            return "failed", "no samples: the sources held no readable text"
        job.info.n_samples = len(ids)
        job.info.total_steps = config.epochs + (config.trunk_lora_epochs if config.trunk_lora else 0)
        trunk_lora = None
        if config.trunk_lora:  # a LoRA private to the heads: attached for training and scoring, never merged
            with service.access.exclusive(), service.access.adapter(r=TRUNK_LORA_R, alpha=TRUNK_LORA_ALPHA,
                                                                    dropout=0.05) as peft_model:
                result = train_btrm_with_trunk_lora(peft_model, ids, names, positive, negative_weight, config, report,
                                                    progress=lambda stage, epoch, total: service.jobs.progress(job, epoch, total))
                trunk_lora = lora_factors(peft_model)
        else:
            with service.access.reading() as model:
                features = last_token_features(model, ids)  # the served weights as they are now
            book = service.heads
            reuse = book.heads if book.heads is not None and book.heads.names == names and book.trunk_lora is None else None
            result = train_on_features(config, names, positive, negative_weight, features, heads=reuse, report=report,
                                       progress=lambda epoch, total, log: service.jobs.progress(job, epoch, total))
        job.info.result = result.summary()
        service.heads.replace(result.heads, {
            "names": names, "descriptions": {h.name: h.description for h in config.heads}, "meta_prompt": config.meta_prompt,
            "max_length": config.max_length, "job_id": job.info.job_id, "trained_at": time.time(),
            "held_out_accuracy": result.held_out_accuracy,
            "trunk_lora": {"r": TRUNK_LORA_R, "alpha": TRUNK_LORA_ALPHA, "modules": len(trunk_lora)} if trunk_lora else None,
        }, trunk_lora)
        service.checkpointer.schedule()
        return "succeeded", None


KIND = BTRM()

"""``python -m bench bf16``: do small learning rates land in bf16 weights trained in place?

Same weights (the bench model saved in bf16), same samples, same trainer and APOLLO
settings; the baseline is the same job in fp32 (the bf16 weights upcast), in the same run:
- ``bf16_vs_fp32_loss_drop_ratio``: how far the loss fell in bf16 with stochastic
  rounding, over how far it fell in fp32 (lr 1e-5, and ``..._lr_1e-6``); the same with
  nearest rounding for comparison;
- ``applied_update_ratio``: one step, the norm of the update that landed in the bf16
  weights over the norm of the fp32 update (``applied_update_projection``: the landed
  update's component along the fp32 one, 1.0 when unbiased);
- ``sr_step_time_ratio``: time of an optimizer step (forward, backward, update; 8 samples
  x 128 tokens) with stochastic over nearest rounding, alternating rounds, on the
  trainer's thread count;
- ``bytes_written_ratio``: what a checkpoint sync writes after one step, over the model
  bytes, for each rounding (stochastic rounding changes more blocks).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import machine, model_dir

STEPS = 30


def _samples(tokenizer, n: int = 4, length: int = 96):
    """``n`` samples of ``length`` tokens from the story corpus: a third context, the rest continuation."""
    from hogwild.tiny_model import corpus_files
    from hogwild.training.batches import Sample

    ids = tokenizer.encode(" ".join(f.read_text() for f in corpus_files()[:16]))
    cut = length // 3
    return [Sample(tuple(ids[i * length : i * length + cut]), tuple(ids[i * length + cut : (i + 1) * length]))
            for i in range(n)]


def _model(source: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)


def _loss_drop(source: Path, dtype: torch.dtype, samples, lr: float, rounding: str | None) -> float:
    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.sft import SFTTrainer

    result = SFTTrainer(_model(source, dtype)).run(samples, SFTOptions(lr=lr, steps=STEPS, rounding=rounding))
    return result.loss_before - result.loss_after


def _one_step_update(source: Path, dtype: torch.dtype, samples, rounding: str | None) -> torch.Tensor:
    """Every weight's change over one step at lr 1e-5, flattened, in fp32."""
    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.sft import SFTTrainer

    model = _model(source, dtype)
    before = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    SFTTrainer(model).run(samples, SFTOptions(lr=1e-5, steps=1, rounding=rounding))
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]) - before


def _step_seconds(source: Path, samples, rounds: int) -> dict[str, float]:
    """Median seconds per optimizer step in bf16 for each rounding, rounds alternating
    (a step of 8 samples x 128 tokens)."""
    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.sft import SFTTrainer

    trainer = SFTTrainer(_model(source, torch.bfloat16))
    times: dict[str, list[float]] = {"stochastic": [], "nearest": []}
    trainer.run(samples, SFTOptions(lr=1e-5, steps=2))  # warm-up: optimizer state, allocator
    for _ in range(rounds):
        for rounding in times:
            started = time.perf_counter()
            trainer.run(samples, SFTOptions(lr=1e-5, steps=3, rounding=rounding))
            times[rounding].append((time.perf_counter() - started) / 3)
    return {k: statistics.median(v) for k, v in times.items()}


def _bytes_written(source: Path, samples, rounding: str, work: Path) -> dict:
    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.sft import SFTTrainer
    from hogwild.worker.checkpoint import read_layout, sync

    model = _model(source, torch.bfloat16)
    SFTTrainer(model).run(samples, SFTOptions(lr=1e-5, steps=1, rounding=rounding))
    target = work / rounding
    shutil.copytree(source, target)
    report = sync({n: p.data for n, p in model.named_parameters()}, target)
    model_bytes = sum(t.end - t.begin for t in read_layout(target).values())
    return {"bytes_written": report.bytes_written, "model_bytes": model_bytes,
            "bytes_written_ratio": report.bytes_written / model_bytes,
            "changed_block_fraction": report.blocks_written / report.blocks_compared}


def run(quick: bool = False, log=print) -> dict:
    from transformers import AutoTokenizer

    from hogwild import envs

    torch.set_num_threads(envs.trainer_threads() or max(1, (os.cpu_count() or 2) // 2))  # as the server's trainer runs
    preset = "tiny" if quick else "bench"
    source = model_dir(preset, "bfloat16")
    samples = _samples(AutoTokenizer.from_pretrained(source))
    n_params = sum(p.numel() for p in _model(source, torch.bfloat16).parameters())
    out: dict = {"benchmark": "bf16", "machine": machine(), "model": {"preset": preset, "dtype": "bfloat16", "params": n_params},
                 "steps": STEPS, "samples": len(samples), "threads": torch.get_num_threads()}
    for lr, suffix in ((1e-5, ""), (1e-6, "_lr_1e-6")):
        log(f"loss drops at lr {lr:g}")
        fp32 = _loss_drop(source, torch.float32, samples, lr, None)
        stochastic = _loss_drop(source, torch.bfloat16, samples, lr, "stochastic")
        nearest = _loss_drop(source, torch.bfloat16, samples, lr, "nearest")
        out[f"fp32_loss_drop{suffix}"] = fp32
        out[f"bf16_vs_fp32_loss_drop_ratio{suffix}"] = stochastic / fp32
        out[f"bf16_nearest_vs_fp32_loss_drop_ratio{suffix}"] = nearest / fp32
    log("one step's update")
    exact = _one_step_update(source, torch.float32, samples, None)
    for rounding in ("stochastic", "nearest"):
        landed = _one_step_update(source, torch.bfloat16, samples, rounding)
        key = "" if rounding == "stochastic" else "_nearest"
        out[f"applied_update_ratio{key}"] = float(landed.norm() / exact.norm())
        out[f"applied_update_projection{key}"] = float(landed @ exact / (exact @ exact))
        out[f"weights_changed_fraction{key}"] = float((landed != 0).float().mean())
    log("step time")
    seconds = _step_seconds(source, _samples(AutoTokenizer.from_pretrained(source), 8, 128), rounds=3 if quick else 8)
    out["step_seconds"] = seconds
    out["sr_step_time_ratio"] = seconds["stochastic"] / seconds["nearest"]
    log("checkpoint after one step")
    Path(".cache").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=".cache") as work:
        for rounding in ("stochastic", "nearest"):
            out[f"checkpoint_{rounding}"] = _bytes_written(source, samples, rounding, Path(work))
    out["bytes_written_ratio"] = out["checkpoint_stochastic"]["bytes_written_ratio"]
    out["bytes_written_ratio_nearest"] = out["checkpoint_nearest"]["bytes_written_ratio"]
    return out

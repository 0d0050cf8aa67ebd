"""``python -m bench checkpoint``: what a block-level sync writes, and how long
it takes, against a plain ``safetensors.save_file`` of every tensor (same run).

Two updates of a bf16 model, each synced into its own copy of the model
directory by the same code the server's ``/checkpoint`` runs:
- one small training step (APOLLO, lr 1e-5, one sample);
- a merged LoRA (r=16 on q/k/v/o/gate/up/down of every layer, as circuit
  breakers merge one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hogwild.worker.checkpoint import read_layout, sync

from .common import machine, model_dir


def _full_save_seconds(tensors: dict[str, torch.Tensor], directory: Path) -> float:
    from safetensors.torch import save_file

    path = directory / "full.safetensors"
    started = time.perf_counter()
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - started


def _training_step(model) -> None:
    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.batches import Sample
    from hogwild.training.sft import SFTTrainer

    SFTTrainer(model).run([Sample((5, 17, 300, 42, 7, 8, 9), (10, 11, 12, 13, 14, 15))], SFTOptions(lr=1e-5, steps=1))


def _merged_lora(model):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # as after training: B is no longer zero
                p.normal_(0, 0.02)
    return peft_model.merge_and_unload()


def measure(source: Path, update: str, work: Path, repeats: int = 5) -> dict:
    """One update, synced into ``repeats`` fresh copies of the directory (median time)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    if update == "training_step":
        _training_step(model)
    else:
        model = _merged_lora(model)
    tensors = {n: p.data for n, p in model.named_parameters()}
    reports = []
    for i in range(repeats):
        target = work / f"{update}-{i}"
        shutil.copytree(source, target)
        reports.append(sync(tensors, target))
    report = sorted(reports, key=lambda r: r.seconds)[repeats // 2]
    model_bytes = sum(t.end - t.begin for t in read_layout(target).values())
    full = sorted(_full_save_seconds(tensors, work) for _ in range(repeats))[repeats // 2]
    return {"bytes_written": report.bytes_written, "model_bytes": model_bytes,
            "bytes_written_ratio": report.bytes_written / model_bytes, "blocks_written": report.blocks_written,
            "blocks_compared": report.blocks_compared, "changed_block_fraction": report.blocks_written / report.blocks_compared,
            "methods": report.method, "sync_seconds": report.seconds,
            "full_save_seconds": full, "sync_vs_full_save_time_ratio": report.seconds / full}


def run(quick: bool = False, log=print) -> dict:
    out: dict = {"benchmark": "checkpoint", "machine": machine(), "dtype": "bfloat16"}
    for preset in ("tiny",) if quick else ("tiny", "bench"):
        source = model_dir(preset, "bfloat16")
        with tempfile.TemporaryDirectory(dir=".cache") as work:
            for update in ("training_step", "merged_lora"):
                log(f"{preset}: {update}")
                out[f"{preset}_{update}"] = measure(source, update, Path(work))
    out["bytes_written_ratio"] = {u: out[f"tiny_{u}"]["bytes_written_ratio"] for u in ("training_step", "merged_lora")}
    size = "tiny" if quick else "bench"
    out["sync_vs_full_save_time_ratio"] = {u: out[f"{size}_{u}"]["sync_vs_full_save_time_ratio"] for u in ("training_step", "merged_lora")}
    return out

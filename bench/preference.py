"""``python -m bench preference``: preference training against SFT, same model, same run.

- ``pair_tokens_per_s_ratio_vs_sft``: tokens/s of a preference job (DPO, its reference pass
  included: it is paid once per job), counting every token of both sequences of each pair,
  over tokens/s of an SFT job on exactly those sequences (each pair's two sequences as two
  samples), the same number of steps; goal >= 0.85;
- ``reference_copy_ratio``: the private memory the reference keeps (its log-probabilities,
  and anything the pass left behind) / the model's bytes; goal < 0.1 (a reference model
  would be 1.0).
The trainer runs in this process on the bench model (fp32), on the server's thread count.
"""

from __future__ import annotations

import os
import time

import torch

from .common import machine, model_dir

STEPS = 8


def _pairs(tokenizer, n: int, length: int):
    from hogwild.tiny_model import corpus_files
    from hogwild.training.preference import Pair

    ids = tokenizer.encode(" ".join(f.read_text() for f in corpus_files()[:16]))
    third = length // 3
    pairs = []
    for i in range(n):
        window = ids[i * 2 * length : (i + 1) * 2 * length]
        pairs.append(Pair(tuple(window[:third]), tuple(window[third:length]), tuple(window[length : length + length - third])))
    return pairs


def run(quick: bool = False, log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hogwild import envs
    from hogwild.contracts.preference_config import PreferenceOptions
    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.batches import Sample
    from hogwild.training.preference import PreferenceTrainer
    from hogwild.training.sft import SFTTrainer
    from hogwild.worker.process_memory import memory_snapshot, release_free_heap

    torch.set_num_threads(envs.trainer_threads() or max(1, (os.cpu_count() or 2) // 2))
    preset = "tiny" if quick else "bench"
    source = model_dir(preset)
    tokenizer = AutoTokenizer.from_pretrained(source)
    pairs = _pairs(tokenizer, 8, 96)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = SFTTrainer(model)
    sft_samples = [Sample(p.context_ids, reply) for p in pairs for reply in (p.chosen_ids, p.rejected_ids)]
    tokens_per_step = sum(len(s.context_ids) + len(s.continuation_ids) for s in sft_samples)
    steps = 2 if quick else STEPS
    common = dict(lr=1e-6, steps=steps, shuffle=False, micro_batch_size=8, eval_tokens=0)
    weights.run(sft_samples[:2], SFTOptions(**{**common, "steps": 1}))  # warm-up: optimizer state, allocator
    out: dict = {"benchmark": "preference", "machine": machine(), "threads": torch.get_num_threads(),
                 "model": {"preset": preset, "dtype": "float32", "bytes": model_bytes}, "pairs": len(pairs),
                 "tokens_per_step": tokens_per_step, "steps": steps}
    rounds = {"sft": [], "preference": []}
    for _ in range(1 if quick else 3):  # alternating, median
        log("sft job")
        started = time.perf_counter()
        weights.run(sft_samples, SFTOptions(**common, batch_size=len(sft_samples)))
        rounds["sft"].append(tokens_per_step * steps / (time.perf_counter() - started))
        log("preference job (dpo, reference computed)")
        started = time.perf_counter()
        result = PreferenceTrainer(weights).run(pairs, PreferenceOptions(**common, objective="dpo"))
        rounds["preference"].append(tokens_per_step * steps / (time.perf_counter() - started))
        out["reference_seconds"] = result.reference_seconds
    out["sft_tokens_per_s"] = sorted(rounds["sft"])[len(rounds["sft"]) // 2]
    out["pair_tokens_per_s"] = sorted(rounds["preference"])[len(rounds["preference"]) // 2]
    out["pair_tokens_per_s_ratio_vs_sft"] = out["pair_tokens_per_s"] / out["sft_tokens_per_s"]
    log("what the reference keeps")
    trainer = PreferenceTrainer(weights)
    release_free_heap()
    before = memory_snapshot().get("rss_anon", 0)
    with torch.no_grad():
        refs = trainer.reference(pairs, 8)
    release_free_heap()
    kept = memory_snapshot().get("rss_anon", 0) - before
    out["reference_numbers_bytes"] = sum(t.numel() * t.element_size() for t in refs)
    out["reference_private_bytes"] = kept
    out["reference_copy_ratio"] = max(kept, out["reference_numbers_bytes"]) / model_bytes
    return out

"""``python -m bench btrm``: what reward heads cost at scoring time.

On the bench model's trunk (fp32, one thread per process as the trainer runs):
one trunk forward over a batch of 16 wrapped passages, then the heads at each
passage's last token. ``heads_8_vs_1_cost_ratio``: 8 stacked heads vs 1 (the
point of the design: ~1.0). ``heads_vs_separate_models_ratio``: 8 stacked heads
vs 8 separate reward models, i.e. 8 trunk forwards with one head each.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from .common import machine, model_dir


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(quick: bool = False, log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hogwild.contracts.btrm_config import BTRMConfig
    from hogwild.training.btrm import RewardHeads, last_token_features
    from hogwild.training.btrm_corpora import TOPICS, passage

    preset = "tiny" if quick else "bench"
    path = model_dir(preset)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    config = BTRMConfig(heads=[{"name": "h", "positive_sources": [{"path": "-"}]}])
    rng = random.Random(0)
    ids = [tok.encode(config.wrap(passage(rng, words, "fk_normed")), add_special_tokens=False)
           for words in list(TOPICS.values()) * 4]
    hidden = model.config.hidden_size
    one, eight = RewardHeads(hidden, ["h0"]), RewardHeads(hidden, [f"h{i}" for i in range(8)])
    repeats = 3 if quick else 9

    def score(heads):
        with torch.no_grad():
            return heads(last_token_features(model, ids, batch_size=len(ids)))

    log("one head, eight heads, eight separate models")
    t1 = _median_seconds(lambda: score(one), repeats)
    t8 = _median_seconds(lambda: score(eight), repeats)
    separate = _median_seconds(lambda: [score(one) for _ in range(8)], max(3, repeats // 3))
    return {"benchmark": "btrm", "machine": machine(), "model": {"preset": preset, "dtype": "float32"},
            "batch": len(ids), "tokens_per_passage": sum(map(len, ids)) / len(ids),
            "seconds_1_head": t1, "seconds_8_heads": t8, "seconds_8_separate_models": separate,
            "heads_8_vs_1_cost_ratio": t8 / t1, "heads_vs_separate_models_ratio": t8 / separate}

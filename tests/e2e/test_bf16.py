"""bf16 weights on real `vllm serve`: small learning rates land (stochastic rounding),
round away with nearest rounding, and a merged adapter still reverts bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild import tiny_model
from hogwild.contracts.sft_config import SFTOptions
from hogwild.training.batches import Sample
from hogwild.training.circuit_breaker_data import synthetic_samples
from hogwild.training.sft import SFTTrainer

from ..conftest import ADMIN_KEY, LIMITS, serving

pytestmark = pytest.mark.server

LR, STEPS = 1e-5, 30


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    model_dir = tiny_model.build(tmp / "tiny-bf16", dtype="bfloat16")
    with serving(model_dir, tmp, "bf16", dtype="bfloat16", env={"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS}) as handle:
        yield handle


@pytest.fixture(scope="module")
def tok(bf16):
    return AutoTokenizer.from_pretrained(bf16.model_dir)


def fp32_loss_drop(weights_dir, sample: Sample, options: SFTOptions) -> float:
    """The same job on the same weights, trained in fp32 by the same trainer in this process."""
    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    result = SFTTrainer(model).run([sample], options)
    return result.loss_before - result.loss_after


def test_a_small_learning_rate_learns_in_bf16_as_in_fp32_with_stochastic_rounding_only(bf16, tok):
    ratios = {}
    # A different APOLLO rank per job rebuilds the optimizer, so each job starts fresh, as its fp32 twin does.
    for rounding, rank, text in (("stochastic", 64, " learned a new sentence today, and told it again to all who came by."),
                                 ("nearest", 32, " kept a lantern by the door, and the fox came back every winter night.")):
        snapshot = bf16.state_dir / f"weights-before-{rounding}"
        r = bf16.http.post("/checkpoint", json={"target": str(snapshot)})  # the served weights as the job will find them
        assert r.status_code == 200, r.text
        ctx, cont = tok.encode("Once upon a time the server"), tok.encode(text)
        r = bf16.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": cont}], "lr": LR,
                                           "steps": STEPS, "rank": rank, "rounding": rounding, "wait": True})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["state"] == "succeeded" and job["result"]["rounding"] == rounding, job
        assert job["warnings"] == []
        served_drop = job["result"]["loss_before"] - job["result"]["loss_after"]
        ratios[rounding] = served_drop / fp32_loss_drop(snapshot, Sample(tuple(ctx), tuple(cont)),
                                                        SFTOptions(lr=LR, steps=STEPS, rank=rank))
    assert ratios["stochastic"] >= 0.8, ratios  # ~1.0 here
    assert ratios["nearest"] < 0.5, ratios  # ~0.2 here: most updates round away
    status = bf16.http.get("/train/status").json()
    assert status["optimizer"]["rounding"] == "nearest" and status["optimizer"]["weight_spacing"] > 0


def test_a_learning_rate_too_small_even_for_stochastic_rounding_is_warned_about(bf16, tok):
    ids = tok.encode("A warning, not silence.")
    r = bf16.http.post("/train", json={"samples": [{"context_ids": ids[:3], "continuation_ids": ids[3:]}],
                                       "lr": 1e-10, "steps": 2, "wait": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded" and job["result"]["rounding"] == "stochastic"
    assert len(job["warnings"]) == 1 and "lr 1e-10 x 2 steps" in job["warnings"][0], job["warnings"]


def test_revert_after_a_stochastic_merge_is_bitwise_exact(bf16, tok):
    samples = synthetic_samples(tok, 16, 16)
    digest = bf16.arena_digest()
    r = bf16.http.post("/train", json={"mode": "circuit_breaker", "wait": True, "config": {"lr": 5e-4, "steps": 80},
                                       "samples": [s.model_dump(exclude_none=True) for s in samples]})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded" and job["result"]["merged"], job
    assert bf16.arena_digest() != digest
    r = bf16.http.post("/train/revert", json={"wait": True})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["exact"] is True
    assert bf16.arena_digest() == digest

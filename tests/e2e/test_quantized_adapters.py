"""Adapters on a quantized base, on real `vllm serve`: the tiny model quantized W4A16
(compressed-tensors pack-quantized int4, one scale per 32 inputs; vLLM's CPUWNA16 kernel serves
it) in bf16 with ``--enable-lora``. The trainer reads the packed base from the checkpoint
(vLLM repacks it for its kernel), passes the parity gate on it, refuses full-weight jobs with
the fix, and trains an adapter that vLLM serves with the trainer's numbers."""

from __future__ import annotations

import pytest

from hogwild import tiny_model

from ..conftest import ADMIN_KEY, LIMITS, serving
from .test_served_adapters import CONTEXT, greedy, score, train

pytestmark = pytest.mark.server

LORA_ARGS = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]
BF16 = 0.05  # the parity gate's absolute bf16 tolerance on one log-prob (worker/parity.py)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantized")
    model_dir = tiny_model.build(tmp / "tiny-w4a16", dtype="bfloat16", quantize="w4a16")
    with serving(model_dir, tmp, "quantized", dtype="bfloat16", extra_args=LORA_ARGS,
                 env={"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS}) as handle:
        yield handle


def test_the_trainer_holds_the_packed_base_and_its_forward_matches_vllms(served):
    status = served.http.get("/train/status").json()
    assert status["state"] == "ready" and status["quantization"] == "compressed-tensors", status.get("reason")
    assert status["parity"]["state"] == "passed" and status["parity"]["max_abs_diff"] < BF16
    # Nothing of vLLM's is mapped: its int4 weights are repacked for its kernel; the trainer holds the packed ones.
    assert status["backend"] == "none" and status["memory"]["shared_param_bytes"] == 0
    assert "model.embed_tokens.weight" in status["frozen"]


def test_a_full_weight_job_is_refused_with_the_fix_and_changes_nothing(served):
    before = score(served, None, [100] * 4)
    for body in ({"samples": [{"context_ids": CONTEXT, "continuation_ids": [100] * 4}]},
                 {"mode": "preference", "samples": [{"context_ids": CONTEXT, "chosen_ids": [1], "rejected_ids": [2]}]}):
        r = served.http.post("/v1/train", json=body)
        assert r.status_code == 501, r.text
        message = r.json()["error"]["message"]
        assert "quantized (compressed-tensors)" in message and '"adapter"' in message, message
    assert score(served, None, [100] * 4) == before
    assert served.http.get("/train/status").json()["weights_version"] == 0


def test_an_adapter_learns_a_target_on_the_quantized_base_and_vllm_serves_the_trainers_numbers(served):
    target = [100] * 4
    base_score, base_greedy = score(served, None, target), greedy(served, None)
    r = train(served.http, "q", target)
    job = r.json()
    assert r.status_code == 200 and job["state"] == "succeeded", r.text
    assert job["result"]["loss_before"] - job["result"]["loss_after"] > 1.0, job["result"]
    assert greedy(served, "q") == target
    # vLLM's int4 kernel with the adapter scores what the trainer measured after its last step, to bf16's tolerance.
    assert score(served, "q", target) == pytest.approx(-job["result"]["loss_after"] * len(target), abs=len(target) * BF16)
    assert score(served, None, target) == base_score and greedy(served, None) == base_greedy
    # RL on the adapter: the trainer's log-probs of vLLM's samples under the adapter are vLLM's.
    r = served.http.post("/v1/completions", json={"model": "q", "prompt": CONTEXT, "n": 4, "max_tokens": 4, "seed": 1,
                                                  "temperature": 1.0, "logprobs": 0, "return_token_ids": True})
    samples = [{"context_ids": CONTEXT, "completion_ids": c["token_ids"], "logprobs": c["logprobs"]["token_logprobs"],
                "reward": float(i), "group": "g"} for i, c in enumerate(r.json()["choices"])]
    r = served.http.post("/v1/train", json={"mode": "rl", "adapter": "q", "samples": samples, "lr": 1e-3, "steps": 1,
                                            "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    assert r.json()["result"]["before"]["logprob_gap_max"] < BF16

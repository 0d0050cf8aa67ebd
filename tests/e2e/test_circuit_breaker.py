"""Circuit-breaker LoRA on real `vllm serve`: trained on the live model, merged
into the served weights, visible in vLLM's log-probabilities on harmful prompts
and not on retain ones, and reverted bit for bit.

On a server of its own, with the tiny model as built: what the merge changes (harmful
against retain replies, the coherence check against the base's own generations)
depends on the model it starts from, and the shared server's model has been trained
by every module before this one."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hogwild.training.chat_masks import assistant_markers, assistant_spans
from hogwild.training.circuit_breaker_data import synthetic_samples, write_jsonl

from ..conftest import ADMIN_KEY, LIMITS, serving
from ..waiting import wait_idle

pytestmark = pytest.mark.server

CONFIG = {"lr": 5e-4, "steps": 80}


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    with serving(tiny_model_dir, tmp_path_factory.mktemp("cb"), "cb", dtype="float32",
                 env={"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS}) as handle:
        yield handle


@pytest.fixture(scope="module")
def tokenizer(served):
    return AutoTokenizer.from_pretrained(served.model_dir)


@pytest.fixture(scope="module")
def samples(tokenizer):
    return synthetic_samples(tokenizer, 16, 16)


def _reply_logprobs(served, tokenizer, samples) -> list[float]:
    """vLLM's total log-probability of each sample's assistant reply."""
    markers = assistant_markers(tokenizer)
    out = []
    for s in samples:
        start, end = assistant_spans(s.ids, markers)[0]
        r = served.http.post("/v1/score", json={"prompt": s.ids, "score_ranges": [[start, end]]})
        assert r.status_code == 200, r.text
        out.append(r.json()["scores"][0]["total_logprob"] / (end - start))
    return out


def test_revert_with_nothing_merged_is_a_conflict(served):
    r = served.http.post("/train/revert", json={"wait": True})
    assert r.status_code == 409 and "no circuit-breaker adapter" in r.json()["error"]["message"]


def test_circuit_breaker_merges_changes_harmful_only_and_reverts_exactly(served, tokenizer, samples):
    harmful = [s for s in samples if s.split == "harmful"][:6]
    retain = [s for s in samples if s.split == "retain"][:6]
    wait_idle(served)
    digest = served.arena_digest()
    before = {"harmful": _reply_logprobs(served, tokenizer, harmful), "retain": _reply_logprobs(served, tokenizer, retain)}

    r = served.http.post("/train", json={"mode": "circuit_breaker", "wait": True, "config": CONFIG,
                                         "samples": [s.model_dump(exclude_none=True) for s in samples]})
    assert r.status_code == 200, r.text
    job = r.json()
    reverted = False
    try:
        assert job["state"] == "succeeded" and job["mode"] == "circuit_breaker", job
        result = job["result"]
        assert result["merged"] and result["harmful_cos_after"] < 0.2 and result["coherence"]["passed"]
        assert served.arena_digest() != digest  # merged into the very weights vLLM computes with

        after = {"harmful": _reply_logprobs(served, tokenizer, harmful), "retain": _reply_logprobs(served, tokenizer, retain)}
        shift = {k: sum(abs(a - b) for a, b in zip(after[k], before[k])) / len(before[k]) for k in before}
        assert shift["harmful"] > 3 * shift["retain"], shift  # ~8x here
        assert shift["retain"] < 0.25, shift

        adapters = served.http.get("/train/status").json()["adapters"]
        assert adapters[-1]["job_id"] == job["job_id"] and adapters[-1]["reverted_at"] is None
        assert adapters[-1]["summary"]["lora_layers"] == [0, 1]

        r = served.http.post("/train/revert", json={"job_id": job["job_id"], "wait": True})
        reverted = r.status_code == 200
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "succeeded" and r.json()["result"] == {"reverted": job["job_id"], "exact": True, "note": None}
        assert served.arena_digest() == digest  # bit for bit
        assert _reply_logprobs(served, tokenizer, harmful) == pytest.approx(before["harmful"], abs=1e-4)
        adapters = served.http.get("/train/status").json()["adapters"]
        assert adapters[-1]["reverted_at"] is not None and adapters[-1]["revert_exact"] is True
    finally:  # the shared server goes on without this adapter, whatever failed
        if not reverted and (job.get("result") or {}).get("merged"):
            served.http.post("/train/revert", json={"job_id": job["job_id"], "wait": True})


def test_an_over_aggressive_run_is_rolled_back_and_never_merged(served, samples):
    """alpha 10 without guards collapses the retain representations: the tripwire
    stops it and the served weights stay as they were."""
    dataset = write_jsonl(samples, served.state_dir / "cb" / "samples.jsonl")
    wait_idle(served)
    digest = served.arena_digest()
    r = served.http.post("/train", json={"mode": "circuit_breaker", "wait": True, "dataset_path": str(dataset),
                                         "config": {**CONFIG, "alpha_max": 10, "guards": False}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "failed" and "tripwire" in job["error"] and "nothing was merged" in job["error"], job
    assert job["result"]["merged"] is False and job["result"]["dataset"]["rows"] == len(samples)
    assert served.arena_digest() == digest


def test_circuit_breaker_requests_are_checked(served, samples):
    harmful_only = [s.model_dump(exclude_none=True) for s in samples if s.split == "harmful"]
    cases = [
        ({"mode": "circuit_breaker", "samples": harmful_only}, 422, "both harmful and retain"),
        ({"mode": "circuit_breaker"}, 422, "exactly one of samples"),
        ({"mode": "circuit_breaker", "samples": [{"ids": [1, 2], "split": "sideways"}]}, 422, "split"),
        ({"mode": "circuit_breaker", "samples": [{"ids": [1, 10**7], "split": "harmful"}]}, 422, "outside the vocabulary"),
        ({"mode": "circuit_breaker", "dataset_path": "/etc/passwd"}, 403, "dataset_path"),
        ({"mode": "circuit_breaker", "samples": harmful_only, "config": {"steps": 10**6}}, 422, "steps"),
    ]
    for body, status, words in cases:
        r = served.http.post("/train", json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.status_code, r.text)
    r = served.http.post("/train/revert", json={"job_id": "job-nope"})
    assert r.status_code in (404, 409)

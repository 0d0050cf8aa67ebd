"""Reward heads on real `vllm serve`: trained on the served trunk, read by /v1/score."""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from hogwild.client import btrm_samples, wrapped_prompt
from hogwild.contracts.btrm_config import load_config
from hogwild.training.btrm_corpora import write_corpora
from hogwild.training.btrm_data import build_labelled_set

from ..test_btrm import assert_positives_above_zero
from ..waiting import wait_until

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def corpora(served):
    """Synthetic corpora inside the state directory, where request paths may point."""
    return write_corpora(served.state_dir / "btrm-corpora", per_tier=15)  # 210 texts: within HOGWILD_MAX_SAMPLES


def test_asking_for_heads_before_any_are_trained_says_so(served):
    r = served.http.post("/v1/score", json={"prompt": [5, 6, 7], "score_ranges": [[0, 3]], "heads": True})
    assert r.status_code == 409 and "no reward heads" in r.json()["error"]["message"]


def test_heads_trained_from_token_ids_score_their_own_texts_highest(served, corpora):
    tok = AutoTokenizer.from_pretrained(served.model_dir)
    config = load_config(corpora)
    labelled = build_labelled_set(config, corpora.parent)
    r = served.http.post("/train", json={"mode": "btrm", "config": config.model_dump(), "wait": True,
                                         "samples": btrm_samples(tok, config, labelled.texts, labelled.labels)})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded" and job["mode"] == "btrm" and job["n_samples"] == len(labelled.texts)
    for name, accuracy in job["result"]["held_out_accuracy"].items():
        assert accuracy >= 0.9, (name, job["result"]["held_out_accuracy"])
    assert served.http.get("/train/status").json()["heads"]["names"] == labelled.head_names

    ocean = next(t for t, lab in zip(labelled.texts, labelled.labels) if lab.get("ocean") == "positive")
    forest = next(t for t, lab in zip(labelled.texts, labelled.labels) if lab.get("forest") == "positive")
    prompts = {name: wrapped_prompt(tok, config, text) for name, text in (("ocean", ocean), ("forest", forest))}
    scores = {}
    for name, prompt in prompts.items():
        r = served.http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[0, len(prompt)], [1, 4]], "heads": True})
        assert r.status_code == 200, r.text
        first = r.json()["scores"][0]
        assert set(first["heads"]) == set(labelled.head_names) and first["total_logprob"] < 0 and first["n_tokens"] > 0
        scores[name] = first["heads"]
    assert scores["ocean"]["ocean"] > scores["forest"]["ocean"]
    assert scores["forest"]["forest"] > scores["ocean"]["forest"]
    # A subset of the heads; a head that does not exist; without heads, no `heads` key.
    prompt = prompts["ocean"]
    only = served.http.post("/score", json={"prompt": prompt, "score_ranges": [[0, len(prompt)]], "heads": ["fable"]}).json()
    assert list(only["scores"][0]["heads"]) == ["fable"]
    r = served.http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[0, len(prompt)]], "heads": ["nope"]})
    assert r.status_code == 422 and "nope" in r.json()["error"]["message"]
    plain = served.http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[0, len(prompt)]]}).json()
    assert "heads" not in plain["scores"][0]


def test_heads_trained_from_a_config_on_the_server(served, corpora):
    r = served.http.post("/v1/train", json={"mode": "btrm", "config_path": str(corpora), "wait": True})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "succeeded" and r.json()["n_samples"] > 0
    assert r.json()["result"]["data"]["bad_rows"] == 2  # reported, not silently dropped


def test_btrm_requests_are_checked(served, corpora):
    config = load_config(corpora).model_dump()
    cases = [
        ({"mode": "btrm", "config_path": "/etc/hogwild.yaml"}, 403, "outside"),
        ({"mode": "btrm", "config": {**config, "shared_negatives": [{"path": "../../../../etc/passwd"}]}}, 403, "outside"),
        ({"mode": "btrm", "config": config, "config_path": str(corpora)}, 422, "exactly one"),
        ({"mode": "btrm", "config": config, "samples": [{"ids": [5, 6], "labels": {"no_such_head": "positive"}}]}, 422, "no_such_head"),
        ({"mode": "btrm", "config": config, "samples": [{"ids": [5, 6], "labels": {"ocean": "lukewarm_neg"}}]}, 422, "lukewarm_neg"),
        ({"mode": "reinforce", "samples": []}, 422, "mode"),
    ]
    digest = served.arena_digest()
    for body, status, needle in cases:
        r = served.http.post("/train", json={**body, "wait": True})
        assert r.status_code == status, (body, r.text)
        assert needle in r.json()["error"]["message"], r.text
    assert served.arena_digest() == digest


@pytest.fixture(scope="module")
def trunk_lora_heads(served, corpora):
    """Heads trained with a private trunk LoRA: (config path, the job, the arena's digest before it)."""
    import yaml

    raw = yaml.safe_load(corpora.read_text())
    raw.update(trunk_lora=True, trunk_lora_epochs=2, batch_size=32)
    config_path = corpora.parent / "with-trunk-lora.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    digest = served.arena_digest()
    r = served.http.post("/train", json={"mode": "btrm", "config_path": str(config_path), "wait": True})
    assert r.status_code == 200, r.text
    return config_path, r.json(), digest


def test_heads_with_a_private_trunk_lora_never_touch_the_served_weights(served, corpora, trunk_lora_heads):
    config_path, job, digest = trunk_lora_heads
    assert job["state"] == "succeeded", job
    assert min(job["result"]["held_out_accuracy"].values()) > 0.7, job["result"]["held_out_accuracy"]
    assert_positives_above_zero(job["result"]["positive_scores"])
    assert served.http.get("/train/status").json()["heads"]["trunk_lora"] == {"r": 16, "alpha": 32, "modules": 14}
    assert served.arena_digest() == digest  # the LoRA is the heads' own: never merged

    tok = AutoTokenizer.from_pretrained(served.model_dir)
    config = load_config(config_path)
    labelled = build_labelled_set(config, corpora.parent)
    prompts = {name: wrapped_prompt(tok, config, next(t for t, lab in zip(labelled.texts, labelled.labels)
                                                     if lab.get(name) == "positive" and lab.get("fable") != "positive"))
               for name in ("ocean", "forest")}
    scores = {name: served.http.post("/v1/score", json={"prompt": p, "score_ranges": [[0, len(p)]], "heads": True}).json()
              ["scores"][0]["heads"] for name, p in prompts.items()}
    assert scores["ocean"]["ocean"] > scores["forest"]["ocean"] and scores["forest"]["forest"] > scores["ocean"]["forest"]
    assert served.arena_digest() == digest  # scoring adds it on its own thread, never to the weights

    target = served.state_dir / "checkpoint-with-trunk-lora"
    assert served.http.post("/checkpoint", json={"target": str(target)}).status_code == 200
    assert (target / ".hogwild" / "heads_trunk_lora.safetensors").exists()


def test_head_scores_with_a_trunk_lora_answer_while_a_long_job_runs(served, trunk_lora_heads):
    # The trunk LoRA is added on the scoring thread only: scoring reads beside the job
    # (HOGWILD) instead of waiting for all of it.
    heads = served.http.get("/train/status").json()["heads"]
    assert heads["trunk_lora"], f"the heads lost their trunk LoRA: {heads}"
    # ~0.5-1 s steps on 2 cores: two of them is a bound far below the whole job (30-60 s).
    sample = {"context_ids": [(7 * i) % 1900 + 5 for i in range(400)],
              "continuation_ids": [(11 * i) % 1900 + 5 for i in range(100)]}
    r = served.http.post("/train", json={"samples": [sample] * 16, "micro_batch_size": 8, "lr": 1e-6, "steps": 60})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    prompt = [(13 * i) % 1900 + 5 for i in range(64)]
    latencies, steps = [], []
    try:
        wait_until(lambda: (info := served.http.get(f"/train/{job_id}").json())["state"] == "running" and info["step"] >= 1,
                   timeout=300, what=f"{job_id} running its steps")
        for _ in range(5):
            started = time.monotonic()
            r = served.http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[0, 64]], "heads": True})
            latencies.append(time.monotonic() - started)
            assert r.status_code == 200, f"after {latencies[-1]:.1f} s: {r.text}"
            assert list(r.json()["scores"][0]["heads"]) == heads["names"]
            info = served.http.get(f"/train/{job_id}").json()
            steps.append(info["step"])
            assert info["state"] == "running", f"the job ended before scoring answered: {info}, latencies {latencies}"
    finally:
        served.http.delete(f"/train/{job_id}")  # so the module's later tests do not wait for it
        done = wait_until(lambda: (info := served.http.get(f"/train/{job_id}").json())["state"]
                          in ("cancelled", "succeeded", "failed") and info, timeout=300, what=f"{job_id} ending")
    step_time = done["result"]["train_seconds"] / done["result"]["steps"]
    print(f"step {step_time:.3f} s; head-score latencies {[round(x, 3) for x in latencies]} s at steps {steps}")
    assert step_time >= 0.2, f"steps of {step_time:.3f} s make the bound meaningless: lengthen the samples"
    assert max(latencies) <= 2 * step_time, f"head scoring waited: {latencies} s against steps of {step_time:.3f} s"

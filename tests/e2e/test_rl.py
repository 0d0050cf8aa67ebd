"""RL on real `vllm serve`: completions with the engine's own log-probs (sampled from the server,
and chosen ones scored by it), one rewarded above the others of its group; the RL job raises the
log-probability vLLM scores for it, and the trainer's log-probs matched the engine's before the
first step. Bad RL requests answer 422 and change nothing."""

from __future__ import annotations

import pytest

from .test_bad_input import check_rejected

pytestmark = pytest.mark.server

CONTEXT = [5, 6, 7, 8, 9, 10]
# Completions the shared server (trained by earlier modules) finds unlikely: room to rise.
CHOSEN = [[300, 301, 302, 303], [400, 401, 402]]


def sample(served, prompt: list[int], n: int, max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """n completions of ``prompt`` from the server: their token ids and the engine's log-probs."""
    r = served.http.post("/v1/completions", json={"model": str(served.model_dir), "prompt": prompt, "max_tokens": max_tokens,
                                                   "n": n, "temperature": 1.0, "seed": 1, "logprobs": 1,
                                                   "return_token_ids": True})
    assert r.status_code == 200, r.text
    return [(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in r.json()["choices"]]


def token_scores(served, context: list[int], completion: list[int]) -> list[float]:
    """vLLM's log-probability of each token of ``completion`` after ``context``."""
    start = len(context)
    r = served.http.post("/v1/score", json={"prompt": context + completion,
                                            "score_ranges": [[p, p + 1] for p in range(start, start + len(completion))]})
    assert r.status_code == 200, r.text
    return [s["total_logprob"] for s in r.json()["scores"]]


def test_a_positive_advantage_raises_its_completions_served_logprob(served):
    drawn = [(ids, lps) for ids, lps in sample(served, CONTEXT, 2, 6) if ids]
    scored = [(ids, token_scores(served, CONTEXT, ids)) for ids in CHOSEN]
    samples = [{"context_ids": CONTEXT, "completion_ids": ids, "logprobs": lps, "reward": 1.0 if i == 0 else 0.0, "group": "p"}
               for i, (ids, lps) in enumerate(scored + drawn)]
    before = [sum(token_scores(served, CONTEXT, s["completion_ids"])) for s in samples]
    r = served.http.post("/train", json={"mode": "rl", "samples": samples, "objective": "grpo", "lr": 1e-3, "steps": 5,
                                         "wait": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded" and job["mode"] == "rl", job
    after = [sum(token_scores(served, CONTEXT, s["completion_ids"])) for s in samples]
    assert after[0] > before[0] + 0.5, (before, after)
    result = job["result"]
    assert result["steps"] == 5 and result["advantages"][0] > 0 > result["advantages"][1]
    # The trainer's log-probs of the tokens, before any step, against the engine's (fp32 served).
    assert result["before"]["logprob_gap_max"] < 1e-4, result["before"]  # 5e-7 to 1e-6 measured here
    assert result["before"]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert len(result["history"]) == 5 and {"ratio_mean", "clip_fraction", "truncated_fraction", "kl", "advantage_mean",
                                             "logprob_gap_mean", "logprob_gap_max"} <= set(result["history"][0])


SAMPLE = {"context_ids": [5, 6, 7], "completion_ids": [8, 9], "logprobs": [-1.0, -2.0], "advantage": 1.0}


def rl_sample(**changes):
    return {key: value for key, value in {**SAMPLE, **changes}.items() if value is not None}


BAD = {
    "logprobs shorter than the completion": ({"samples": [rl_sample(logprobs=[-1.0])]}, "logprobs"),
    "logprobs longer than the completion": ({"samples": [rl_sample(logprobs=[-1.0, -1.0, -1.0])]}, "logprobs"),
    "positive logprob": ({"samples": [rl_sample(logprobs=[-1.0, 0.5])]}, "logprobs"),
    "empty completion": ({"samples": [rl_sample(completion_ids=[], logprobs=[])]}, "completion_ids"),
    "unknown objective": ({"samples": [SAMPLE], "objective": "ppo2"}, "objective"),
    "clip_low zero": ({"samples": [SAMPLE], "clip_low": 0}, "clip_low"),
    "clip_low one": ({"samples": [SAMPLE], "clip_low": 1.0}, "clip_low"),
    "unknown loss_type": ({"samples": [SAMPLE], "loss_type": "grpo"}, "loss_type"),
    "is_cap below one": ({"samples": [SAMPLE], "is_cap": 0.5}, "is_cap"),
    "reward without group": ({"samples": [rl_sample(advantage=None, reward=1.0)]}, "reward and group"),
    "advantage and reward": ({"samples": [rl_sample(reward=1.0, group="g")]}, "not both"),
    "neither reward nor advantage": ({"samples": [rl_sample(advantage=None)]}, "or advantage"),
    "token past the vocabulary": ({"samples": [rl_sample(completion_ids=[8, 2000])]}, "outside the vocabulary"),
    "reward_heads and a reward": ({"samples": [rl_sample(advantage=None, reward=1.0, group="g")],
                                   "reward_heads": {"ocean": 1.0}}, "with reward_heads the heads give the rewards"),
    "reward_heads without a group": ({"samples": [rl_sample(advantage=None)], "reward_heads": {"ocean": 1.0}},
                                     "give group"),
    "reward_heads naming no head": ({"samples": [rl_sample(advantage=None, group="g")], "reward_heads": {"nope": 1.0}},
                                    "reward_heads: no head 'nope'"),
    "reward_heads empty": ({"samples": [rl_sample(advantage=None, group="g")], "reward_heads": {}}, "reward_heads"),
    "negative max_staleness": ({"samples": [SAMPLE], "max_staleness": -1}, "max_staleness"),
}
RAW_BAD = {
    "NaN logprob": ('{"mode": "rl", "samples": [{"context_ids": [5], "completion_ids": [6], "logprobs": [NaN], '
                    '"advantage": 1.0}]}', "logprobs"),
    "infinite reward": ('{"mode": "rl", "samples": [{"context_ids": [5], "completion_ids": [6], "logprobs": [-1.0], '
                        '"reward": Infinity, "group": "g"}]}', "reward"),
    "NaN head weight": ('{"mode": "rl", "samples": [{"context_ids": [5], "completion_ids": [6], "logprobs": [-1.0], '
                        '"group": "g"}], "reward_heads": {"ocean": NaN}}', "reward_heads"),
    "infinite advantage": ('{"mode": "rl", "samples": [{"context_ids": [5], "completion_ids": [6], "logprobs": [-1.0], '
                           '"advantage": -Infinity}]}', "advantage"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_rl_request_is_refused_and_changes_nothing(served, case):
    body, needle = BAD[case]
    digest = served.arena_digest()
    check_rejected(served, served.http.post("/train", json={"mode": "rl", "wait": True, **body}), 422, needle, digest)


@pytest.mark.parametrize("case", RAW_BAD, ids=list(RAW_BAD))
def test_a_non_finite_rl_number_is_refused(served, case):
    text, needle = RAW_BAD[case]
    digest = served.arena_digest()
    r = served.http.post("/train", content=text, headers={"Content-Type": "application/json"})
    check_rejected(served, r, 422, needle, digest)

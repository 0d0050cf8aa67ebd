"""Online RL on real `vllm serve`, run by the client loop (``hogwild.rl_loop``): a verifiable
task (reward = the fraction of completion tokens in a fixed fifth of the vocabulary) whose
mean reward starts near 0.2 and rises well above it, in fp32 and in bf16, while other
completions keep being served; every completion says the weights' version it was sampled at,
and the version rises by each update's steps. ``max_staleness`` refuses samples drawn too long
ago. With ``reward_heads`` the rewards come from the server's own BTRM heads. The loop changes
the model a lot: this module has its own servers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest
from transformers import AutoTokenizer

from hogwild.client import HogwildClient, btrm_samples
from hogwild.contracts.btrm_config import load_config
from hogwild.contracts.weights_version import HEADER
from hogwild.rl_loop import TokenBandReward, rl_loop, rl_samples
from hogwild.training.btrm_corpora import write_corpora
from hogwild.training.btrm_data import build_labelled_set

from ..conftest import ADMIN_KEY, API_KEY, LIMITS, serving
from .test_bad_input import check_rejected
from .test_llama_compiled import hogwild_metrics

pytestmark = pytest.mark.server

PROMPTS = [[5 + i, 17 + i, 40 + 2 * i, 9] for i in range(8)]
ITERATIONS = 20
# Measured here: 0.20 -> 0.61 in 15 iterations in fp32, 0.20 -> 0.62 in bf16 (sampling is not seeded).
LOOP = {"group_size": 8, "iterations": ITERATIONS, "max_tokens": 16, "objective": "grpo", "lr": 3e-3,
        "batch_size": 16}


def rl_server(model_dir, tmp_path_factory, dtype: str):
    return serving(model_dir, tmp_path_factory.mktemp("rl"), f"rl-{dtype}", dtype=dtype,
                   env={"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS})


@pytest.fixture(scope="module")
def rl_served(tiny_model_dir, tmp_path_factory):
    with rl_server(tiny_model_dir, tmp_path_factory, "float32") as handle:
        yield handle


@pytest.fixture(scope="module")
def rl_served_bf16(tiny_model_dir, tmp_path_factory):
    with rl_server(tiny_model_dir, tmp_path_factory, "bfloat16") as handle:
        yield handle


def vocab_size(served) -> int:
    return json.loads((served.model_dir / "config.json").read_text())["vocab_size"]


class Traffic:
    """Greedy completions sent back to back from another thread while the loop runs."""

    def __init__(self, served):
        self.http = httpx.Client(base_url=served.server.url, headers=served.server.headers(), timeout=120)
        self.body = {"model": str(served.model_dir), "prompt": [3, 4, 5], "max_tokens": 8, "temperature": 0}
        self.codes: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.codes.append(self.http.post("/v1/completions", json=self.body).status_code)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=120)


def reward_rises_while_completions_are_served(served, dtype: str):
    band = TokenBandReward(vocab_size(served) * 2 // 5, vocab_size(served) * 3 // 5)
    client = HogwildClient(served.server.url, api_key=API_KEY, admin_key=ADMIN_KEY)
    with Traffic(served) as traffic:
        history = client.run_rl(PROMPTS, band, **LOOP)
    rewards = [h.mean_reward for h in history]
    assert all(h.state == "succeeded" for h in history), [(h.state, h.error) for h in history]
    assert rewards[0] < 0.3, rewards  # a fifth of the vocabulary: about 0.2 untrained
    assert sum(rewards[-3:]) / 3 > 0.4, rewards
    assert len(traffic.codes) >= ITERATIONS and set(traffic.codes) == {200}, traffic.codes
    # Each iteration was sampled by the weights the previous job left: the version rose by its steps.
    versions = [h.weights_version for h in history]
    assert all(v is not None for v in versions), versions
    assert all(later == v + h.steps for v, h, later in zip(versions, history, versions[1:])), (versions, [h.steps for h in history])
    gap = max(h.logprob_gap_max for h in history)
    if dtype == "float32":
        assert gap < 1e-4, gap  # trainer vs engine on the sampled tokens: ~1e-6 here
    else:
        assert gap < 0.2, gap  # bf16: reported, ~3e-2 here


def sampled_now(served) -> tuple[dict, int]:
    """One sampled completion as an RL sample (advantage 1) and the version its answer carried."""
    client = HogwildClient(served.server.url, api_key=API_KEY, admin_key=ADMIN_KEY)
    c = client.complete([PROMPTS[0]], n=1, max_tokens=4, seed=7)[0][0]
    return {"context_ids": c.prompt_ids, "completion_ids": c.completion_ids, "logprobs": c.logprobs, "advantage": 1.0,
            "weights_version": c.weights_version}, c.weights_version


def test_samples_older_than_max_staleness_are_refused(rl_served):
    served = rl_served
    sample, version = sampled_now(served)
    r = served.http.post("/train", json={"mode": "rl", "samples": [sample], "max_staleness": 0, "steps": 2, "lr": 1e-4,
                                         "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    # The same sample is now two versions old.
    digest = served.arena_digest()
    r = served.http.post("/train", json={"mode": "rl", "samples": [sample], "max_staleness": 1, "wait": True})
    check_rejected(served, r, 422, "samples[0]", digest)
    assert "max_staleness=1" in r.text and f"from version {version}" in r.text, r.text
    # Two versions old is within max_staleness 2.
    r = served.http.post("/train", json={"mode": "rl", "samples": [sample], "max_staleness": 2, "lr": 1e-4, "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text


@pytest.mark.parametrize("version, needle", [(None, "needs each sample's weights_version"), (10**9, "ahead of")])
def test_unversioned_or_future_samples_are_refused_under_max_staleness(rl_served, version, needle):
    served = rl_served
    sample, _ = sampled_now(served)
    sample = {k: v for k, v in {**sample, "weights_version": version}.items() if v is not None}
    digest = served.arena_digest()
    check_rejected(served, served.http.post("/train", json={"mode": "rl", "samples": [sample], "max_staleness": 5}),
                   422, needle, digest)


def test_every_completion_route_and_score_carry_the_version(rl_served):
    served = rl_served
    status = served.http.get("/train/status").json()
    body = {"model": str(served.model_dir), "prompt": [3, 4, 5], "max_tokens": 2}
    answers = {"completion": served.http.post("/v1/completions", json=body),
               "stream": served.http.post("/v1/completions", json={**body, "stream": True}),
               "score": served.http.post("/v1/score", json={"prompt": [3, 4, 5], "score_ranges": [[1, 3]]})}
    for name, r in answers.items():
        assert r.status_code == 200, (name, r.text)
        assert r.headers.get(HEADER) == str(status["weights_version"]), (name, dict(r.headers))
    # Plain vLLM routes are left as they are.
    assert HEADER not in served.http.get("/v1/models").headers


def test_the_reward_rises_while_completions_are_served(rl_served):
    reward_rises_while_completions_are_served(rl_served, "float32")


def test_metrics_show_the_last_rl_step(rl_served):
    """After the loop: the last job's last step's diagnostics on /metrics, as its history has them."""
    last = rl_served.http.get("/train/status").json()["recent"][0]  # newest first
    assert last["mode"] == "rl", last
    step = last["result"]["history"][-1]
    scrape = hogwild_metrics(rl_served.server.url, rl_served.server.headers())
    for stat in ("loss", "ratio_mean", "clip_fraction", "truncated_fraction", "kl", "advantage_mean", "logprob_gap_mean",
                 "logprob_gap_max"):
        assert scrape[f'hogwild_rl_last_step{{stat="{stat}"}}'] == pytest.approx(step[stat], rel=1e-6, abs=1e-12), stat


def test_the_reward_heads_give_the_rewards(rl_served):
    """After a BTRM job trains heads on this server, RL's rewards come from them (``reward_heads``):
    each sample's reward is the weighted sum of what ``/v1/score`` gives for its text at its last
    token, on the weights the job started from; the loop runs on them, and a full-weight job is
    told that it moves the trunk the heads read.

    That the heads' score of the loop's completions rises is not asserted: measured on this model
    (DESIGN.md, RL training), the rise under full-weight RL is the trunk moving under the heads
    (the first completions, scored again at the end, score as high as the last ones), and with an
    adapter (the heads on the frozen base) no rise above a no-learning control in 80 iterations."""
    served = rl_served
    corpora = write_corpora(served.state_dir / "btrm-corpora", per_tier=15)
    tok = AutoTokenizer.from_pretrained(served.model_dir)
    config = load_config(corpora)
    labelled = build_labelled_set(config, corpora.parent)
    r = served.http.post("/train", json={"mode": "btrm", "config": config.model_dump(), "wait": True,
                                         "samples": btrm_samples(tok, config, labelled.texts, labelled.labels)})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    client = HogwildClient(served.server.url, api_key=API_KEY, admin_key=ADMIN_KEY)
    weights = {"ocean": 1.0, "fable": -0.5}
    groups = client.complete(PROMPTS[:4], n=4, max_tokens=8, seed=3)
    samples = rl_samples(groups, None, [f"heads:{i}" for i in range(len(groups))])
    expected = []
    for s in samples:
        ids = [*s["context_ids"], *s["completion_ids"]]
        expected.append(client.score(ids, [[0, len(ids)]], heads=list(weights))[0]["heads"])
    job = client.train_rl(samples, wait=True, reward_heads=weights, lr=1e-3)
    assert job["state"] == "succeeded" and job["result"]["steps"] > 0, job
    result = job["result"]
    assert len(result["head_scores"]) == len(result["rewards"]) == len(samples)
    for row, reward, want in zip(result["head_scores"], result["rewards"], expected):
        assert row == {h: pytest.approx(v, abs=1e-4) for h, v in want.items()}
        assert reward == pytest.approx(sum(w * row[h] for h, w in weights.items()))
    assert any("moves the trunk the heads read" in w for w in job["warnings"]), job["warnings"]
    # The loop takes each iteration's rewards from its job.
    history = rl_loop(client, PROMPTS[:4], None, **{**LOOP, "iterations": 2, "lr": 1e-3}, reward_heads=weights)
    assert all(h.state == "succeeded" for h in history), [(h.state, h.error) for h in history]
    for h in history:
        reported = served.http.get(f"/train/{h.job_id}").json()["result"]["rewards"]
        assert h.rewards == reported and h.mean_reward == pytest.approx(sum(reported) / len(reported))


def test_the_reward_rises_in_bf16_as_in_fp32(rl_served_bf16):
    reward_rises_while_completions_are_served(rl_served_bf16, "bfloat16")


def test_the_cli_runs_the_loop_with_a_line_per_iteration(rl_served_bf16, tmp_path):
    served = rl_served_bf16
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS[:4]))
    out = tmp_path / "history.jsonl"
    run = subprocess.run([sys.executable, "-m", "hogwild.cli", "rl", served.server.url, "--prompts", str(prompts),
                          "--reward", "band:0:1000", "--group-size", "4", "--iterations", "3", "--max-tokens", "8",
                          "--lr", "1e-4", "--max-staleness", "4", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("iteration ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], run.stdout
    assert all(" reward " in line and " kl " in line and " gap " in line and line.endswith("succeeded") for line in lines)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["state"] == "succeeded" and 0 <= r["mean_reward"] <= 1 for r in rows)

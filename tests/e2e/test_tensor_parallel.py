"""Tensor parallel 2: each vLLM rank publishes the shard it computes with, one trainer rank
per vLLM rank maps it, and together they train the served model in place as one
tensor-parallel model: what TP 1 trains, to fp32 noise; checkpoints are the unsharded
model; a dead trainer rank fails its job and the ranks restart while inference goes on."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild import tiny_model
from hogwild.client import preference_samples
from hogwild.contracts.manifest import rank_manifest_name, read_manifest
from hogwild.contracts.protocol import TokenLogprobsOp
from hogwild.readout.vectors import load_vector_set
from hogwild.training.circuit_breaker_data import synthetic_samples
from hogwild.worker.views import map_tensors, served_views

from ..conftest import serving, train_readout_vectors
from ..waiting import wait_job, wait_new_trainer
from .test_readout import TOLERANCE, ask, check
from .test_spine import train, vllm_position_logprobs

pytestmark = pytest.mark.server

ARCHS = ["qwen2", "qwen3_moe"]
PROMPT = [5, 17, 300, 42, 7, 8, 9, 1500, 1999, 64, 1024, 1023]  # ids on both ranks' vocabulary rows


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, tiny_model_dir, tmp_path_factory):
    if request.param == "qwen2":
        return tiny_model_dir
    return tiny_model.build(tmp_path_factory.mktemp(request.param) / "tiny", arch=request.param)


@pytest.fixture(scope="module")
def readout_vectors(model_dir, tmp_path_factory):
    return train_readout_vectors(model_dir, tmp_path_factory.mktemp("tp-readout"), [0, 1])


@pytest.fixture(scope="module")
def tp2(model_dir, readout_vectors, tmp_path_factory):
    # Two CPU workers need one core each (this machine has one NUMA node).
    with serving(model_dir, tmp_path_factory.mktemp("tp2"), "tp2", dtype="float32",
                 extra_args=["--tensor-parallel-size", "2"],
                 env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_READOUT_VECTORS": str(readout_vectors)}) as handle:
        handle.arch = read_manifest(handle.session).model_class
        yield handle


@pytest.fixture(scope="module")
def tp1(model_dir, tmp_path_factory):
    with serving(model_dir, tmp_path_factory.mktemp("tp1"), "tp1", dtype="float32") as handle:
        yield handle


def position_logprobs(served, prompt: list[int]) -> list[float]:
    """What vLLM (``/v1/score``) and the trainer (its ranks' forward) give each position."""
    return vllm_position_logprobs(served, prompt), served.trainer_call(TokenLogprobsOp(token_ids=prompt))["logprobs"]


def test_what_the_ranks_compute_with_is_the_model(tp2):
    """Both ranks compute with their published, live shards; together they are the model
    transformers loads from the same files (fp32: float rounding apart)."""
    served = vllm_position_logprobs(tp2, PROMPT)
    model = AutoModelForCausalLM.from_pretrained(tp2.model_dir, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].double(), -1)
    expected = [logprobs[q - 1, PROMPT[q]].item() for q in range(1, len(PROMPT))]
    assert max(abs(a - b) for a, b in zip(served, expected)) < 1e-4, (served, expected)


def test_readout_reads_the_whole_residual_stream(tp2, readout_vectors):
    """Every rank runs the readout tap; rank 0 reports, the residual stream being whole on each
    rank after a layer's all-reduce: per-token concept values as a Hugging Face forward on the
    same weights gives them, for the prompt and each generated token, streamed or not."""
    model = AutoModelForCausalLM.from_pretrained(tp2.model_dir, dtype=torch.float32)
    vector_set = load_vector_set(readout_vectors)
    for stream in (False, True):
        choice, = ask(tp2, "completions", PROMPT, stream, readout_prompt=True)
        assert len(choice["readout"]) == len(choice["ids"]) > 0
        assert check(model, vector_set, choice) < TOLERANCE, stream


def _rank_views(tp2, rank: int) -> tuple[dict, dict]:
    manifest = read_manifest(tp2.session, rank_manifest_name(rank))
    assert (manifest.backend, manifest.tensor_parallel_rank, manifest.tensor_parallel_size) == ("cpu_shm", rank, 2)
    assert manifest.not_views == {} and manifest.unsupported is None
    return served_views(map_tensors(manifest), manifest.checkpoint_views), {v.name: v.shard for v in manifest.checkpoint_views}


def test_each_rank_publishes_its_shard_of_every_checkpoint_tensor(tp2):
    ranks = [_rank_views(tp2, rank) for rank in (0, 1)]
    with safe_open(str(tp2.model_dir / "model.safetensors"), "pt") as f:
        checkpoint = {name: f.get_tensor(name) for name in f.keys()}
    kinds = set()
    for name, full in checkpoint.items():
        parts = []
        for views, shards in ranks:
            if name not in views:  # a tied head: vLLM computes it from the embedding
                continue
            expected = full
            for dim, start, length in shards[name]:
                expected = expected.narrow(dim, start, length)
            assert torch.equal(views[name], expected), name
            parts.append(shards[name])
        assert parts, f"{name} is on no rank"
        if all(p == [] for p in parts):
            kinds.add("replicated")
            continue
        # The ranks' parts split it along one dim, with no gap or overlap.
        assert len(parts) == 2 and {len(p) for p in parts} == {1} and parts[0][0][0] == parts[1][0][0], (name, parts)
        dim = parts[0][0][0]
        (_, start0, n0), (_, start1, n1) = parts[0][0], parts[1][0]
        assert start0 == 0 and start1 == n0 and n0 + n1 == full.shape[dim], (name, parts)
        kinds.add({0: "column or vocab", 1: "row"}[dim])
    assert kinds == {"replicated", "column or vocab", "row"}


def test_vllm_computes_with_the_published_shard(tp2):
    views, shards = _rank_views(tp2, 1)
    (_, start, _), = shards["model.embed_tokens.weight"]
    token = start + 1  # a row rank 1 owns (vocab-parallel)
    prompt = [5, 6, 7, token, 100]  # the last token read after it: its embedding matters, tied or not
    score = {"prompt": prompt, "score_ranges": [[4, 5]]}
    before = tp2.http.post("/v1/score", json=score).json()["scores"][0]["total_logprob"]
    row = views["model.embed_tokens.weight"][1].clone()
    try:
        views["model.embed_tokens.weight"][1].mul_(4.0)  # the token's embedding and output row, in rank 1's arena
        after = tp2.http.post("/v1/score", json=score).json()["scores"][0]["total_logprob"]
    finally:
        views["model.embed_tokens.weight"][1].copy_(row)
    assert abs(after - before) > 1e-3, (before, after)
    assert tp2.http.post("/v1/score", json=score).json()["scores"][0]["total_logprob"] == pytest.approx(before, abs=1e-6)


def test_a_fused_tensor_is_each_ranks_part_of_each_block(tp2):
    """transformers' fused experts (gate_up_proj [E, 2I, H]): each rank holds its part of the
    gate half and of the up half, stacked as in vLLM's w13 shard: one view per rank. The
    dense model has no fused tensor."""
    for rank in (0, 1):
        views = read_manifest(tp2.session, rank_manifest_name(rank)).views
        blocked = {v.name: v for v in views if any(len(box) == 4 for box in v.shard)}
        if tp2.arch != "Qwen3MoeForCausalLM":
            assert blocked == {}
            continue
        assert sorted(blocked) == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)], sorted(blocked)
        for fused in blocked.values():
            half = fused.shape[1] // 2  # this rank's part of each of the two blocks, stacked
            assert fused.shard == [[1, rank * half, half, 2]], fused


def test_training_on_tp2_follows_training_on_tp1(tp2, tp1):
    """The same model, samples and options on TP 1 and TP 2: the same loss at every one of 20
    steps (fp32 noise), and vLLM then serves the same model on both. APOLLO's random projection
    of a split weight is the whole weight's, sliced (``training.apollo.project_part``)."""
    samples = [{"context_ids": [100 + i, 101, 102], "continuation_ids": [5 + i, 6, 7, 8, 9 + 2 * i, 10, 11, 12]}
               for i in range(8)]
    options = dict(lr=1e-3, steps=20, batch_size=4, seed=1)
    curves = [[h["loss"] for h in train(served, samples, **options)["result"]["history"]] for served in (tp1, tp2)]
    assert len(curves[0]) == len(curves[1]) == 20
    assert curves[0][-1] < curves[0][0] - 1.0, curves  # it learns
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-4, curves
    after = [vllm_position_logprobs(served, PROMPT) for served in (tp1, tp2)]
    assert max(abs(a - b) for a, b in zip(*after)) < 1e-4, after


def test_one_trainer_rank_per_vllm_rank_on_views_of_its_shard(tp2):
    status = tp2.http.get("/train/status").json()
    assert status["state"] == "ready" and status["parity"]["max_abs_diff"] < 1e-4, status["parity"]
    ranks = status["tensor_parallel"]["ranks"]
    assert status["tensor_parallel"]["size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["pid"] == status["pid"] != ranks[1]["pid"]
    for rank in ranks:  # every weight a view of the rank's shard: no gathered copy
        assert rank["shared_param_bytes"] == rank["param_bytes"] > 0, rank
        assert rank["binding_private_bytes"] < 0.1 * rank["param_bytes"], rank
    whole = (tp2.model_dir / "model.safetensors").stat().st_size
    assert all(r["param_bytes"] < 0.75 * whole for r in ranks), (ranks, whole)  # each a part of the model


def test_sft_reaches_a_target_and_vllm_serves_what_the_trainer_computes(tp2):
    context, target = [100, 101, 102], [5, 6, 7, 8, 9, 10, 11, 12]
    vllm, trainer = position_logprobs(tp2, PROMPT)
    assert max(abs(a - b) for a, b in zip(vllm, trainer)) < 1e-4
    job = train(tp2, [{"context_ids": context, "continuation_ids": target}] * 4, lr=1e-2, steps=12)
    result = job["result"]
    assert result["loss_after"] < 0.3 * result["loss_before"], result
    assert tp2.complete(context, len(target)) == target
    vllm, trainer = position_logprobs(tp2, PROMPT + context + target)
    assert max(abs(a - b) for a, b in zip(vllm, trainer)) < 1e-4


def test_preference_widens_the_served_margin(tp2):
    tok = AutoTokenizer.from_pretrained(tp2.model_dir)
    samples = preference_samples(tok, [("The fox came to the door and", " asked for bread.", " ran into the forest."),
                                       ("The old lantern", " glowed all night long.", " broke on the floor.")])

    def margin(s):
        scores = [tp2.http.post("/v1/score", json={"prompt": s["context_ids"] + reply, "score_ranges": [
            [len(s["context_ids"]), len(s["context_ids"]) + len(reply)]]}).json()["scores"][0]["total_logprob"]
            for reply in (s["chosen_ids"], s["rejected_ids"])]
        return scores[0] - scores[1]

    before = [margin(s) for s in samples]
    r = tp2.http.post("/train", json={"mode": "preference", "samples": samples, "objective": "dpo", "beta": 0.1,
                                      "lr": 1e-3, "steps": 15, "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    after = [margin(s) for s in samples]
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)


def test_rl_raises_the_rewarded_completion_and_the_ranks_match_the_engine(tp2):
    """RL on both ranks: the trainer's log-probs of the completions' tokens equal the engine's
    before the first step (fp32), and the completion with the positive advantage becomes likelier.
    It is one the model finds unlikely, whatever earlier tests trained: room to rise."""
    context, chosen = [5, 6, 7, 8, 9, 10], [300, 301, 302, 303]

    def engine_logprobs(completion):
        n = len(context)
        r = tp2.http.post("/v1/score", json={"prompt": context + completion,
                                             "score_ranges": [[p, p + 1] for p in range(n, n + len(completion))]})
        assert r.status_code == 200, r.text
        return [s["total_logprob"] for s in r.json()["scores"]]

    r = tp2.http.post("/v1/completions", json={"model": str(tp2.model_dir), "prompt": context, "max_tokens": 6, "n": 3,
                                               "temperature": 1.0, "logprobs": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    drawn = [(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in r.json()["choices"] if c["token_ids"]]
    samples = [{"context_ids": context, "completion_ids": ids, "logprobs": lps, "reward": 1.0 if i == 0 else 0.0,
                "group": "p"} for i, (ids, lps) in enumerate([(chosen, engine_logprobs(chosen)), *drawn])]
    before = sum(engine_logprobs(chosen))
    r = tp2.http.post("/train", json={"mode": "rl", "samples": samples, "objective": "grpo", "lr": 1e-3, "steps": 5,
                                      "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    result = r.json()["result"]
    assert result["before"]["logprob_gap_max"] < 1e-4, result["before"]
    assert sum(engine_logprobs(chosen)) > before + 0.5, (before, sum(engine_logprobs(chosen)))


def test_modes_not_yet_parallel_are_refused_with_the_reason(tp2):
    tok = AutoTokenizer.from_pretrained(tp2.model_dir)
    digest = [tp2.arena_digest(rank) for rank in (0, 1)]
    samples = [s.model_dump(exclude_none=True) for s in synthetic_samples(tok, 4, 8)]
    r = tp2.http.post("/train", json={"mode": "circuit_breaker", "wait": True, "config": {"steps": 2}, "samples": samples})
    assert r.status_code == 501, r.text
    assert "circuit_breaker training with tensor parallel size 2 is not supported yet" in r.json()["error"]["message"]
    rl = {"context_ids": [5, 6, 7], "completion_ids": [8, 9], "logprobs": [-1.0, -2.0], "group": "g"}
    r = tp2.http.post("/train", json={"mode": "rl", "wait": True, "samples": [rl], "reward_heads": {"ocean": 1.0}})
    assert r.status_code == 501, r.text
    assert "reward_heads with tensor parallel size 2 is not supported yet" in r.json()["error"]["message"]
    assert [tp2.arena_digest(rank) for rank in (0, 1)] == digest


def test_checkpoint_writes_the_unsharded_model(tp2):
    train(tp2, [{"context_ids": [7, 8], "continuation_ids": [9, 10, 11]}], lr=1e-2, steps=3)
    target = tp2.state_dir / "checkpoint"
    r = tp2.http.post("/checkpoint", json={"target": str(target)})
    assert r.status_code == 200 and r.json()["optimizer_saved"], r.text
    state = {p.name for p in (target / ".hogwild").iterdir()}
    assert {f"optimizer.tp2.rank{r}.{ext}" for r in (0, 1) for ext in ("safetensors", "json")} <= state, state
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)  # one ordinary, whole checkpoint
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].double(), -1)
    expected = [logprobs[q - 1, PROMPT[q]].item() for q in range(1, len(PROMPT))]
    assert max(abs(a - b) for a, b in zip(vllm_position_logprobs(tp2, PROMPT), expected)) < 1e-4


def test_a_dead_trainer_rank_fails_its_job_and_the_ranks_restart(tp2):
    follower = tp2.http.get("/train/status").json()["tensor_parallel"]["ranks"][1]["pid"]
    samples = [{"context_ids": [100, 101, 102], "continuation_ids": [5, 6, 7, 8] * 30}] * 8
    r = tp2.http.post("/train", json={"samples": samples, "lr": 1e-5, "steps": 2000, "micro_batch_size": 1})
    assert r.status_code == 200, r.text
    job = r.json()
    wait_job(tp2, job["job_id"], ("running",), 60)
    os.kill(follower, signal.SIGKILL)
    info = wait_job(tp2, job["job_id"], ("succeeded", "failed", "cancelled"), 60)
    assert info["state"] == "failed" and "tensor-parallel trainer rank 1 was killed by SIGKILL" in info["error"], info
    assert len(tp2.complete([5, 6, 7], 4)) == 4  # inference never waits for the trainer
    status = wait_new_trainer(tp2, job["trainer_id"])  # a new trainer, with new ranks
    assert status["state"] == "ready" and status["tensor_parallel"]["ranks"][1]["pid"] != follower, status
    assert train(tp2, samples[:1], lr=1e-5, steps=1)["result"]["steps"] == 1

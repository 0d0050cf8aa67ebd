"""Tensor parallel 2: inference works, each rank publishes the shard it computes with and
where every checkpoint tensor's part lies in it, and the training routes say why they are off."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from hogwild import tiny_model
from hogwild.contracts.manifest import rank_manifest_name, read_manifest
from hogwild.worker.views import map_tensors, served_views

from ..conftest import serving

pytestmark = pytest.mark.server


# transformers' fused experts (gate_up_proj [E, 2I, H]): each rank holds a part of the gate
# half and a part of the up half, which is not one box of the tensor.
FUSED_IN_TRANSFORMERS = {"qwen2": set(), "qwen3_moe": {"mlp.experts.gate_up_proj"}}


@pytest.fixture(scope="module", params=list(FUSED_IN_TRANSFORMERS))
def tp2(request, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"tp2-{request.param}")
    model_dir = tiny_model_dir if request.param == "qwen2" else tiny_model.build(tmp / "tiny", arch=request.param)
    # Two CPU workers need one core each (this machine has one NUMA node).
    with serving(model_dir, tmp, "tp2", dtype="float32", wait_trainer=False,
                 extra_args=["--tensor-parallel-size", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as handle:
        handle.arch = request.param
        yield handle


def test_training_routes_explain_that_tensor_parallel_is_not_supported(tp2):
    status = tp2.http.get("/train/status").json()
    assert status["state"] == "unsupported" and "tensor parallel size 2" in status["reason"]
    r = tp2.http.post("/train", json={"samples": [{"context_ids": [5, 6], "continuation_ids": [7]}], "wait": True})
    assert r.status_code == 501
    assert "training with tensor parallel size 2 is not supported yet (inference works)" in r.json()["error"]["message"]
    # Inference and scoring are untouched.
    assert len(tp2.complete([5, 6, 7], 4)) == 4
    assert tp2.http.post("/v1/score", json={"prompt": [5, 6, 7], "score_ranges": [[0, 3]]}).json()["scores"][0]["n_tokens"] == 2


def test_what_the_ranks_compute_with_is_the_model(tp2):
    """Both ranks compute with their published, live shards; together they are the model
    transformers loads from the same files (fp32: float rounding apart)."""
    from transformers import AutoModelForCausalLM

    prompt = [5, 17, 300, 42, 7, 8, 9, 1500, 1999, 64]
    ranges = [[q, q + 1] for q in range(1, len(prompt))]
    served = [s["total_logprob"] for s in
              tp2.http.post("/v1/score", json={"prompt": prompt, "score_ranges": ranges}).json()["scores"]]
    model = AutoModelForCausalLM.from_pretrained(tp2.model_dir, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1)
    expected = [logprobs[q - 1, prompt[q]].item() for q in range(1, len(prompt))]
    assert max(abs(a - b) for a, b in zip(served, expected)) < 1e-4, (served, expected)


def _rank_views(tp2, rank: int) -> tuple[dict, dict]:
    manifest = read_manifest(tp2.session, rank_manifest_name(rank))
    assert (manifest.backend, manifest.tensor_parallel_rank, manifest.tensor_parallel_size) == ("cpu_shm", rank, 2)
    assert {n.split(".", 3)[-1] for n in manifest.not_views} == FUSED_IN_TRANSFORMERS[tp2.arch], manifest.not_views
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

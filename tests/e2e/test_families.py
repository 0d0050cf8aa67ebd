"""Every decoder family on real `vllm serve`, one server after another: the trainer's
views map right (parity with vLLM before and after a step), training reaches a target,
a checkpoint loads in transformers and scores as vLLM serves; circuit breakers merge and
revert bit for bit on a MoE and a hybrid family; readout matches HF on a hybrid family;
and the parity gate refuses a deliberately wrong mapping without touching the weights."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild import tiny_model
from hogwild.contracts.manifest import read_manifest, write_manifest
from hogwild.contracts.protocol import TokenLogprobsOp
from hogwild.training.circuit_breaker_data import synthetic_samples
from hogwild.worker.parity import compare

from ..conftest import ADMIN_KEY, LIMITS, serving, train_readout_vectors
from ..waiting import wait_idle, wait_new_trainer
from .test_readout import ask, check, current_set

pytestmark = pytest.mark.server

READOUT_FAMILY = "qwen3_5"  # a hybrid (Gated DeltaNet + attention) family
# |trainer or transformers - vLLM| per log-probability: 1e-4 in fp32. vLLM's CPU kernels for
# Gated DeltaNet run in bf16 only, so the hybrid families are served (and compared) in bf16,
# within the parity gate's bf16 tolerance (0.05 + 0.02 |log p|).
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05}


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def agree(served: list[float], other: list[float], dtype: str) -> bool:
    if dtype == "float32":
        return _gap(served, other) < TOLERANCE[dtype]
    return compare(other, served, dtype).passed


@pytest.fixture(scope="module", params=list(tiny_model.FAMILIES))
def family(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"family-{arch}")
    model_dir = tiny_model.build(tmp / f"tiny-{arch}", arch=arch)
    dtype = tiny_model.FAMILIES[arch].serve_dtype or "float32"
    env = {"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS}
    if arch == READOUT_FAMILY:
        env["VLLM_READOUT_VECTORS"] = str(train_readout_vectors(model_dir, tmp / "readout", [0, 1]))
    with serving(model_dir, tmp, arch, dtype=dtype, env=env, extra_args=list(tiny_model.FAMILIES[arch].serve_args)) as handle:
        handle.arch, handle.dtype = arch, dtype
        handle.tok = AutoTokenizer.from_pretrained(handle.model_dir)
        yield handle


def vllm_logprobs(handle, prompt: list[int]) -> list[float]:
    r = handle.http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[p, p + 1] for p in range(1, len(prompt))]})
    assert r.status_code == 200, r.text
    return [s["total_logprob"] for s in r.json()["scores"]]


def trainer_logprobs(handle, prompt: list[int]) -> list[float]:
    return handle.trainer_call(TokenLogprobsOp(token_ids=prompt))["logprobs"]


def train(handle, ctx: list[int], target: list[int], **options) -> dict:
    r = handle.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": target}], "wait": True, **options})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded", job
    return job


def test_every_parameter_is_a_view_and_the_parity_gate_passed(family):
    status = family.http.get("/train/status").json()
    assert status["state"] == "ready", status.get("reason")
    spec = tiny_model.FAMILIES[family.arch]
    assert status["model_class"] == (spec.trains or spec.model) and status["frozen"] == {}
    assert (status["vision_tower"] is not None) == (spec.vision is not None)  # a VL model trains its language model only
    assert status["parity"]["state"] == "passed" and status["parity"]["max_abs_diff"] < TOLERANCE[family.dtype]
    memory = status["memory"]
    assert memory["shared_param_bytes"] == memory["param_bytes"] > 0
    assert memory["binding_private_bytes"] < 0.1 * memory["param_bytes"], memory


def test_trainer_and_vllm_agree_before_and_after_a_step(family):
    prompt = family.tok.encode("Parity between the trainer and vLLM, position by position, in every family.")
    before = vllm_logprobs(family, prompt)
    assert agree(before, trainer_logprobs(family, prompt), family.dtype)
    train(family, prompt[:5], prompt[5:], lr=1e-3, steps=1)
    after = vllm_logprobs(family, prompt)
    assert _gap(after, before) > 1e-3, "the step changed nothing vLLM computes"
    assert agree(after, trainer_logprobs(family, prompt), family.dtype)


def test_training_reaches_a_target(family):
    ctx, target = family.tok.encode("Once upon a time the server"), family.tok.encode(" learned a new sentence today.")
    for _ in range(6):
        job = train(family, ctx, target, lr=1e-2, steps=40)
        if job["result"]["loss_after"] < 0.1 and family.complete(ctx, len(target)) == target:
            break
    assert family.complete(ctx, len(target)) == target, job["result"]
    assert job["result"]["loss_after"] < 0.1


def test_a_checkpoint_loads_in_transformers_and_scores_as_vllm_serves(family):
    train(family, [5, 6, 7], [8, 9], lr=1e-3, steps=1)  # something to write, whatever ran before
    r = family.http.post("/checkpoint", json={})
    assert r.status_code == 200, r.text
    assert r.json()["blocks_written"] > 0
    prompt = family.tok.encode("The checkpoint is the served directory, and transformers reads it as it is.")
    # eager attention: transformers' SDPA path skips Gemma 2's soft-capping
    reference = AutoModelForCausalLM.from_pretrained(family.model_dir, dtype=getattr(torch, family.dtype),
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), -1)
    expected = [float(logprobs[p - 1, prompt[p]]) for p in range(1, len(prompt))]
    assert agree(vllm_logprobs(family, prompt), expected, family.dtype)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"], indirect=True)
def test_circuit_breaker_merges_and_reverts_bit_for_bit(family):
    wait_idle(family)
    digest = family.arena_digest()
    samples = synthetic_samples(family.tok, 16, 16)
    r = family.http.post("/train", json={"mode": "circuit_breaker", "wait": True, "config": {"lr": 5e-4, "steps": 40},
                                         "samples": [s.model_dump(exclude_none=True) for s in samples]})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded" and job["result"]["merged"], job.get("error")
    assert family.arena_digest() != digest
    r = family.http.post("/train/revert", json={"wait": True})
    assert r.status_code == 200 and r.json()["result"]["exact"] is True, r.text
    assert family.arena_digest() == digest


@pytest.mark.parametrize("family", [READOUT_FAMILY], indirect=True)
def test_readout_matches_hf_on_a_hybrid_family(family):
    wait_idle(family)
    _, vector_set = current_set(family)
    from .test_spine import hf_model_with_served_weights

    model = hf_model_with_served_weights(family)
    for stream in (False, True):
        for choice in ask(family, "completions", family.tok.encode("The fox came back every winter night"), stream,
                          readout_prompt=True):
            # bf16 in vLLM against fp32 here: a readout is a dot product of a residual stream of norm ~8
            assert check(model, vector_set, choice) < 0.25


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_the_parity_gate_refuses_a_wrong_mapping_and_changes_nothing(family):
    wait_idle(family)
    manifest = read_manifest(family.session)
    views = {v.name: v for v in manifest.views}
    gate, up = views["model.layers.0.mlp.gate_proj.weight"], views["model.layers.0.mlp.up_proj.weight"]
    assert gate.shape == up.shape and gate.tensor == up.tensor
    gate.offset, up.offset = up.offset, gate.offset  # two slices of vLLM's gate_up_proj, swapped
    write_manifest(manifest, family.session)
    digest = family.arena_digest()

    def restart_trainer() -> dict:
        old = family.http.get("/train/status").json()
        os.kill(old["pid"], signal.SIGKILL)
        return wait_new_trainer(family, old["trainer_id"])

    try:
        status = restart_trainer()
        assert status["state"] == "unsupported" and status["parity"]["state"] == "failed", status
        assert "the trainer's forward does not match vLLM's" in status["reason"]
        assert f"differ by up to {status['parity']['max_abs_diff']:.3g}" in status["reason"]
        assert "model.layers.0.mlp.gate_proj.weight" in status["reason"]  # where the mapping went wrong
        assert status["parity"]["positions_beyond"] > 0.5 * len(status["parity"]["probe_ids"])  # off nearly everywhere
        r = family.http.post("/train", json={"samples": [{"context_ids": [5, 6], "continuation_ids": [7]}], "wait": True})
        assert r.status_code == 501 and "does not match vLLM's" in r.json()["error"]["message"]
        assert family.arena_digest() == digest
    finally:
        gate.offset, up.offset = up.offset, gate.offset
        write_manifest(manifest, family.session)
        assert restart_trainer()["state"] == "ready"


@pytest.mark.parametrize("family", ["qwen3_5_vl"], indirect=True)
def test_images_to_a_vision_language_model_served_language_only_are_refused(family):
    from .test_bad_input import check_rejected
    from .test_operability import _image_uri

    placeholder = family.tok.convert_tokens_to_ids("<|image_pad|>")
    body = {"prompt": [5, placeholder, 7, 8], "score_ranges": [[0, 4]], "multi_modal_data": {"image": _image_uri()}}
    check_rejected(family, family.http.post("/v1/score", json=body), 422,
                   "served with --language-model-only", family.arena_digest())

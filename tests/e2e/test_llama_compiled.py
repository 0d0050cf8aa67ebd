"""The second supported family (Llama), in vLLM's default compiled mode, with two
API server processes sharing one trainer."""

from __future__ import annotations

import shutil

import httpx
import psutil
import pytest
from transformers import AutoTokenizer

from hogwild.worker.protocol import TokenLogprobsOp

from ..conftest import start_served
from .test_spine import train, vllm_position_logprobs

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, tmp_path_factory):
    server, handle = start_served(tiny_llama_dir, tmp_path_factory.mktemp("llama"), "llama", dtype="float32",
                                  eager=False, extra_args=["--api-server-count", "2"])
    yield handle
    server.stop()
    shutil.rmtree(handle.session, ignore_errors=True)


def test_two_api_servers_share_one_trainer(llama):
    trainers = [p for p in psutil.process_iter(["cmdline"])
                if "hogwild.worker" in (p.info["cmdline"] or []) and str(llama.session) in (p.info["cmdline"] or [])]
    assert len(trainers) == 1
    # A new connection each time, so the kernel spreads them over both processes.
    answers = [httpx.get(llama.server.url + "/train/status", headers=llama.server.headers()).json() for _ in range(40)]
    assert {a["trainer_id"] for a in answers} == {answers[0]["trainer_id"]}
    # Both API server processes answered; exactly one of them owns the trainer.
    assert {a["server"]["owns_trainer"] for a in answers} == {True, False}


def test_llama_trains_in_place_under_compilation(llama):
    tok = AutoTokenizer.from_pretrained(llama.model_dir)
    prompt = tok.encode("Llama models learn in place too, compiled or not.")
    trainer = llama.trainer_call(TokenLogprobsOp(token_ids=prompt))["logprobs"]
    assert max(abs(a - b) for a, b in zip(vllm_position_logprobs(llama, prompt), trainer)) < 1e-4

    ctx, target = tok.encode("The compiled graph"), tok.encode(" reads the live weights.")
    assert llama.complete(ctx, len(target)) != target
    job = train(llama, [{"context_ids": ctx, "continuation_ids": target}], lr=1e-2, steps=80)
    assert job["result"]["loss_after"] < 0.05, job
    assert llama.complete(ctx, len(target)) == target
    trainer = llama.trainer_call(TokenLogprobsOp(token_ids=prompt))["logprobs"]
    assert max(abs(a - b) for a, b in zip(vllm_position_logprobs(llama, prompt), trainer)) < 1e-4

"""Tensor parallel > 1: inference works, the training routes say why they are off."""

from __future__ import annotations

import shutil

import pytest

from ..conftest import start_served

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tp2(tiny_model_dir, tmp_path_factory):
    # Two CPU workers need one core each (this machine has one NUMA node).
    server, handle = start_served(tiny_model_dir, tmp_path_factory.mktemp("tp2"), "tp2", dtype="float32", wait_trainer=False,
                                  extra_args=["--tensor-parallel-size", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    yield handle
    server.stop()
    shutil.rmtree(handle.session, ignore_errors=True)


def test_training_routes_explain_that_tensor_parallel_is_not_supported(tp2):
    status = tp2.http.get("/train/status").json()
    assert status["state"] == "unsupported" and "tensor parallel size 2" in status["reason"]
    r = tp2.http.post("/train", json={"samples": [{"context_ids": [5, 6], "continuation_ids": [7]}], "wait": True})
    assert r.status_code == 501
    assert "tensor parallel size 2 and pipeline parallel size 1 is not supported yet (inference works)" in r.json()["error"]["message"]
    # Inference and scoring are untouched.
    assert len(tp2.complete([5, 6, 7], 4)) == 4
    assert tp2.http.post("/v1/score", json={"prompt": [5, 6, 7], "score_ranges": [[0, 3]]}).json()["scores"][0]["n_tokens"] == 2

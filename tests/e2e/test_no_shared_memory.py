"""Too little shared memory for the weights: inference works, training explains why."""

from __future__ import annotations

import subprocess

import pytest

from ..conftest import start_served

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def small_shm(tiny_model_dir, tmp_path_factory):
    shm = tmp_path_factory.mktemp("small-shm")
    # 1 MiB of tmpfs: room for the socket and manifest, not for the 1.5 MiB of weights
    # (what Docker's default 64 MiB /dev/shm is to a 7B model).
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(shm)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        server, handle = start_served(tiny_model_dir, tmp_path_factory.mktemp("shm"), "small-shm", dtype="float32",
                                      env={"HOGWILD_SESSION_DIR": str(shm / "session")})
        yield handle
        server.stop()
    finally:
        subprocess.run(["umount", str(shm)], check=False)


def test_too_little_shared_memory_disables_training_with_the_reason(small_shm):
    status = small_shm.http.get("/train/status").json()
    assert status["state"] == "unsupported"
    assert "of shared memory" in status["reason"] and "--shm-size" in status["reason"]
    r = small_shm.http.post("/train", json={"samples": [{"context_ids": [5], "continuation_ids": [6]}], "wait": True})
    assert r.status_code == 501 and "--shm-size" in r.json()["error"]["message"]
    assert len(small_shm.complete([5, 6, 7], 4)) == 4


def test_readout_is_off_without_vectors(small_shm):
    r = small_shm.http.get("/v1/readout/manifest")
    assert r.status_code == 404 and "VLLM_READOUT_VECTORS" in r.json()["error"]["message"]
    answer = small_shm.http.post("/v1/completions", json={"model": str(small_shm.model_dir), "prompt": [5, 6, 7],
                                                          "max_tokens": 3, "stream": False}).json()
    assert "readout" not in answer["choices"][0]
    assert small_shm.http.post("/readout/load", json={"vectors": "/nowhere/readout.safetensors"}).status_code == 404

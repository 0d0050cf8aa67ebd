"""Checkpoints on real `vllm serve`: sync, restart from the directory, resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..conftest import ADMIN_KEY, start_served
from ..waiting import wait_until

pytestmark = pytest.mark.server

ENV = {"HOGWILD_ADMIN_KEY": ADMIN_KEY, "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0.05"}  # scheduled sync 3 s after a job


@pytest.fixture(scope="module")
def model_copy(tiny_model_dir, tmp_path_factory):
    """A model directory of its own: checkpoints write into it."""
    target = tmp_path_factory.mktemp("ckpt") / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


@pytest.fixture(scope="module")
def first(model_copy, tmp_path_factory):
    server, handle = start_served(model_copy, tmp_path_factory.mktemp("first"), "first", dtype="float32", env=ENV,
                                  copy_model=False)
    yield handle
    server.stop()
    shutil.rmtree(handle.session, ignore_errors=True)


PROMPT = "The checkpoint keeps"
TARGET = " what the server learned."


def test_checkpoint_writes_the_changed_blocks_and_the_optimizer(first, model_copy):
    tok = AutoTokenizer.from_pretrained(model_copy)
    ctx, target = tok.encode(PROMPT), tok.encode(TARGET)
    r = first.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": target, "id": "ckpt-1"}],
                                        "lr": 1e-2, "steps": 80, "wait": True})
    assert r.status_code == 200 and r.json()["result"]["loss_after"] < 0.05
    assert first.complete(ctx, len(target)) == target
    before = (model_copy / "model.safetensors").read_bytes()
    r = first.http.post("/checkpoint", json={})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["files_touched"] == ["model.safetensors"] and report["blocks_written"] > 0
    assert 0 < report["bytes_written"] and report["blocks_written"] <= report["blocks_compared"]
    assert report["optimizer_saved"] and report["optimizer_step"] == 80 and report["ledger_ids"] == 1
    assert (model_copy / "model.safetensors").read_bytes() != before
    # A second sync right away has nothing to write.
    again = first.http.post("/v1/checkpoint").json()
    assert again["blocks_written"] == again["bytes_written"] == 0 and again["state_bytes_written"] > 0
    # The directory is an ordinary HF checkpoint of the trained model.
    model = AutoModelForCausalLM.from_pretrained(model_copy, dtype=torch.float32)
    out = model.generate(torch.tensor([ctx]), max_new_tokens=len(target), do_sample=False)
    assert out[0, len(ctx):].tolist() == target


def test_a_sync_is_scheduled_after_training_stops(first, model_copy):
    r = first.http.post("/train", json={"samples": [{"context_ids": [5, 6, 7], "continuation_ids": [8, 9]}], "lr": 1e-3,
                                        "steps": 3, "wait": True})
    assert r.status_code == 200
    step = r.json()["result"]["optimizer_step"]
    assert first.http.get("/train/status").json()["checkpoint"]["after_minutes"] == 0.05
    # Due 3 s after the job (on a slow machine it may have run already): no call but the wait.
    def synced():
        last = first.http.get("/train/status").json()["checkpoint"]["last"]
        return last if last and last["optimizer_step"] == step else None

    last = wait_until(synced, 60, "the scheduled sync", interval=0.5)
    assert last["blocks_written"] > 0


def test_checkpoint_targets_stay_inside_the_allowed_roots(first, model_copy):
    for bad in ("/etc/hogwild", "../../../../tmp/elsewhere", str(model_copy / ".." / "sibling")):
        r = first.http.post("/checkpoint", json={"target": bad})
        assert r.status_code == 403, (bad, r.text)
        assert "outside the directories requests may name" in r.json()["error"]["message"]
    # Inside the state directory: a fresh copy of the model, then the sync.
    target = first.state_dir / "snapshots" / "one"
    r = first.http.post("/checkpoint", json={"target": str(target)})
    assert r.status_code == 200, r.text
    assert (target / "config.json").exists() and (target / ".hogwild" / "optimizer.json").exists()
    reference = AutoModelForCausalLM.from_pretrained(model_copy, dtype=torch.float32).state_dict()
    copy = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).state_dict()
    assert all(torch.equal(reference[k], copy[k]) for k in reference)


def test_reward_heads_are_saved_with_the_checkpoint(first, model_copy, tmp_path_factory):
    from hogwild.client import btrm_samples
    from hogwild.contracts.btrm_config import load_config
    from hogwild.training.btrm_corpora import write_corpora
    from hogwild.training.btrm_data import build_labelled_set

    corpora = write_corpora(tmp_path_factory.mktemp("heads"), per_tier=5)
    config = load_config(corpora).model_copy(update={"epochs": 20})
    labelled = build_labelled_set(config, corpora.parent)
    samples = btrm_samples(AutoTokenizer.from_pretrained(model_copy), config, labelled.texts, labelled.labels)
    r = first.http.post("/train", json={"mode": "btrm", "config": config.model_dump(), "samples": samples, "wait": True})
    assert r.json()["state"] == "succeeded"
    report = first.http.post("/checkpoint").json()
    assert report["heads_saved"] == labelled.head_names
    assert (model_copy / ".hogwild" / "heads.safetensors").exists()


def test_a_restarted_server_serves_the_checkpoint_and_resumes_the_optimizer(first, model_copy, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(model_copy)
    ctx, target = tok.encode(PROMPT), tok.encode(TARGET)
    first.http.post("/checkpoint")
    first.server.stop()
    # Leave a sync as if it had been killed after sealing its journal: the next
    # start-up must finish it before vLLM reads the file.
    from hogwild.worker import checkpoint

    stored = checkpoint.read_layout(model_copy)["lm_head.weight"]
    last_row = stored.end - 64 * 4  # the last vocabulary row: no test prompt depends on it
    checkpoint._write_journal(model_copy / "model.safetensors", [(last_row, b"\x00" * 256)])
    server, second = start_served(model_copy, tmp_path_factory.mktemp("second"), "second", dtype="float32", env=ENV,
                                  copy_model=False)
    try:
        assert not checkpoint._journal_path(model_copy / "model.safetensors").exists()
        assert (model_copy / "model.safetensors").read_bytes()[last_row : last_row + 256] == b"\x00" * 256
        assert "replayed the journal of model.safetensors" in second.server.log_path.read_text()
        assert second.complete(ctx, len(target)) == target  # the trained behaviour came back from disk
        restored = second.http.get("/train/status").json()["checkpoint"]["restored"]
        assert restored["optimizer_step"] == 83 and restored["ledger_ids"] == 1
        assert restored["heads"] == ["ocean", "forest", "machines", "kitchen", "fable", "ocean_prose"]
        scored = second.http.post("/v1/score", json={"prompt": ctx + target, "score_ranges": [[0, len(ctx) + len(target)]],
                                                      "heads": ["fable"]}).json()
        assert list(scored["scores"][0]["heads"]) == ["fable"]
        # The sample trained before the checkpoint is not trained again...
        r = second.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": target, "id": "ckpt-1"}],
                                             "wait": True})
        assert r.json()["skipped_ids"] == ["ckpt-1"]
        # ...and the optimizer carries on counting.
        r = second.http.post("/train", json={"samples": [{"context_ids": [5, 6], "continuation_ids": [7]}], "lr": 1e-3,
                                             "steps": 2, "wait": True})
        assert r.json()["result"]["optimizer_step"] == 85 and not r.json()["result"]["optimizer_reset"]
    finally:
        server.stop()
        shutil.rmtree(second.session, ignore_errors=True)

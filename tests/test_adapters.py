"""The trainer's book of merged adapters: persisted, reverted last-in first-out."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild.contracts.protocol import OpError
from hogwild.training.lora import attached_lora, lora_factors, merge_in_place, revert_in_place
from hogwild.worker.adapters import Adapter, AdapterBook


def _random_factors(model, seed: int):
    torch.manual_seed(seed)
    with attached_lora(model, layers=[0]) as peft_model:
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.2)
        return lora_factors(peft_model)


def test_a_restarted_trainer_reverts_what_its_predecessor_merged(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    book = AdapterBook(tmp_path / "adapters")
    for i, job in enumerate(("job-a", "job-b")):
        record = merge_in_place(model, _random_factors(model, i))
        book.add(Adapter(job_id=job, merged_at=float(i), weights_version=i + 1, summary={}, config={}), record)

    reopened = AdapterBook(tmp_path / "adapters")  # what a new trainer process sees
    assert [a["job_id"] for a in reopened.history()] == ["job-a", "job-b"]
    with pytest.raises(OpError, match="revert that one first"):
        reopened.revertible("job-a")
    with pytest.raises(OpError, match="no adapter was merged by job job-x"):
        reopened.revertible("job-x")
    for job in ("job-b", "job-a"):
        adapter, record = reopened.revertible(None)
        assert adapter.job_id == job and revert_in_place(model, record)
        reopened.reverted(job, exact=True)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    with pytest.raises(OpError, match="no circuit-breaker adapter is merged"):
        AdapterBook(tmp_path / "adapters").revertible(None)
    assert [a["revert_exact"] for a in AdapterBook(tmp_path / "adapters").history()] == [True, True]
    assert not list((tmp_path / "adapters").glob("*.safetensors"))  # reverted adapters keep only their history

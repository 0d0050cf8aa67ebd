"""The trainer's served adapters, in process: trained on the frozen base through views of their
live file, kept with their optimizer, brought back by a new trainer, refused when asked for in
a shape they do not have (the end-to-end checks are in ``e2e/test_served_adapters.py``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild.contracts.protocol import OpError
from hogwild.contracts.live_adapter import FACTORS, map_factors
from hogwild.contracts.served_adapter import AdapterSpec
from hogwild.contracts.sft_config import SFTOptions
from hogwild.training.batches import Sample
from hogwild.worker.model_access import ModelAccess
from hogwild.worker.served_adapters import ServedAdapters

SAMPLES = [Sample((5, 6, 7), (100, 100), 1.0, None)]


@pytest.fixture()
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def store_for(model, tmp_path, live="live") -> ServedAdapters:
    store = ServedAdapters(tmp_path / live, tmp_path / "durable")
    store.bind_model(model)
    return store


def train(store, access, spec, steps=5):
    with access.exclusive(), store.training(spec, access, 0, seed=0) as run:
        result = run.trainer.run(SAMPLES, SFTOptions(lr=1e-2, steps=steps),
                                 on_step=lambda step, total, r: run.stepped(r.steps))
        return result, run.trainer.global_step


def test_a_job_trains_the_live_file_leaves_the_base_and_a_new_trainer_continues_it(model, tmp_path):
    base = {name: p.clone() for name, p in model.named_parameters()}
    store, access = store_for(model, tmp_path), ModelAccess(model)
    result, step = train(store, access, AdapterSpec(name="a", rank=4, targets=["q_proj", "v_proj"]))
    assert result.loss_after < result.loss_before and step == 5
    # The base: the same tensors, bit for bit, and no adapter left on the model.
    assert {name: p for name, p in model.named_parameters()}.keys() == base.keys()
    assert all(torch.equal(p, base[name]) for name, p in model.named_parameters())
    record = store.info()[0]
    assert (record.rank, record.alpha, record.targets, record.steps, record.version) == (4, 32.0, ["q_proj", "v_proj"], 5, 5)
    live = tmp_path / "live" / "a" / FACTORS
    trained = map_factors(live)
    assert len(trained) == 2 * 2 * 2 and any(t.abs().max() > 0 for k, t in trained.items() if "lora_B" in k)
    assert (tmp_path / "durable" / "a" / FACTORS).read_bytes() == live.read_bytes()
    # A writes through the views land in the file.
    key = next(iter(trained))
    trained[key][0, 0] = 42.0
    assert map_factors(live)[key][0, 0] == 42.0
    # A new trainer: the durable copy back in its live place, the optimizer continued, the shape kept.
    again = store_for(model, tmp_path, live="live-2")
    assert again.info()[0].model_copy(update={"path": ""}) == record.model_copy(update={"path": ""})
    _, step = train(again, access, AdapterSpec(name="a"))
    assert step == 10 and again.info()[0].steps == 10


def test_an_adapter_asked_for_in_another_shape_or_beyond_the_cap_is_refused(model, tmp_path, monkeypatch):
    store, access = store_for(model, tmp_path), ModelAccess(model)
    train(store, access, AdapterSpec(name="a", rank=4), steps=1)
    with pytest.raises(OpError, match="another shape: adapter_rank 8 .it has 4."):
        store.resolve(AdapterSpec(name="a", rank=8))
    with pytest.raises(OpError, match="no adaptable module lm_head"):
        store.resolve(AdapterSpec(name="b", targets=["lm_head"]))
    monkeypatch.setenv("HOGWILD_MAX_ADAPTERS", "1")
    with pytest.raises(OpError, match="HOGWILD_MAX_ADAPTERS"):
        store.resolve(AdapterSpec(name="b"))
    store.resolve(AdapterSpec(name="a"))  # continuing one it holds is not a new one
    assert [r.name for r in store.info()] == ["a"]
    store.delete("a")
    assert store.info() == [] and not (tmp_path / "durable" / "a").exists() and not (tmp_path / "live" / "a").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_learns_on_a_bf16_base_as_on_fp32(tiny_model_dir, tmp_path, dtype):
    # The factors are fp32 on either base (PEFT's default), so the adapter learns alike; the
    # tiny model's head is small and not adapted: a repeated token is what 100 steps make greedy.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    store, access = store_for(model, tmp_path), ModelAccess(model)
    context, target = (5, 6, 7, 8), (100,) * 4
    with access.exclusive(), store.training(AdapterSpec(name="a", rank=8), access, 0, seed=0) as run:
        result = run.trainer.run([Sample(context, target, 1.0, None)], SFTOptions(lr=3e-2, steps=100))
        assert all(p.dtype == torch.float32 for p in run.trainer.params)
        with torch.no_grad():
            answer = run.trainer.model.generate(torch.tensor([context]), max_new_tokens=4, do_sample=False)[0, 4:]
    assert result.loss_before - result.loss_after > 1.0, (result.loss_before, result.loss_after)
    assert tuple(answer.tolist()) == target

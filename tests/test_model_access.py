"""The trainer's model access: no forward overlaps an adapter being attached, on, or taken off."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from peft.tuners.lora import model as lora_model
from transformers import AutoModelForCausalLM

from hogwild.worker.model_access import ModelAccess


def _structure(model) -> set[str]:
    """What the projections a LoRA replaces are: one kind when the structure is whole."""
    return {"lora" if hasattr(m, "lora_A") else "plain" for name, m in model.named_modules()
            if name.endswith(("q_proj", "v_proj", "down_proj"))}


@pytest.fixture
def slow_attach(monkeypatch):
    """peft attaches module by module; make each slow, and say when the first is in."""
    begun = threading.Event()
    original = lora_model.LoraModel._create_and_replace

    def slow(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        begun.set()  # one module is swapped in, the others are not yet
        time.sleep(0.02)
        return result

    monkeypatch.setattr(lora_model.LoraModel, "_create_and_replace", slow)
    return begun


def _race(access: ModelAccess, begun: threading.Event, read) -> list[set[str]]:
    seen: list[set[str]] = []

    def attach():
        with access.exclusive(), access.adapter(r=4, alpha=8, dropout=0.0):
            time.sleep(0.1)

    def score():
        begun.wait(10)
        seen.append(read())

    threads = [threading.Thread(target=attach), threading.Thread(target=score)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return seen


def test_unguarded_the_race_is_real(tiny_model_dir, slow_attach):
    # What head scoring did before: read the model while a job attaches a LoRA.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    seen = _race(ModelAccess(model), slow_attach, lambda: _structure(model))
    assert len(seen[0]) > 1, seen  # half plain, half LoRA: a forward now would run through both


def test_a_scoring_forward_waits_for_the_adapter_to_be_gone(tiny_model_dir, slow_attach):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    access = ModelAccess(model)

    def read():
        with access.reading() as m, torch.no_grad():
            structure = _structure(m)
            m(torch.tensor([[5, 6, 7]]))
            return structure

    seen = _race(access, slow_attach, read)
    assert seen == [{"plain"}]  # the whole model as served, never a mix


def test_reading_does_not_wait_for_a_plain_training_job(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    access = ModelAccess(model)
    with access.exclusive():  # a training step holds the model
        done = threading.Event()

        def read():
            with access.reading():
                done.set()

        threading.Thread(target=read).start()
        assert done.wait(5), "head scoring queued behind training (it reads beside it, HOGWILD)"

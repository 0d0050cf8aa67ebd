"""The trainer's model access: no forward overlaps an adapter being attached, on, or taken off."""

from __future__ import annotations

import threading

import pytest
import torch
from peft.tuners.lora import model as lora_model
from transformers import AutoModelForCausalLM

from hogwild.worker.model_access import ModelAccess


def _structure(model) -> set[str]:
    """What the projections a LoRA replaces are: one kind when the structure is whole."""
    return {"lora" if hasattr(m, "lora_A") else "plain" for name, m in model.named_modules()
            if name.endswith(("q_proj", "v_proj", "down_proj"))}


class Race:
    """peft attaches a LoRA module by module. The attach stops after the first module is
    swapped in (``begun``) and waits for the reader's answer (``read``), or for ``hold``
    seconds when none comes (a guarded reader waits for the whole attach)."""

    def __init__(self, hold: float):
        self.begun, self.trying, self.read = threading.Event(), threading.Event(), threading.Event()
        self.hold, self.read_during_attach = hold, None

    def stop_at_first_module(self, monkeypatch) -> None:
        original = lora_model.LoraModel._create_and_replace

        def first_then_wait(model, *args, **kwargs):
            result = original(model, *args, **kwargs)
            if not self.begun.is_set():  # one module is swapped in, the others are not yet
                self.begun.set()
                assert self.trying.wait(30), "the reader never started"
                self.read_during_attach = self.read.wait(self.hold)
            return result

        monkeypatch.setattr(lora_model.LoraModel, "_create_and_replace", first_then_wait)


def _race(access: ModelAccess, race: Race, read) -> list[set[str]]:
    seen: list[set[str]] = []

    def attach():
        with access.exclusive(), access.adapter(r=4, alpha=8, dropout=0.0):
            pass

    def score():
        assert race.begun.wait(30)
        race.trying.set()
        seen.append(read())
        race.read.set()

    threads = [threading.Thread(target=attach), threading.Thread(target=score)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return seen


def test_unguarded_the_race_is_real(tiny_model_dir, monkeypatch):
    # What head scoring did before: read the model while a job attaches a LoRA.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    race = Race(hold=30)  # the unguarded read answers at once
    race.stop_at_first_module(monkeypatch)
    seen = _race(ModelAccess(model), race, lambda: _structure(model))
    assert race.read_during_attach
    assert len(seen[0]) > 1, seen  # half plain, half LoRA: a forward now would run through both


def test_a_scoring_forward_waits_for_the_adapter_to_be_gone(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    access = ModelAccess(model)
    race = Race(hold=2)  # how long a read that got in would have had to answer
    race.stop_at_first_module(monkeypatch)

    def read():
        with access.reading() as m, torch.no_grad():
            structure = _structure(m)
            m(torch.tensor([[5, 6, 7]]))
            return structure

    seen = _race(access, race, read)
    assert race.read_during_attach is False  # it waited...
    assert seen == [{"plain"}]  # ...for the whole model as served, never a mix


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

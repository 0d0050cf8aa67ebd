"""The one step loop every full-weight mode runs (training/step_loop.py), on a plain HF model:
a mode is a loss on it; micro-batching does not change a step; the mode's metrics land in the
history; a stop request ends the job between steps; preference runs on it with its fields."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild.contracts.preference_config import PreferenceOptions
from hogwild.contracts.sft_config import SFTOptions
from hogwild.training.batches import Sample
from hogwild.training.preference import Pair, PreferenceTrainer
from hogwild.training.sft import ContinuationLoss, SFTTrainer
from hogwild.training.step_loop import StepsResult, evaluation_items, run_steps

SAMPLES = [Sample((5, 6, 7), (8, 9, 10)), Sample((11, 12), (13, 14, 15, 16), weight=2.0), Sample((17,), (18,)),
           Sample((19, 20, 21, 22), (23, 24))]


@pytest.fixture
def trainer(tiny_model_dir):
    torch.manual_seed(0)
    return SFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))


class CountingLoss(ContinuationLoss):
    """SFT's loss, with a metric of its own (the micro-batches it ran) and a record of its calls."""

    def __init__(self, weights):
        super().__init__(weights)
        self.calls: list[tuple[int, bool]] = []  # (items, with gradient)

    def tokens(self, sample):
        return 100  # what the result's ``tokens`` counts is the mode's to say

    def __call__(self, samples):
        self.calls.append((len(samples), torch.is_grad_enabled()))
        loss, _ = super().__call__(samples)
        return loss, len(samples)

    def metrics(self, stats):
        return {"micro_batches": len(stats), "items": sum(stats)}


def test_a_mode_is_a_loss_on_the_loop(trainer):
    loss = CountingLoss(trainer)
    stops = iter([False, False, True])
    result = StepsResult()
    before, after = run_steps(trainer, loss, SAMPLES, SFTOptions(lr=1e-3, steps=5, micro_batch_size=3),
                              result, SAMPLES[:1], should_stop=lambda: next(stops))
    assert result.stopped_early and result.steps == 2 and result.optimizer_step == trainer.global_step == 2
    assert result.tokens == 2 * 4 * 100
    # Each step: its 4 samples in micro-batches of 3 and 1; the mode's metrics in the history beside loss and grad_norm.
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(h["micro_batches"] == 2 and h["items"] == 4 and h["grad_norm"] > 0 for h in result.history)
    # Before and after: the evaluated sample only, without gradient; the steps' forwards with it.
    assert loss.calls[0] == (1, False) and loss.calls[-1] == (1, False)
    assert loss.calls[1:-1] == [(3, True), (1, True)] * 2
    assert set(before) == set(after) == {"micro_batches", "items", "loss"} and after["loss"] < before["loss"]


def test_micro_batches_do_not_change_a_step(tiny_model_dir):
    """A step's loss is its micro-batches' losses weighted by the mode's item weights: one
    sample per forward or all in one give the same loss, gradient norm and measurements."""
    results = []
    for micro in (1, 4):
        torch.manual_seed(0)
        trainer = SFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
        results.append(trainer.run(SAMPLES, SFTOptions(lr=1e-3, steps=2, micro_batch_size=micro)))
    one, four = results
    for a, b in zip(one.history, four.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one.loss_before == pytest.approx(four.loss_before, rel=1e-5)
    assert one.loss_after == pytest.approx(four.loss_after, rel=1e-4)


def test_evaluation_items_are_bounded():
    def labelled(s):
        return len(s.continuation_ids)

    assert evaluation_items(SAMPLES, 7, labelled) == SAMPLES[:2]  # 3 + 4 tokens
    assert evaluation_items(SAMPLES, 1, labelled) == SAMPLES[:1]  # at least one
    assert evaluation_items(SAMPLES, 0, labelled) == []


def test_preference_runs_on_the_loop(trainer):
    pairs = [Pair((5, 6, 7), (8, 9), (10, 11)), Pair((12, 13), (14, 15, 16), (17,), weight=2.0)]
    result = PreferenceTrainer(trainer).run(pairs, PreferenceOptions(objective="dpo", lr=1e-3, steps=4))
    assert result.reference == "served model at the job's start" and result.steps == 4 and result.eval_pairs == 2
    assert result.before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the reference is the model as it started
    assert result.after["rewards/margins"] > result.before["rewards/margins"]
    assert result.tokens == 4 * ((2 + 2 + 2 * 3) + (3 + 1 + 2 * 2))  # both sequences of each pair, context included
    assert len(result.history) == 4 and {"loss", "grad_norm", "rewards/margins", "rewards/accuracies"} <= set(result.history[0])
    for field in ("objective", "reference_seconds", "optimizer_reset", "optimizer_step", "rounding", "last_step_at"):
        assert field in result.as_dict()

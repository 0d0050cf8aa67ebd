"""RL on the shared step loop (training/rl.py), on a plain HF model: a completion with a positive
advantage becomes likelier and those with negative ones less likely; group rewards become TRL's
advantages, degenerate groups are named; the diagnostics start where they must (ratio 1, KL 0,
no trainer/engine gap when the engine's numbers are the trainer's); micro-batching does not change
a step under either loss_type."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild.contracts.rl_config import RLOptions
from hogwild.training.rl import Completion, RLTrainer, with_advantages
from hogwild.training.sft import SFTTrainer

CONTEXT = (5, 6, 7, 8)
REPLIES = [(20, 21, 22), (30, 31), (40, 41, 42, 43)]


def trainer_of(tiny_model_dir) -> RLTrainer:
    torch.manual_seed(0)
    return RLTrainer(SFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)))


def completions(trainer: RLTrainer, rewards, group="g", shift=None) -> list[Completion]:
    """The replies with the model's own log-probs as the engine's (minus ``shift`` on the first's)."""
    drafts = [Completion(CONTEXT, reply, (), reward, group) for reply, reward in zip(REPLIES, rewards)]
    own = trainer.start_logprobs(drafts, 8)
    if shift is not None:
        own[0] = tuple(v - shift for v in own[0])
    return [Completion(c.context_ids, c.completion_ids, lp, c.reward, c.group) for c, lp in zip(drafts, own)]


def totals(trainer: RLTrainer, items) -> list[float]:
    return [sum(lp) for lp in trainer.start_logprobs(items, 8)]


def test_advantages_from_group_rewards_and_degenerate_groups_named():
    items = [Completion((1,), (2,), (-1.0,), reward, group) for reward, group in
             [(1.0, "g"), (0.0, "g"), (0.0, "g"), (3.0, "solo"), (2.0, "tie"), (2.0, "tie")]]
    items.append(Completion((1,), (2,), (-1.0,), advantage=-0.5))
    done, zero = with_advantages(items, scale_rewards=True)
    s = math.sqrt(1 / 3)  # rewards 1, 0, 0: mean 1/3, unbiased std sqrt(1/3)
    assert [c.advantage for c in done] == pytest.approx([(2 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4), (-1 / 3) / (s + 1e-4),
                                                         0.0, 0.0, 0.0, -0.5])
    assert zero == ["solo", "tie"]


def test_a_positive_advantage_raises_its_completion(tiny_model_dir):
    trainer = trainer_of(tiny_model_dir)
    items = completions(trainer, [1.0, 0.0, 0.0])
    before = totals(trainer, items)
    result = trainer.run(items, RLOptions(objective="grpo", lr=1e-3, steps=5, kl_coef=0.01))
    after = totals(trainer, items)
    assert result.steps == 5 and result.steps_skipped == 0 and result.zero_advantage_groups == []
    assert after[0] > before[0] + 0.1 and after[1] < before[1] and after[2] < before[2], (before, after)
    assert result.tokens == 5 * (3 + 2 + 4)
    # Before any step the policy is the job's start and the engine's numbers are the trainer's.
    assert result.before["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and result.before["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.before["logprob_gap_max"] < 1e-6 and result.before["truncated_fraction"] == 0.0
    assert result.after["kl"] > 0 and result.after["ratio_mean"] != pytest.approx(1.0, abs=1e-4)
    for key in ("loss", "grad_norm", "ratio_mean", "clip_fraction", "truncated_fraction", "kl", "advantage_mean",
                "logprob_gap_mean", "logprob_gap_max"):
        assert key in result.history[0], key
    assert result.history[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # the first step is on-policy


@pytest.mark.parametrize("objective", ["cispo", "reinforce"])
def test_the_other_objectives_learn_too(tiny_model_dir, objective):
    trainer = trainer_of(tiny_model_dir)
    items = completions(trainer, [1.0, 0.0, 0.0])
    before = totals(trainer, items)
    result = trainer.run(items, RLOptions(objective=objective, lr=1e-3, steps=5, loss_type="dr_grpo"))
    assert result.steps == 5 and totals(trainer, items)[0] > before[0] + 0.1


def test_the_engine_gap_is_measured_and_truncated(tiny_model_dir):
    """The engine found the first reply's tokens 3x less likely than the trainer does: the gap
    is log 3 on those tokens, and their importance weights (3) are truncated at is_cap 2."""
    trainer = trainer_of(tiny_model_dir)
    items = completions(trainer, [1.0, 0.0, 0.0], shift=math.log(3.0))
    result = trainer.run(items, RLOptions(lr=1e-3, steps=1, is_cap=2.0))
    n = 3 + 2 + 4
    assert result.before["logprob_gap_max"] == pytest.approx(math.log(3.0), rel=1e-5)
    assert result.before["logprob_gap_mean"] == pytest.approx(3 * math.log(3.0) / n, rel=1e-5)
    assert result.before["truncated_fraction"] == pytest.approx(3 / n)


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo"])
def test_micro_batches_do_not_change_an_rl_step(tiny_model_dir, loss_type):
    runs = []
    for micro in (1, 3):
        trainer = trainer_of(tiny_model_dir)
        items = completions(trainer, [1.0, 0.0, 0.5])
        runs.append(trainer.run(items, RLOptions(lr=1e-3, steps=2, micro_batch_size=micro, loss_type=loss_type)))
    one, three = runs
    for a, b in zip(one.history, three.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-8)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)

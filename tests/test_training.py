"""The training library on plain Hugging Face models (no vLLM)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild.contracts.sft_config import SFTOptions
from hogwild.training.batches import Sample, collate
from hogwild.training.losses import IGNORE_INDEX, continuation_nll
from hogwild.training.sft import SFTTrainer, warmup_lr
from hogwild.training.step_loop import plan_steps


def test_continuation_nll_by_hand():
    # Two positions, vocab 2. Position 0: logits (0, 0) -> p(label 1) = 1/2.
    # Position 1: logits (log 3, 0) -> p(label 0) = 3/4. Weights 1 and 3.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    labels = torch.tensor([[1, 0]])
    weights = torch.tensor([[1.0, 3.0]])
    loss, total_w = continuation_nll(logits, labels, weights)
    expected = (1 * math.log(2) + 3 * -math.log(0.75)) / 4
    assert total_w.item() == 4.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Ignored positions contribute nothing, whatever their logits.
    loss2, w2 = continuation_nll(logits, torch.tensor([[1, IGNORE_INDEX]]), weights)
    assert loss2.item() == pytest.approx(math.log(2), rel=1e-6) and w2.item() == 1.0


def test_collate_labels_only_the_continuation():
    batch = collate([Sample((10, 11, 12), (20, 21)), Sample((30,), (40, 41, 42), weight=2.0)], pad_id=0)
    # inputs are context + continuation minus its last token
    assert batch.input_ids.tolist() == [[10, 11, 12, 20], [30, 40, 41, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # position t predicts token t+1; context predictions are masked
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21], [40, 41, 42, IGNORE_INDEX]]
    assert batch.token_weights.tolist() == [[0, 0, 1, 1], [2, 2, 2, 0]]


def test_plan_steps_and_warmup():
    assert plan_steps(5, SFTOptions(batch_size=2, shuffle=False)) == [[0, 1], [2, 3], [4]]
    assert len(plan_steps(5, SFTOptions(batch_size=2, epochs=3))) == 9
    assert plan_steps(3, SFTOptions(steps=4, shuffle=False)) == [[0, 1, 2]] * 4
    assert sorted(sum(plan_steps(7, SFTOptions(batch_size=3, seed=1)), [])) == list(range(7))
    assert warmup_lr(1.0, 3, 0) == 0.25 and warmup_lr(1.0, 3, 2) == 0.75 and warmup_lr(1.0, 3, 3) == 1.0
    assert warmup_lr(1e-3, 0, 0) == 1e-3


@pytest.mark.parametrize(
    "bad",
    [{"lr": float("nan")}, {"lr": -1.0}, {"lr": 0.0}, {"betas": [0.9]}, {"betas": [1.0, 0.9]}, {"rank": 0},
     {"norm_growth_limit": 1.5}, {"scale_type": "row"}, {"steps": 0}, {"unknown": 1}, {"rank": "64"}],
)
def test_options_reject_bad_values(bad):
    with pytest.raises(ValidationError):
        SFTOptions(**bad)


@pytest.fixture
def hf_model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_memorises_a_continuation(hf_model, tok):
    ctx, target = tok.encode("The trainer reads"), tok.encode(" and then it writes.")
    trainer = SFTTrainer(hf_model)
    result = trainer.run([Sample(tuple(ctx), tuple(target))], SFTOptions(lr=1e-2, steps=30))
    assert result.steps == 30 and result.steps_skipped == 0 and result.tokens == 30 * len(target)
    assert result.loss_after < 0.1 < result.loss_before
    out = hf_model.generate(torch.tensor([ctx]), max_new_tokens=len(target), do_sample=False)
    assert out[0, len(ctx):].tolist() == target


def test_optimizer_state_persists_across_runs_and_resets_on_structure_change(hf_model):
    trainer = SFTTrainer(hf_model)
    samples = [Sample((5, 6, 7), (8, 9))]
    trainer.run(samples, SFTOptions(lr=1e-3, steps=3))
    optimizer = trainer.optimizer
    second = trainer.run(samples, SFTOptions(lr=5e-4, steps=2))
    assert trainer.optimizer is optimizer and not second.optimizer_reset
    assert second.optimizer_step == 5 and trainer.optimizer.param_groups[0]["lr"] == 5e-4
    third = trainer.run(samples, SFTOptions(lr=5e-4, steps=1, rank=8))
    assert third.optimizer_reset and trainer.optimizer is not optimizer
    projected = [g for g in trainer.optimizer.param_groups if "rank" in g]
    assert projected and projected[0]["rank"] == 8


def test_non_finite_loss_skips_the_step_and_leaves_weights_bit_identical(hf_model):
    trainer = SFTTrainer(hf_model)
    before = weights(hf_model)
    original_forward = hf_model.forward

    def poisoned(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        out.logits = out.logits * float("nan")
        return out

    hf_model.forward = poisoned
    result = trainer.run([Sample((5, 6), (7, 8))], SFTOptions(lr=1e-2, steps=2))
    assert result.steps == 0 and result.steps_skipped == 2 and "loss is not finite" in result.skip_reasons[0]
    after = weights(hf_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_gradient_skips_the_step_and_leaves_weights_bit_identical(hf_model):
    trainer = SFTTrainer(hf_model)
    before = weights(hf_model)
    # A hook that turns one gradient infinite while the loss stays finite.
    hf_model.model.norm.weight.register_hook(lambda g: g * float("inf"))
    result = trainer.run([Sample((5, 6), (7, 8))], SFTOptions(lr=1e-2, steps=1))
    assert result.steps_skipped == 1 and "gradient is not finite" in result.skip_reasons[0]
    after = weights(hf_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_clipping_bounds_the_update(tiny_model_dir):
    """The optimizer is handed the gradient scaled down to ``max_grad_norm``, and so moves the
    weights less than the same step unclipped."""

    def one_step(max_grad_norm):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        before, trainer = weights(model), SFTTrainer(model)
        options = SFTOptions(lr=1e-3, steps=1, max_grad_norm=max_grad_norm, eval_tokens=0)
        trainer.prepare(options)  # the optimizer the run will use (same structure: it is kept)
        seen = []
        trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.append(float(torch.nn.utils.get_total_norm(
            [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]))))
        result = trainer.run([Sample((5, 6, 7), (8, 9, 10))], options)
        after = weights(model)
        moved = math.sqrt(sum(float((after[k] - before[k]).double().pow(2).sum()) for k in before))
        return result, seen, moved

    clipped, seen_clipped, moved_clipped = one_step(1e-3)
    free, seen_free, moved_free = one_step(None)
    assert clipped.steps == free.steps == 1
    # The norm is reported before clipping, and is the same unclipped gradient both times.
    assert clipped.last_grad_norm == pytest.approx(free.last_grad_norm, rel=1e-5) and clipped.last_grad_norm > 1e-2
    assert seen_free == [pytest.approx(free.last_grad_norm, rel=1e-5)]
    assert seen_clipped == [pytest.approx(1e-3, rel=1e-3)]  # what the optimizer stepped with
    # Adam-like steps are near scale-free, but eps (1e-6) is not: a gradient of norm 1e-3 moves the weights
    # ~20x less than the unclipped one (norm ~10) here.
    assert moved_clipped < 0.1 * moved_free, (moved_clipped, moved_free)

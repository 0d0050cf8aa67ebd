"""RL losses (training/rl_losses.py): hand-worked values and gradients on small tensors, the
edge cases (ratio at and beyond the clip edges, negative advantages, masked rows, equal
rewards, groups of one, is_cap truncation), and TRL's and Tinker's formulas, transcribed, on
random numbers."""

from __future__ import annotations

import math

import pytest
import torch

from hogwild.training.rl_losses import (
    RLStats,
    aggregate,
    cispo_token_loss,
    grpo_token_loss,
    group_advantages,
    k3_kl,
    reinforce_token_loss,
    rl_stats,
    rl_token_loss,
    truncated_is_weight,
)

CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO's clip-higher: the ratio is kept in [0.8, 1.28]
OLD = -1.0  # every token's log-prob at the job's start, in the hand-worked cases
# Ratios r = exp(logp - old): row 0 has advantage +2, row 1 has -1. Inside the clip range,
# above it and below it; row 1's last ratio is exactly the upper edge.
RATIOS = [[1.0, 1.5, 0.5], [1.5, 0.5, 1.28]]
ADVANTAGES = [2.0, -1.0]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def hand_case():
    """(logp with gradient, old_logp, advantages) of the hand-worked cases."""
    logp = t([[OLD + math.log(r) for r in row] for row in RATIOS]).requires_grad_()
    return logp, torch.full_like(logp, OLD), t(ADVANTAGES)


def values_and_grad(loss_fn):
    logp, old, adv = hand_case()
    loss = loss_fn(logp, old, adv)
    loss.sum().backward()
    return loss.detach().tolist(), logp.grad.tolist()


def test_grpo_by_hand():
    loss, grad = values_and_grad(lambda logp, old, adv: grpo_token_loss(logp, old, adv, CLIP_LOW, CLIP_HIGH))
    # A = +2: r = 1 -> -2; r = 1.5 -> clipped to 1.28: -2.56; r = 0.5 -> min(1.0, 1.6): the unclipped -1.0.
    # A = -1: r = 1.5 -> min(-1.5, -1.28): the unclipped 1.5; r = 0.5 -> min(-0.5, -0.8): clipped 0.8; the edge: 1.28.
    assert loss == [pytest.approx([-2.0, -2.56, -1.0]), pytest.approx([1.5, 0.8, 1.28])]
    # d/dlogp of -r A is -r A where the unclipped term is taken, 0 where the clipped one is.
    assert grad[0] == pytest.approx([-2.0, 0.0, -1.0]) and grad[1][:2] == pytest.approx([1.5, 0.0])


def test_grpo_is_continuous_at_the_clip_edges():
    for edge in (1 - CLIP_LOW, 1 + CLIP_HIGH):
        for a in (2.0, -1.0):
            losses = [grpo_token_loss(t([[math.log(edge * (1 + d))]]), t([[0.0]]), t([a]), CLIP_LOW, CLIP_HIGH).item()
                      for d in (-1e-9, 0.0, 1e-9)]
            assert losses == pytest.approx([-edge * a] * 3, rel=1e-7), (edge, a)


def test_cispo_by_hand_and_its_weight_has_no_gradient():
    loss, grad = values_and_grad(lambda logp, old, adv: cispo_token_loss(logp, old, adv, CLIP_LOW, CLIP_HIGH))
    # weight = clip(r, 0.8, 1.28): row 0 [1, 1.28, 0.8], row 1 [1.28, 0.8, 1.28]; loss = -weight A logp.
    logp = [[OLD + math.log(r) for r in row] for row in RATIOS]
    assert loss[0] == pytest.approx([-1.0 * 2 * logp[0][0], -1.28 * 2 * logp[0][1], -0.8 * 2 * logp[0][2]])
    assert loss[1] == pytest.approx([1.28 * logp[1][0], 0.8 * logp[1][1], 1.28 * logp[1][2]])
    # Every token keeps a gradient, clipped or not: -weight A. Were the weight's gradient kept,
    # the first token's would be -A (r + r logp) = -2 (1 - 1) = 0.
    assert grad == [pytest.approx([-2.0, -2.56, -1.6]), pytest.approx([1.28, 0.8, 1.28])]


def test_reinforce_by_hand():
    loss, grad = values_and_grad(reinforce_token_loss)
    assert loss == [pytest.approx([-2.0, -3.0, -1.0]), pytest.approx([1.5, 0.5, 1.28])]
    assert grad == [pytest.approx([-2.0, -3.0, -1.0]), pytest.approx([1.5, 0.5, 1.28])]  # -sg(r) A


def test_truncated_importance_weight_by_hand():
    old = t([[0.0, 0.0, 0.0]])
    sampler = t([[0.0, -math.log(3.0), math.log(2.0)]])  # the trainer finds the tokens 1, 3 and 1/2 times as likely
    assert truncated_is_weight(old, sampler, is_cap=2.0).tolist() == [pytest.approx([1.0, 2.0, 0.5])]
    assert truncated_is_weight(old, sampler, is_cap=10.0).tolist() == [pytest.approx([1.0, 3.0, 0.5])]
    # In the loss it scales the policy-gradient term (here reinforce at r = 1, A = 1), value and gradient.
    logp = old.clone().requires_grad_()
    loss = rl_token_loss("reinforce", logp, old, sampler, t([1.0]), CLIP_LOW, CLIP_HIGH, is_cap=2.0)
    loss.sum().backward()
    assert loss.tolist() == [pytest.approx([-1.0, -2.0, -0.5])] and logp.grad.tolist() == [pytest.approx([-1.0, -2.0, -0.5])]


def test_k3_kl_by_hand():
    # delta = ref - logp: -0.5 -> e^-0.5 + 0.5 - 1; 1 -> e - 2; 0 -> 0
    kl = k3_kl(t([-1.0, -2.0, -3.0]), t([-1.5, -1.0, -3.0]))
    assert kl.tolist() == pytest.approx([math.exp(-0.5) - 0.5, math.e - 2, 0.0])
    # Its gradient vanishes where the policy is the reference: d/dlogp = 1 - exp(ref - logp).
    logp = t([-1.0, -2.0]).requires_grad_()
    k3_kl(logp, t([-1.0, -1.0])).sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 1 - math.e])
    # In the loss: kl_coef times the KL to the job's start, not scaled by the TIS weight.
    logp, old, adv = hand_case()
    sampler = old - math.log(3.0)  # weight 2 (capped)
    with_kl = rl_token_loss("grpo", logp, old, sampler, adv, CLIP_LOW, CLIP_HIGH, is_cap=2.0, kl_coef=0.1)
    without = rl_token_loss("grpo", logp, old, sampler, adv, CLIP_LOW, CLIP_HIGH, is_cap=2.0)
    r = t(RATIOS)
    assert torch.allclose(with_kl - without, 0.1 * (1 / r + torch.log(r) - 1))
    assert torch.allclose(without, 2 * grpo_token_loss(logp, old, adv, CLIP_LOW, CLIP_HIGH))


def test_aggregation_by_hand_with_a_masked_row():
    loss = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).requires_grad_()
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last row has no completion token
    bnpo = aggregate(loss, mask, "bnpo")
    assert bnpo.item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3 tokens
    assert aggregate(loss, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(7 / (3 * 4))  # the row counts
    bnpo.backward()
    assert loss.grad.tolist() == [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0], [0, 0, 0]]
    assert aggregate(loss, torch.zeros_like(mask), "bnpo").item() == 0.0  # no token at all: 0, not NaN
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(loss, mask, "grpo_mean")


def test_group_advantages_by_hand():
    rewards = t([1.0, 0.0, 0.0, 1.0, 0.5, 2.0, 2.0, 3.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 3])
    advantages, flat = group_advantages(rewards, groups)
    # Group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 1 is alone, group 2 all equal: 0, flat.
    # Group 3: mean 4, std sqrt(2).
    s0 = math.sqrt(1 / 3)
    assert advantages.tolist() == pytest.approx([0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4),
                                                 0.0, 0.0, 0.0, -1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])
    assert flat.tolist() == [False] * 4 + [True] * 3 + [False] * 2
    unscaled, _ = group_advantages(rewards, groups, scale_rewards=False)
    assert unscaled.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, -1.0, 1.0])


def test_stats_by_hand_and_micro_batches_add_up():
    logp, old, adv = hand_case()
    sampler = old - t([[0.0, math.log(3.0), math.log(0.5)], [0.1, -0.2, 5.0]])  # old - sampler per token
    mask = t([[1, 1, 1], [1, 1, 0]])  # row 1's edge token is padding
    args = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, is_cap=2.0)
    grpo = rl_stats("grpo", logp, old, sampler, adv, mask, **args).summary()
    kl = [0.0, 1 / 1.5 + math.log(1.5) - 1, 2 + math.log(0.5) - 1]  # 1/r + log r - 1 at r = 1, 1.5, 0.5
    assert grpo == pytest.approx({
        "ratio_mean": (1 + 1.5 + 0.5 + 1.5 + 0.5) / 5,
        "clip_fraction": 2 / 5,  # r = 1.5 with A > 0, r = 0.5 with A < 0
        "truncated_fraction": 1 / 5,  # the weight 3 (the masked e^5 does not count)
        "kl": (kl[0] + kl[1] + kl[2] + kl[1] + kl[2]) / 5,
        "advantage_mean": 0.5,
        "logprob_gap_mean": (0 + math.log(3) + math.log(2) + 0.1 + 0.2) / 5,
        "logprob_gap_max": math.log(3)})
    assert rl_stats("cispo", logp, old, sampler, adv, mask, **args).summary()["clip_fraction"] == pytest.approx(4 / 5)
    assert rl_stats("reinforce", logp, old, sampler, adv, mask, **args).summary()["clip_fraction"] == 0.0
    halves = [rl_stats("grpo", logp[i : i + 1], old[i : i + 1], sampler[i : i + 1], adv[i : i + 1], mask[i : i + 1], **args)
              for i in (0, 1)]
    assert (halves[0] + halves[1]).summary() == pytest.approx(grpo)
    empty = rl_stats("grpo", logp, old, sampler, adv, torch.zeros_like(mask), **args)
    assert empty.tokens == 0 and empty.summary()["logprob_gap_max"] == 0.0 and RLStats().summary()["ratio_mean"] == 0.0


# TRL's GRPO loss as trl/trainer/grpo_trainer.py has it (``_compute_loss``, importance_sampling_level
# "token", with the vLLM importance-sampling correction) and its group advantages
# (``_generate_and_score_completions``); Tinker's losses as its docs define them (importance_sampling,
# ppo, cispo; summed over tokens). Written from memory of those sources (0.2x releases; they could
# not be fetched when this was written): re-check them against the sources.
def trl_grpo_loss(per_token_logps, old_per_token_logps, sampling_per_token_logps, advantages, completion_mask,
                  epsilon_low, epsilon_high, beta, loss_type, max_completion_length, cap):
    ref_per_token_logps = old_per_token_logps
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    importance_sampling_ratio = torch.clamp(torch.exp(old_per_token_logps - sampling_per_token_logps), max=cap)
    per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "bnpo":
        return (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    return (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * max_completion_length)


def trl_advantages(rewards, num_generations, scale_rewards):
    mean_grouped_rewards = rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations, dim=0)
    std_grouped_rewards = rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    return advantages / (std_grouped_rewards + 1e-4) if scale_rewards else advantages


def tinker_losses(target_logprobs, sampling_logprobs, advantages, low, high):
    prob_ratio = torch.exp(target_logprobs - sampling_logprobs)
    clipped_ratio = torch.clamp(prob_ratio, low, high)
    return {"reinforce": -(prob_ratio * advantages).sum(),
            "grpo": -torch.min(prob_ratio * advantages, clipped_ratio * advantages).sum(),
            "cispo": -(clipped_ratio.detach() * target_logprobs * advantages).sum()}


def random_batch(g, b=6, n=12):
    old = -torch.rand(b, n, generator=g, dtype=torch.float64) * 4
    logp = old + 0.3 * torch.randn(b, n, generator=g, dtype=torch.float64)  # ratios well beyond both clip edges
    sampler = old + 0.5 * torch.randn(b, n, generator=g, dtype=torch.float64)  # weights beyond the cap
    lengths = torch.randint(0, n + 1, (b,), generator=g)
    mask = (torch.arange(n) < lengths.unsqueeze(1)).double()
    return logp, old, sampler, torch.randn(b, generator=g, dtype=torch.float64), mask


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_grpo_agrees_with_trl_on_random_numbers(loss_type, kl_coef):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        logp, old, sampler, adv, mask = random_batch(g)
        ours_logp, trl_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        ours = aggregate(rl_token_loss("grpo", ours_logp, old, sampler, adv, CLIP_LOW, CLIP_HIGH, 2.0, kl_coef), mask,
                         loss_type, max_completion_length=16)
        trl = trl_grpo_loss(trl_logp, old, sampler, adv, mask, CLIP_LOW, CLIP_HIGH, kl_coef, loss_type, 16, 2.0)
        ours.backward()
        trl.backward()
        assert ours.item() == pytest.approx(trl.item(), rel=1e-12, abs=1e-15)
        assert torch.allclose(ours_logp.grad, trl_logp.grad, rtol=1e-12, atol=1e-15)


def test_group_advantages_agree_with_trl():
    g = torch.Generator().manual_seed(2)
    rewards = torch.rand(8 * 4, generator=g, dtype=torch.float64)
    groups = torch.arange(8).repeat_interleave(4)
    for scale in (True, False):
        assert torch.allclose(group_advantages(rewards, groups, scale)[0], trl_advantages(rewards, 4, scale))


def test_without_staleness_or_cap_each_objective_is_tinkers():
    """With the job-start policy equal to the sampler's (w = 1), the per-token losses summed are
    Tinker's (its ppo is grpo here), values and gradients; for reinforce that holds at any staleness
    without a cap, where r w = exp(logp - sampler)."""
    g = torch.Generator().manual_seed(3)
    logp, old, sampler, adv, _ = random_batch(g)
    for objective in ("reinforce", "grpo", "cispo"):
        ours_logp, tinker_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        ours = rl_token_loss(objective, ours_logp, old, old, adv, CLIP_LOW, CLIP_HIGH, is_cap=2.0).sum()
        tinker = tinker_losses(tinker_logp, old, adv.unsqueeze(-1), 1 - CLIP_LOW, 1 + CLIP_HIGH)[objective]
        ours.backward()
        tinker.backward()
        assert ours.item() == pytest.approx(tinker.item(), rel=1e-12), objective
        assert torch.allclose(ours_logp.grad, tinker_logp.grad, rtol=1e-12), objective
    stale = rl_token_loss("reinforce", logp, old, sampler, adv, CLIP_LOW, CLIP_HIGH, is_cap=float("inf")).sum()
    assert stale.item() == pytest.approx(tinker_losses(logp, sampler, adv.unsqueeze(-1), 0.8, 1.28)["reinforce"].item())


def test_unknown_objective_is_refused():
    logp, old, adv = hand_case()
    with pytest.raises(ValueError, match="objective"):
        rl_token_loss("ppo2", logp, old, old, adv, CLIP_LOW, CLIP_HIGH, is_cap=2.0)

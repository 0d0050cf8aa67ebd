"""Stochastic rounding of in-place updates into 16-bit weights, and the optimizer that uses it."""

from __future__ import annotations

import copy

import pytest
import torch
from apollo_torch import APOLLOAdamW

from hogwild.training.apollo import RoundingApollo
from hogwild.training.rounding import (
    add_in_place,
    choices_of,
    draw_noise,
    preimages,
    restore,
    round_stochastic_,
    round_to_,
    spacing,
    write,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("dtype", "size"), [(torch.bfloat16, 1e-5), (torch.float16, 1e-6)])
def test_many_small_updates_land_on_average_with_stochastic_rounding_only(dtype, size):
    # The bf16 issue's case: weights of std 0.02 (bf16 spacing ~1.2e-4), 200 steps of a
    # fixed fp32 update of 1e-5 per element (signs fixed at random). fp16 has 3 more
    # mantissa bits (spacing ~1.5e-5 there): the same holds for updates 8x smaller.
    torch.manual_seed(0)
    start = (torch.randn(256, 256) * 0.02).to(dtype)
    update = torch.where(torch.rand(256, 256) < 0.5, -size, size)
    steps = 200
    expected = (update * steps).abs().mean().item()
    applied = {}
    for rounding in ("stochastic", "nearest"):
        w, g = start.clone(), _generator(1)
        for _ in range(steps):
            add_in_place(w, update, rounding, g)
        applied[rounding] = ((w.float() - start.float()) * update.sign()).mean().item()
    assert applied["stochastic"] == pytest.approx(expected, rel=0.03)
    assert applied["nearest"] < 0.5 * expected  # most updates round away, the rest land biased


def test_stochastic_rounding_is_unbiased_per_element_and_uses_its_own_generator():
    x = torch.full((200_000,), 1.0 + 0.3 * 2**-7)  # 30 % of the way from 1.0 to the next bf16
    before = torch.get_rng_state()
    out = round_stochastic_(x.clone(), torch.bfloat16, draw_noise(x.shape, _generator(2)))
    assert torch.equal(torch.get_rng_state(), before)  # torch's global generator is untouched
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert (out.float() > 1.0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    # Same noise, same result; exact values stay exact.
    assert torch.equal(out, round_stochastic_(x.clone(), torch.bfloat16, draw_noise(x.shape, _generator(2))))
    exact = torch.tensor([0.0, -2.0, 1.5, 3.0e-3]).to(torch.bfloat16).float()
    assert torch.equal(round_stochastic_(exact.clone(), torch.bfloat16, draw_noise(exact.shape, _generator(3))).float(), exact)
    # Negative values round both ways too.
    neg = round_stochastic_(-x, torch.bfloat16, draw_noise(x.shape, _generator(4)))
    assert (neg.float() < -1.0).float().mean().item() == pytest.approx(0.3, abs=0.005)


def test_fp32_weights_are_written_exactly():
    w = torch.randn(8, 8)
    target = w + 1e-9
    write(w, target, "stochastic", _generator())
    assert torch.equal(w, target)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [1e-3, 1e-5])
def test_a_rounded_add_is_undone_exactly_from_the_same_noise_and_a_few_choices(dtype, rounding, scale):
    torch.manual_seed(5)
    w = (torch.randn(512, 64) * 0.02).to(dtype)
    delta = torch.randn(512, 64) * scale
    noise = draw_noise(w.shape, _generator(6))
    merged = round_to_(w.float() + delta, dtype, rounding, noise)
    candidates, matches = preimages(merged, delta, rounding, noise)
    choices, fix_index = choices_of(w, candidates, matches)
    back = restore(candidates, matches, choices)
    back.view(-1)[fix_index] = w.view(-1)[fix_index]
    assert torch.equal(back, w)
    # What is kept is small: a byte per ambiguous element, and few explicit fix-ups
    # (weights near 0, whose spacing is far finer than the sum's).
    assert choices.numel() < 0.15 * w.numel() and fix_index.numel() < 0.01 * w.numel()


def test_spacing_of_bf16_weights():
    assert spacing(torch.tensor([0.02, 1.0], dtype=torch.bfloat16)).tolist() == pytest.approx([2**-13, 2**-7])


def _tiny_net(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(7)
    net = torch.nn.Sequential()
    net.add_module("embed", torch.nn.Embedding(50, 24))
    net.add_module("layers", torch.nn.ModuleList([torch.nn.Linear(24, 40), torch.nn.Linear(40, 24, bias=False)]))
    return net.to(dtype)


def _groups(net, rank=4, scale_type="channel"):
    projected = [p for n, p in net.named_parameters() if p.ndim == 2 and n.startswith("layers.")]
    plain = [p for n, p in net.named_parameters() if not (p.ndim == 2 and n.startswith("layers."))]
    return [{"params": plain}, {"params": projected, "rank": rank, "proj": "random", "proj_type": "std",
                                "update_proj_gap": 3, "scale_type": scale_type, "scale": 4.0}]


def _loss(net, ids):
    h = net.embed(ids)
    return net.layers[1](torch.tanh(net.layers[0](h))).pow(2).mean()


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("limiter", [False, True])
@pytest.mark.parametrize("scale_front", [False, True])
def test_rounding_apollo_computes_what_apollo_torch_computes_on_fp32_weights(scale_type, limiter, scale_front):
    ours_net, theirs_net = _tiny_net(), _tiny_net()
    kw = dict(lr=1e-2, weight_decay=0.1, scale_front=scale_front, disable_nl=not limiter)
    ours = RoundingApollo(_groups(ours_net, scale_type=scale_type), **kw)
    theirs = APOLLOAdamW(_groups(theirs_net, scale_type=scale_type), **kw)
    ids = torch.randint(0, 50, (4, 6), generator=_generator(8))
    for _ in range(7):  # crosses a projection refresh (update_proj_gap 3)
        for net, opt in ((ours_net, ours), (theirs_net, theirs)):
            opt.zero_grad()
            _loss(net, ids).backward()
            opt.step()
    for (name, a), b in zip(ours_net.named_parameters(), theirs_net.parameters()):
        if limiter:  # the limiter's norm is summed chunk by chunk: same value up to the last bits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), name
    assert all(s["exp_avg"].dtype == torch.float32 for s in ours.state.values())


def test_rounding_apollo_keeps_fp32_moments_for_bf16_weights_and_writes_in_place():
    net = _tiny_net(torch.bfloat16)
    storages = {n: p.untyped_storage().data_ptr() for n, p in net.named_parameters()}
    before = copy.deepcopy(net.state_dict())
    opt = RoundingApollo(_groups(net), lr=1e-3)
    opt.rounding, opt.generator = "stochastic", _generator(9)
    _loss(net, torch.randint(0, 50, (4, 6), generator=_generator(10))).backward()
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert {n: p.untyped_storage().data_ptr() for n, p in net.named_parameters()} == storages
    assert any(not torch.equal(p, before[n]) for n, p in net.named_parameters())

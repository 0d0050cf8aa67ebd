"""The ops vLLM's CPU path computes linear layers and MoE experts with while the weights are live."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hogwild.plugin.model_runner.live_kernels import ONEDNN_MIN_ELEMENTS, linear_for, live_linear, torch_experts

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2**-7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_the_op_equals_f_linear(dtype, rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(1024, 640, dtype=dtype) / 8, torch.randn(rows, 640, dtype=dtype)  # above ONEDNN_MIN_ELEMENTS
    bias = torch.randn(1024, dtype=dtype) if with_bias else None
    out = torch.ops.hogwild.live_linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == (rows, 1024) and out.is_contiguous()
    # Against the exact product of the same (rounded) inputs: bf16 to its own rounding.
    exact = F.linear(x.double(), weight.double(), bias.double() if bias is not None else None)
    torch.testing.assert_close(out.double(), exact, **TOLERANCE[dtype])
    torch.testing.assert_close(out, F.linear(x, weight, bias), **TOLERANCE[dtype])


def test_leading_dimensions_are_kept():
    x, weight = torch.randn(2, 3, 64), torch.randn(96, 64)
    out = live_linear(x, weight)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, F.linear(x, weight), **TOLERANCE[torch.float32])


def test_the_op_serves_large_fp32_weights_and_f_linear_the_rest():
    assert linear_for(torch.empty(1024, ONEDNN_MIN_ELEMENTS // 1024)) is live_linear
    assert linear_for(torch.empty(1024, ONEDNN_MIN_ELEMENTS // 1024 - 1)) is F.linear
    assert linear_for(torch.empty(1024, 1024, dtype=torch.bfloat16)) is F.linear


@pytest.mark.parametrize("rows", [4, 200])
@pytest.mark.parametrize("shape", [(96, 64), (1024, 640)], ids=["small", "large"])
def test_an_in_place_update_is_seen_by_the_next_call_eager_and_compiled(rows, shape):
    weight, x = torch.randn(*shape) / shape[1] ** 0.5, torch.randn(rows, shape[1])
    linear = linear_for(weight)
    compiled = torch.compile(lambda x, w: linear(x, w, None) * 2, fullgraph=True)
    before, before_compiled = linear(x, weight, None), compiled(x, weight)
    torch.testing.assert_close(before_compiled, 2 * before)
    with torch.no_grad():
        weight.add_(torch.randn_like(weight) / shape[1] ** 0.5)  # a training step writes the weight in place
    after, after_compiled = linear(x, weight, None), compiled(x, weight)
    torch.testing.assert_close(after, F.linear(x, weight), **TOLERANCE[torch.float32])
    torch.testing.assert_close(after_compiled, 2 * after)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("hidden,inter", [(32, 24), (512, 512)], ids=["small", "oneDNN-sized"])
def test_moe_experts_computed_with_the_op_equal_a_dense_reference(hidden, inter):
    torch.manual_seed(0)
    tokens, experts, top_k = 6, 4, 2
    x = torch.randn(tokens, hidden)
    w13, w2 = torch.randn(experts, 2 * inter, hidden) / hidden**0.5, torch.randn(experts, hidden, inter) / inter**0.5
    weights, ids = torch.softmax(torch.randn(tokens, top_k), -1), torch.randint(0, experts, (tokens, top_k))
    out = torch.empty(tokens, hidden)
    torch_experts(out, x, w13, w2, None, None, weights, ids, "silu", False)
    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for k in range(top_k):
            gate, up = (w13[ids[t, k]] @ x[t]).chunk(2)
            expected[t] += weights[t, k] * (w2[ids[t, k]] @ (F.silu(gate) * up))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_experts_op_runs_whole_in_compiled_mode():
    """vLLM compiles the model on CPU by default: the experts' data-dependent loop must be one op
    to the compiler (traced, it stopped a MoE model from starting)."""
    torch.manual_seed(1)
    x, w13, w2 = torch.randn(5, 32), torch.randn(4, 48, 32) / 8, torch.randn(4, 32, 24) / 8
    weights, ids = torch.softmax(torch.randn(5, 2), -1), torch.randint(0, 4, (5, 2))

    def moe(x, w13, w2, weights, ids):
        out = torch.empty_like(x)
        torch_experts(out, x, w13, w2, None, None, weights, ids, "silu", False)
        return out * 2

    eager = moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(torch.compile(moe, fullgraph=True, dynamic=True)(x, w13, w2, weights, ids), eager)

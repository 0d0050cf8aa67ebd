"""A quantized base in the trainer, in process: the packed model computes what transformers'
own compressed-tensors loading computes, keeps no dense weight (not even for backward), and an
adapter learns on it (the served end to end is in ``e2e/test_served_adapters.py``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild import tiny_model
from hogwild.contracts.manifest import Manifest
from hogwild.contracts.served_adapter import AdapterSpec
from hogwild.contracts.sft_config import SFTOptions
from hogwild.training.batches import Sample
from hogwild.training.packed_linear import PackedLinear
from hogwild.worker.model_access import ModelAccess
from hogwild.worker.served_adapters import ServedAdapters
from hogwild.worker.views import bind

IDS = torch.tensor([[5, 100, 200, 300, 400, 17, 18, 19]])


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    return tiny_model.build(tmp_path_factory.mktemp("models") / "tiny-w4a16", dtype="bfloat16", quantize="w4a16")


def packed_model(model_dir):
    manifest = Manifest(model=str(model_dir), architectures=["Qwen2ForCausalLM"], dtype="bfloat16", backend="none",
                        worker_pid=0, vllm_version="0.32.0", quantization="compressed-tensors")
    return bind(manifest)


def test_the_packed_base_computes_what_transformers_loading_computes_and_holds_no_dense_weight(quantized_dir):
    model, binding = packed_model(quantized_dir)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 2 * 7 and all(m.weight is None for m in layers)
    assert binding.shared_param_bytes == 0 and all(not p.requires_grad for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(str(quantized_dir), dtype=torch.bfloat16)  # dequantizes at load
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
    # Backward: the input's gradient is the dense layer's, and no dense weight is saved for it.
    layer = layers[0]
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    dense = layer.dequantized()
    expected = torch.ones_like(out) @ dense
    assert torch.equal(x.grad, expected)
    assert (layer.out_features, layer.in_features) not in saved


@pytest.mark.parametrize("steps", [100])
def test_an_adapter_learns_a_target_on_the_packed_base(quantized_dir, tmp_path, steps):
    model, _ = packed_model(quantized_dir)
    store = ServedAdapters(tmp_path / "live", tmp_path / "durable")
    store.bind_model(model)
    access = ModelAccess(model)
    context, target = (5, 6, 7, 8), (100,) * 4
    with access.exclusive(), store.training(AdapterSpec(name="a", rank=8), access, 0, seed=0) as run:
        result = run.trainer.run([Sample(context, target, 1.0, None)], SFTOptions(lr=3e-2, steps=steps))
        with torch.no_grad():
            answer = run.trainer.model.generate(torch.tensor([context]), max_new_tokens=4, do_sample=False)[0, 4:]
    assert result.loss_before - result.loss_after > 1.0, (result.loss_before, result.loss_after)
    assert tuple(answer.tolist()) == target
    assert not any(isinstance(m, PackedLinear) and m.weight is not None for m in model.modules())

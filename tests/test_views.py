"""Building the trainer's model from a weight manifest, without vLLM: the
manifest here is written the way vLLM's worker lays weights out (q/k/v and
gate/up fused along dim 0, vocabulary rows padded to a multiple of 64), each HF
parameter a strided view of a fused tensor."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild.contracts.manifest import HFView, Manifest, TensorEntry, read_manifest, write_manifest
from hogwild.worker.views import UnsupportedModel, build_view_model, shared_parameter_bytes


def rows(name: str, tensor_name: str, start: int, stop: int, shape) -> HFView:
    """Rows [start, stop) of a fused 1-D or 2-D vLLM tensor as an HF view."""
    cols = shape[1] if len(shape) > 1 else 1
    return HFView(name=name, tensor=tensor_name, offset=start * cols, shape=[stop - start, *shape[1:]],
                  stride=[cols, 1][: len(shape)])


def vllm_layout(model) -> list[tuple[str, torch.Tensor, list[HFView]]]:
    """(vLLM name, fused tensor, HF views) for a Qwen2/Llama HF model."""
    sd = model.state_dict()
    out = []
    for name, tensor in sd.items():
        if any(f".{p}_proj." in name for p in ("k", "v", "up")):
            continue  # folded into the fused tensor of q / gate
        if ".q_proj." in name or ".gate_proj." in name:
            parts = ["q_proj", "k_proj", "v_proj"] if ".q_proj." in name else ["gate_proj", "up_proj"]
            first = parts[0]
            names = [name.replace(first, p) for p in parts]
            fused_name = name.replace(first, "qkv_proj" if first == "q_proj" else "gate_up_proj")
            fused, views, start = torch.cat([sd[n] for n in names]), [], 0
            for n in names:
                views.append(rows(n, fused_name, start, start + sd[n].shape[0], fused.shape))
                start += sd[n].shape[0]
            out.append((fused_name, fused, views))
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            n_rows = tensor.shape[0]
            padded = torch.zeros((n_rows + 63) // 64 * 64, tensor.shape[1], dtype=tensor.dtype)
            padded[:n_rows] = tensor
            out.append((name, padded, [rows(name, name, 0, tensor.shape[0], padded.shape)]))
        else:
            out.append((name, tensor, [rows(name, name, 0, tensor.shape[0], tensor.shape)]))
    return out


def publish(model, model_dir, directory) -> Manifest:
    layout = vllm_layout(model)
    arena = directory / "weights.bin"
    offsets, cursor = [], 0
    for _, t, _ in layout:
        offsets.append(cursor)
        cursor += (t.numel() * t.element_size() + 4095) // 4096 * 4096
    with open(arena, "wb") as f:
        f.truncate(cursor)
    mapped = torch.from_file(str(arena), shared=True, size=cursor, dtype=torch.uint8)
    entries, views = [], []
    for (name, t, hf), off in zip(layout, offsets):
        n = t.numel() * t.element_size()
        mapped[off : off + n].view(t.dtype).view(t.shape).copy_(t)
        entries.append(TensorEntry(name=name, dtype=str(t.dtype)[6:], shape=list(t.shape), nbytes=n, offset=off))
        views += hf
    manifest = Manifest(model=str(model_dir), architectures=model.config.architectures, dtype="float32",
                        backend="cpu_shm", arena=str(arena), arena_bytes=cursor, tensors=entries,
                        model_class=type(model).__name__, views=views, checkpoint_views=views,
                        worker_pid=os.getpid(), vllm_version="test")
    write_manifest(manifest, directory)
    return read_manifest(directory)


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_llama_dir"])
def test_view_model_matches_and_writes_through(which, request, tmp_path):
    model_dir = request.getfixturevalue(which)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    manifest = publish(reference, model_dir, tmp_path)
    view = build_view_model(manifest)

    ids = torch.tensor([[5, 17, 300, 42, 7, 1999]])
    with torch.no_grad():
        assert torch.allclose(view(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6)
    param_bytes = sum(p.numel() * p.element_size() for p in view.parameters())
    assert shared_parameter_bytes(view) == param_bytes  # no parameter is a copy

    # An in-place update of a trainer parameter is a write into the shared arena.
    digest_before = (tmp_path / "weights.bin").read_bytes()
    with torch.no_grad():
        view.model.layers[0].self_attn.k_proj.weight.add_(1.0)
    after = (tmp_path / "weights.bin").read_bytes()
    changed = sum(a != b for a, b in zip(digest_before, after))
    assert changed > 0
    fused = next(t for t in manifest.tensors if t.name == "model.layers.0.self_attn.qkv_proj.weight")
    k = next(v for v in manifest.views if v.name == "model.layers.0.self_attn.k_proj.weight")
    start = fused.offset + k.offset * 4
    stop = start + k.shape[0] * fused.shape[1] * 4
    assert digest_before[:start] == after[:start] and digest_before[stop:] == after[stop:], "wrote outside k_proj's rows"


def test_a_model_that_cannot_be_mapped_is_a_clear_error(tiny_model_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    manifest = publish(reference, tiny_model_dir, tmp_path)
    from transformers import GPT2Config, T5Config

    t5 = tmp_path / "t5"
    T5Config(num_layers=1, d_model=64, num_heads=2, architectures=["T5ForConditionalGeneration"]).save_pretrained(t5)
    with pytest.raises(UnsupportedModel, match="t5 is an encoder-decoder model: only decoder-only models train"):
        build_view_model(manifest, model_dir=t5)
    gpt2 = tmp_path / "gpt2"  # mapped for another class than the trainer would build
    GPT2Config(n_layer=1, n_embd=64, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModel, match="mapped for Qwen2ForCausalLM, transformers builds GPT2LMHeadModel"):
        build_view_model(manifest, model_dir=gpt2)


def test_a_parameter_that_is_not_a_view_is_frozen_from_the_checkpoint_or_refused(tiny_model_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    manifest = publish(reference, tiny_model_dir, tmp_path)
    manifest.views = [v for v in manifest.views if v.name != "model.norm.weight"]
    manifest.not_views = {"model.norm.weight": "process_weights_after_loading changed its storage"}
    view = build_view_model(manifest)
    frozen = view.model.norm.weight
    assert not frozen.requires_grad and torch.equal(frozen, reference.model.norm.weight)
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        assert torch.allclose(view(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6)
    manifest.not_views = {"model.norm.weight": "repacked", "model.nowhere.weight": "repacked"}
    with pytest.raises(UnsupportedModel, match="model.nowhere.weight is not a view of the served weights \\(repacked\\)"):
        build_view_model(manifest)


def test_a_missing_served_tensor_is_named(tiny_model_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    manifest = publish(reference, tiny_model_dir, tmp_path)
    manifest.tensors = [t for t in manifest.tensors if t.name != "model.norm.weight"]
    with pytest.raises(UnsupportedModel, match="model.norm.weight"):
        build_view_model(manifest)


def test_the_manifest_refuses_another_version(tmp_path):
    (tmp_path / "manifest.json").write_text('{"version": 99}')
    with pytest.raises(ValueError, match="version 99"):
        read_manifest(tmp_path)


def test_the_trainer_reports_an_unsupported_model_at_start_up(tiny_model_dir, tmp_path):
    from transformers import T5Config

    from hogwild.contracts.jobs import SubmitOp, TrainSample
    from hogwild.contracts.protocol import Request
    from hogwild.worker.service import TrainerService

    config_dir = tmp_path / "t5"
    T5Config(num_layers=1, d_model=64, num_heads=2, architectures=["T5ForConditionalGeneration"]).save_pretrained(config_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    manifest = publish(reference, tiny_model_dir, tmp_path)
    manifest.model = str(config_dir)
    write_manifest(manifest, tmp_path)

    service = TrainerService(tmp_path, tmp_path / "state")
    service.load()
    assert service.state == "unsupported" and "encoder-decoder" in service.reason
    reply = service.handle(Request(id="1", body=SubmitOp(samples=[TrainSample(context_ids=[1], continuation_ids=[2])])), b"c")
    assert not reply.ok and reply.error.code == "unsupported" and "encoder-decoder" in reply.error.message
    status = service.handle(Request(id="2", body={"op": "status"}), b"c")
    assert status.ok and status.result["state"] == "unsupported"

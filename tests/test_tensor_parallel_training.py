"""Tensor-parallel training without vLLM: two gloo processes, each holding its part of a
small Qwen2 (columns, rows, vocabulary split unevenly as vLLM pads it, a k/v head copied
to both ranks), compute what the whole model computes: the vocab-parallel cross-entropy
and its gradient, every parameter's gradient, the global gradient norm, and one APOLLO step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hogwild.contracts.sft_config import ApolloHyper, ApolloStructure
from hogwild.training.apollo import build_optimizer
from hogwild.training.tensor_parallel import VocabShard, global_grad_norm, parallelize, sync_gradients

VOCAB, VOCAB_SPLIT = 100, 64  # rank 0 holds rows 0-63 (vLLM's padded partition), rank 1 rows 64-99
IDS = torch.tensor([[3, 70, 12, 99, 64, 63, 5, 80, 41, 7]])


def config() -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, tie_word_embeddings=False, attn_implementation="eager")


def shards(model: torch.nn.Module, rank: int) -> dict[str, list[list[int]]]:
    """vLLM's split of each parameter for TP 2 (the single k/v head is copied to both ranks)."""
    out = {}
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            out[name] = [[0, 0, VOCAB_SPLIT]] if rank == 0 else [[0, VOCAB_SPLIT, VOCAB - VOCAB_SPLIT]]
        elif any(k in name for k in ("q_proj", "gate_proj", "up_proj")):
            half = p.shape[0] // 2
            out[name] = [[0, rank * half, half]]
        elif any(k in name for k in ("o_proj", "down_proj")):
            half = p.shape[1] // 2
            out[name] = [[1, rank * half, half]]
    return out


def part(t: torch.Tensor, boxes) -> torch.Tensor:
    for dim, start, length in boxes or []:
        t = t.narrow(dim, start, length)
    return t


def whole_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config()).float().eval()


def loss_of(logits: torch.Tensor, nll) -> torch.Tensor:
    return nll(logits[0, :-1], IDS[0, 1:]).mean()


def rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    model = whole_model()
    full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    split = shards(model, rank)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, torch.nn.Parameter(part(p, split.get(name)).clone()))
    layout = parallelize(model, split, full_shapes, rank, 2)
    # The loss alone: vocab-parallel cross-entropy against the whole logits' cross-entropy.
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (_, start, length), = split["lm_head.weight"]
    local = logits.narrow(1, start, length).detach().requires_grad_()
    nll = VocabShard(start, length).nll(local, torch.tensor([0, 63, 64, 99, 5, 70]))
    nll.sum().backward()
    # The model: loss, gradients, their global norm, then one APOLLO step.
    optimizer = build_optimizer(model, ApolloStructure(rank=4), ApolloHyper(lr=1e-2))
    loss = loss_of(model(input_ids=IDS).logits, layout.vocab.nll)
    loss.backward()
    sync_gradients(model, layout)
    norm = global_grad_norm(model, layout)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    torch.save({"nll": nll.detach(), "nll_grad": local.grad, "loss": loss.detach(), "norm": norm, "grads": grads,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "shards": split}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_compute_what_the_whole_model_computes(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1), requires_grad=True)
    nll = F.cross_entropy(logits, torch.tensor([0, 63, 64, 99, 5, 70]), reduction="none")
    nll.sum().backward()
    for r in ranks:
        assert torch.allclose(r["nll"], nll.detach(), atol=1e-6)
    assert torch.allclose(torch.cat([r["nll_grad"] for r in ranks], 1), logits.grad, atol=1e-6)

    model = whole_model()
    optimizer = build_optimizer(model, ApolloStructure(rank=4), ApolloHyper(lr=1e-2))
    loss = loss_of(model(input_ids=IDS).logits, lambda lg, t: F.cross_entropy(lg, t, reduction="none"))
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for r in ranks:
        assert torch.allclose(r["loss"], loss.detach(), atol=1e-6)
        assert torch.allclose(r["norm"], norm, rtol=1e-5)
        for name, grad in grads.items():
            assert torch.allclose(r["grads"][name], part(grad, r["shards"].get(name)), atol=1e-6), name
        # APOLLO's projection of a split weight is the whole weight's: the same update, sliced.
        for name, weight in model.named_parameters():
            assert torch.allclose(r["weights"][name], part(weight.detach(), r["shards"].get(name)), atol=1e-6), name


def test_experts_split_by_expert_are_refused_with_the_reason():
    """Expert parallel gives each rank whole experts; transformers' experts module indexes all of
    them, so training says no (the serving side is unaffected)."""
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                            num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shards = {n: [[0, 0, 2]] for n in full if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    with pytest.raises(ValueError, match="expert parallel"):
        parallelize(model, shards, full, 0, 2)

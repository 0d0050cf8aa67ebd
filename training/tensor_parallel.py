"""A transformers model run as one tensor-parallel model across processes, each holding
the shard of every weight that its vLLM rank holds (Megatron-style, with vLLM's split).

``parallelize`` takes a model whose parameters are already this rank's parts (views of
what vLLM computes with) and the split of each (``shards``: name -> ``[[dim, start,
length(, blocks)]]``, from the weight manifest) and adds the collectives that make the
ranks compute the whole model:

- a **region** is a block of a decoder layer holding split weights (attention, MLP,
  MoE): its input enters through ``copy_to_region`` (identity forward, all-reduce of the
  gradient backward), a row-parallel linear (weight split on its input dim) or fused
  experts split on their inner dim leave it through ``reduce_from_region`` (all-reduce
  forward, identity backward); a replicated parameter inside a region (a head-shared k/v
  projection, q/k norms, a MoE router) gets only this rank's part of its gradient, so its
  gradient is all-reduced after the backward (``sync_gradients``);
- the embedding is vocab-parallel (ids outside this rank's rows look up zeros, the sum
  is all-reduced), the LM head gives this rank's slice of the logits, and
  ``VocabParallelNLL`` is the cross-entropy over logits split by vocabulary: no rank
  ever holds the whole logits.

Why these are written here instead of taken from ``torch.distributed.tensor.parallel``:
its ``Shard`` placements split a dimension in torch's ``chunk`` sizes, while vLLM pads the
vocabulary to a multiple of 64 before splitting it (rank 0 of 2 holds 1024 of 2000 rows,
torch would give it 1000), and fused tensors (gate_up of fused experts) are split per block;
its ``loss_parallel`` needs DTensor logits in that placement; and DTensor parameters would
put the optimizer's per-shard work (APOLLO's projections, rounding the update into
vLLM's memory) behind DTensor dispatch. The collectives are torch.distributed's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .hf_model import decoder_layers


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


class VocabParallelNLL(torch.autograd.Function):
    """-log softmax(logits)[target] per row, the logits split by vocabulary across the group:
    this rank holds columns ``[start, start + logits.shape[-1])``. Three all-reduces of one
    number per row (max, sum of exp, the target's logit); the gradient is this rank's columns
    of softmax - one_hot(target), as ``F.cross_entropy``'s."""

    @staticmethod
    def forward(ctx, logits, target, start, group):
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]
        outside = (target < start) | (target >= start + logits.shape[-1])
        local = (target - start).clamp(0, logits.shape[-1] - 1)
        target_logit = shifted.gather(1, local[:, None])[:, 0].masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        softmax[rows, local] -= (~outside).to(softmax.dtype)
        return softmax * grad[:, None], None, None, None


@dataclass
class VocabShard:
    """This rank's columns of the logits; ``nll`` is the loss functions' ``token_nll``."""

    start: int
    length: int
    group: object = None

    def nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return VocabParallelNLL.apply(logits, targets, self.start, self.group)


@dataclass
class TensorParallelLayout:
    """What ``parallelize`` did: the parameters split across ranks (their gradients are
    parts of one), the replicated ones whose gradients must be summed, and the vocabulary."""

    rank: int
    size: int
    group: object
    split: list[str] = field(default_factory=list)
    replicated_in_region: list[str] = field(default_factory=list)
    replicated: list[str] = field(default_factory=list)
    vocab: VocabShard | None = None
    # Split 2-D weights: name -> (split dim, start, the whole matrix's shape), for the optimizer.
    split_matrices: dict[str, tuple[int, int, tuple[int, int]]] = field(default_factory=dict)


def _first_split_dim(shards: dict, name: str) -> int | None:
    boxes = shards.get(name) or []
    return boxes[0][0] if boxes else None


def _vocab_parallel_embedding(module: torch.nn.Embedding, start: int, group) -> None:
    rows = module.weight.shape[0]
    pad = module.padding_idx  # a global id: this rank's row for it, if it holds it
    local_pad = pad - start if pad is not None and start <= pad < start + rows else None

    def forward(ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < start) | (ids >= start + rows)
        out = F.embedding((ids - start).clamp(0, rows - 1), module.weight, local_pad)
        return reduce_from_region(out.masked_fill(outside[..., None], 0.0), group)

    module.forward = forward


def _row_parallel_linear(module: torch.nn.Linear, group) -> None:
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_region(F.linear(x, module.weight), group)
        return out if module.bias is None else out + module.bias  # the bias once, not once per rank

    module.forward = forward


def _enter_region(module: torch.nn.Module, group) -> None:
    """The block's hidden states enter through ``copy_to_region``."""

    def pre_hook(_module, args, kwargs):
        if args:
            return (copy_to_region(args[0], group), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": copy_to_region(kwargs["hidden_states"], group)}

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _leave_region(module: torch.nn.Module, group) -> None:
    module.register_forward_hook(lambda _m, _args, out: reduce_from_region(out, group))


def _local_heads(attention: torch.nn.Module) -> None:
    """Grouped-query attention on this rank's heads: vLLM gives each rank a share of the
    query heads and of the k/v heads (or a copy of one when there are fewer than ranks)."""
    head_dim = getattr(attention, "head_dim", None)
    q, k = getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)
    if head_dim and isinstance(q, torch.nn.Linear) and isinstance(k, torch.nn.Linear):
        attention.num_key_value_groups = (q.weight.shape[0] // head_dim) // (k.weight.shape[0] // head_dim)


def parallelize(model: torch.nn.Module, shards: dict[str, list[list[int]]], full_shapes: dict[str, tuple[int, ...]],
                rank: int, size: int, group=None) -> TensorParallelLayout:
    """Add the collectives of tensor parallelism to ``model`` (see the module docstring).
    ``shards``: every parameter's split ([] or absent: replicated); ``full_shapes``: the
    whole parameters' shapes. Raises ``ValueError`` for a split it cannot compute with."""
    layout = TensorParallelLayout(rank, size, group)
    params = dict(model.named_parameters())
    experts = [n for n in params if params[n].ndim == 3 and _first_split_dim(shards, n) == 0]
    if experts:  # each rank would hold some experts whole: transformers' experts module indexes them all
        raise ValueError(f"{experts[0]} is split by expert (expert parallel), which training does not support yet; "
                         "serve without --enable-expert-parallel to train")
    for name in params:
        (layout.split if _first_split_dim(shards, name) is not None else layout.replicated).append(name)
        boxes = shards.get(name) or []
        if len(boxes) == 1 and len(boxes[0]) == 3 and params[name].ndim == 2:
            layout.split_matrices[name] = (boxes[0][0], boxes[0][1], tuple(full_shapes[name]))
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = f"{names[id(embedding)]}.weight"
    if _first_split_dim(shards, emb_name) == 0:
        _vocab_parallel_embedding(embedding, shards[emb_name][0][1], group)
    elif emb_name in layout.split:
        raise ValueError(f"{emb_name} is split on dim {_first_split_dim(shards, emb_name)}, not by vocabulary")
    head_name = f"{names[id(head)]}.weight"
    head_dim = _first_split_dim(shards, head_name) if head_name in params else _first_split_dim(shards, emb_name)
    if head_dim == 0:
        start = (shards.get(head_name) or shards[emb_name])[0][1]
        layout.vocab = VocabShard(start, head.weight.shape[0], group)
        _enter_region(head, group)
    elif head_dim is not None:
        raise ValueError(f"the LM head is split on dim {head_dim}, not by vocabulary")
    for layer in decoder_layers(model):
        layer_name = names[id(layer)]
        for child_name, block in layer.named_children():
            prefix = f"{layer_name}.{child_name}."
            inside = [n for n in params if n.startswith(prefix)]
            if not any(n in layout.split for n in inside):
                continue
            _enter_region(block, group)
            layout.replicated_in_region += [n for n in inside if n not in layout.split]
            for module_name, module in block.named_modules():
                full = f"{prefix}{module_name}".rstrip(".")
                own = {leaf: _first_split_dim(shards, f"{full}.{leaf}") for leaf, _ in module.named_parameters(recurse=False)}
                if isinstance(module, torch.nn.Linear) and own.get("weight") == 1:
                    _row_parallel_linear(module, group)
                elif not isinstance(module, torch.nn.Linear) and any(
                        d is not None and d == params[f"{full}.{leaf}"].ndim - 1 for leaf, d in own.items()):
                    _leave_region(module, group)  # fused experts: their down projection split on its inner dim
                if hasattr(module, "num_key_value_groups"):
                    _local_heads(module)
    model.hogwild_tensor_parallel = layout
    return layout


def sync_gradients(model: torch.nn.Module, layout: TensorParallelLayout) -> None:
    """Sum the gradient parts of the replicated parameters inside regions."""
    params = dict(model.named_parameters())
    for name in layout.replicated_in_region:
        grad = params[name].grad
        if grad is not None:
            dist.all_reduce(grad, group=layout.group)


def global_grad_norm(model: torch.nn.Module, layout: TensorParallelLayout) -> torch.Tensor:
    """The 2-norm of the whole model's gradient: split parameters' squares summed across
    ranks, replicated ones (equal on every rank after ``sync_gradients``) counted once."""
    params = dict(model.named_parameters())

    def squares(names):
        grads = [params[n].grad for n in names if params[n].grad is not None]
        return sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=next(model.parameters()).device))

    split = squares(layout.split)
    dist.all_reduce(split, group=layout.group)
    return (split + squares(layout.replicated)).sqrt()


@torch.no_grad()
def sync_replicated(model: torch.nn.Module, layout: TensorParallelLayout) -> None:
    """Make every rank's copy of each replicated parameter rank 0's: rounding the same
    update into bf16 draws different random bits on each rank."""
    params = dict(model.named_parameters())
    for name in layout.replicated:
        param = params[name]
        if not param.requires_grad:
            continue
        if param.is_contiguous():
            dist.broadcast(param.data, src=0, group=layout.group)
        else:
            value = param.data.contiguous()
            dist.broadcast(value, src=0, group=layout.group)
            param.data.copy_(value)

"""One strided view of a vLLM parameter for a Hugging Face tensor, solved from where vLLM's
loader copied its pieces (``weight_mapping`` records them); on a tensor-parallel rank, the
view of the part of the tensor that rank holds. Pure geometry on meta tensors: no weight
is read. Runs in vLLM's model worker."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Piece:
    """One recorded copy: ``chain(hf_tensor)`` lands on ``param.as_strided(shape, stride, offset)``."""

    tensor: str
    chain: tuple
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class NotAView(Exception):
    pass


def _replay(t: torch.Tensor, chain, base: torch.Tensor) -> torch.Tensor:
    """``chain`` applied to ``t`` (a meta view of ``base``); every step must stay a view."""
    for op, args, kwargs in chain:
        if op == "contiguous":
            continue  # same values in the same logical order
        t = getattr(t, op)(*args, **dict(kwargs))
        if isinstance(t, (tuple, list)):
            continue  # a multi-output op: the next step is its __getitem__
        if not (t._is_view() and t._base is base):
            raise NotAView(f"{op}{args} makes a copy")
    return t


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, size = [], 1
    for n in reversed(shape):
        strides.append(size)
        size *= max(int(n), 1)
    return tuple(reversed(strides))


def _digits(target: int, sizes, strides) -> list[int] | None:
    """``target`` as sum(q_i * strides_i) with 0 <= q_i < sizes_i (largest strides first), or None."""
    q = [0] * len(sizes)
    for i in sorted((i for i in range(len(sizes)) if sizes[i] > 1 and strides[i] > 0), key=lambda i: -strides[i]):
        q[i] = min(target // strides[i], sizes[i] - 1)
        target -= q[i] * strides[i]
    return q if target == 0 else None


def _unravel(position: int, shape, strides) -> list[int]:
    return [(position // strides[d]) % shape[d] if shape[d] > 0 else 0 for d in range(len(shape))]


def _blocks(spans: list[tuple[list[int], list[int]]], shape) -> tuple[int, int, int, int] | None:
    """(dim, start, length, blocks) when the pieces' HF boxes (first, last index) cover, along
    one dim, the same part of each of ``blocks`` equal blocks of it and one box otherwise: a
    fused tensor (gate and up stacked) whose blocks are each split across ranks."""
    runs = []
    for d in range(len(shape)):
        intervals = sorted({(first[d], last[d]) for first, last in spans})
        merged = [list(intervals[0])]
        for lo, hi in intervals[1:]:
            if lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        runs.append(merged)
    split = [d for d, r in enumerate(runs) if len(r) > 1]
    if len(split) != 1:
        return None
    d = split[0]
    k, (lo, hi) = len(runs[d]), runs[d][0]
    if shape[d] % k or any(r != [lo + b * shape[d] // k, hi + b * shape[d] // k] for b, r in enumerate(runs[d])):
        return None
    return d, lo, hi - lo + 1, k


def solve_view(shape, dtype, pieces: list[Piece], param_numel: int,
               shards: bool = False) -> tuple[int, tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(offset, stride, shard) of the one strided view of the parameter that, pushed
    through each piece's chain, lands exactly on that piece's region; raises ``NotAView``.

    Each chain is replayed on a contiguous meta tensor of the HF shape to learn which
    HF indices the piece holds; the strides of the HF dims follow from the piece's
    region (or, for a dim no piece spans, e.g. experts stacked from per-expert
    copies, from the pieces' positions); then every piece is checked by replaying
    its chain on the solved view of a meta parameter. The pieces must cover the
    whole HF tensor, or, with ``shards`` (a tensor-parallel rank), a box of it: then
    ``shard`` says which part ((dim, start, length) per split dim) and the view is of
    that part only; or the same part of each of k equal blocks along one dim, stacked
    ((dim, start, length, k): a fused gate/up whose halves are each split)."""
    nd, c = len(shape), _contiguous_strides(shape)
    source = torch.empty(max(math.prod(shape), 1), dtype=dtype, device="meta")
    strides: list[int | None] = [None] * nd
    references = []  # (HF index of the piece's first element, its position in the parameter)
    spans = []  # (first, last) HF index of each piece
    low, high = list(shape), [-1] * nd  # the box of HF indices the pieces hold
    covered = 0
    for p in pieces:
        y = _replay(source.as_strided(shape, c, 0), p.chain, source)
        if tuple(y.shape) != p.shape:
            y = y.broadcast_to(p.shape)
        first = _unravel(y.storage_offset(), shape, c)
        last = _unravel(y.storage_offset() + sum((n - 1) * s for n, s in zip(y.shape, y.stride())), shape, c)
        low, high = [min(a, b) for a, b in zip(low, first)], [max(a, b) for a, b in zip(high, last)]
        references.append((first, p.offset))
        spans.append((first, last))
        covered += math.prod(p.shape)
        for d in range(nd):
            if shape[d] <= 1 or first[d] + 1 >= shape[d]:
                continue
            q = _digits(c[d], p.shape, y.stride())
            if q is None:
                continue
            s = sum(qi * si for qi, si in zip(q, p.stride))
            if strides[d] is not None and strides[d] != s:
                raise NotAView(f"dim {d}: the pieces disagree on its stride ({strides[d]} vs {s})")
            strides[d] = s
    box = tuple(h - lo + 1 for lo, h in zip(low, high))
    if covered != math.prod(shape) and not shards:
        raise NotAView(f"the copies cover {covered} of its {math.prod(shape)} elements")
    if covered != math.prod(box):
        blocked = _blocks(spans, shape) if shards else None
        if blocked is None:
            raise NotAView(f"the copies ({covered} elements) do not cover one box of the tensor, nor one part of each of equal blocks")
        return _solve_blocked(shape, strides, references, spans, blocked, covered, param_numel)
    unknown = [d for d in range(nd) if strides[d] is None and box[d] > 1]
    if unknown:
        rows = [[1.0] + [float(first[d]) for d in unknown] for first, _ in references]
        rhs = [float(pos - sum(first[d] * strides[d] for d in range(nd) if strides[d] is not None)) for first, pos in references]
        solution = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
        for k, d in enumerate(unknown):
            strides[d] = int(round(solution[k + 1]))
    for d in range(nd - 1, -1, -1):  # extent-1 dims: any stride works, take the contiguous one
        if strides[d] is None:
            strides[d] = strides[d + 1] * shape[d + 1] if d + 1 < nd else 1
    if any(s < 0 for s in strides):
        raise NotAView(f"negative stride {strides}")
    first, position = references[0]
    offset = position - sum(i * s for i, s in zip(first, strides))  # of the whole tensor's first element
    box_offset = offset + sum(i * s for i, s in zip(low, strides))
    last = box_offset + sum((n - 1) * s for n, s in zip(box, strides))
    if box_offset < 0 or last >= param_numel:
        raise NotAView(f"the view (offset {box_offset}, stride {strides}) falls outside the parameter")
    # The whole tensor's view, on a meta parameter shifted so that it fits when only a shard is here.
    shift = max(0, -offset)
    extent = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    base = torch.empty(max(param_numel, extent) + shift, dtype=dtype, device="meta")
    view = base.as_strided(shape, strides, offset + shift)
    for p in pieces:
        y = _replay(view, p.chain, base)
        if tuple(y.shape) != p.shape:
            y = y.broadcast_to(p.shape)
        if y.storage_offset() - shift != p.offset or any(n > 1 and a != b for n, a, b in zip(p.shape, y.stride(), p.stride)):
            raise NotAView(f"no single strided view reproduces the copy {p.chain} -> (offset {p.offset}, stride {p.stride})")
    shard = tuple((d, lo, n) for d, (lo, n, whole) in enumerate(zip(low, box, shape)) if n != whole)
    return box_offset, tuple(strides), shard


def _solve_blocked(shape, strides, references, spans, blocked, covered, param_numel):
    """The view of a blocked part (``_blocks``): the blocks' parts stacked along their dim,
    each piece where the view puts it."""
    d, lo, n, k = blocked
    held = list(shape)
    held[d] = n * k
    if covered != math.prod(held):
        raise NotAView("the copies do not cover one part of each block")
    low = [min(first[i] for first, _ in spans) for i in range(len(shape))]

    def local(index):  # an HF index -> its index in the stacked part
        out = [x - lo_i for x, lo_i in zip(index, low)]
        block, within = divmod(index[d] - lo, shape[d] // k)
        out[d] = block * n + within
        return out

    strides = list(strides)
    unknown = [i for i in range(len(shape)) if strides[i] is None and held[i] > 1]
    if unknown:  # dims no piece spans (experts stacked from per-expert copies): from the pieces' positions
        rows = [[1.0] + [float(local(first)[i]) for i in unknown] for first, _ in references]
        rhs = [float(pos - sum(local(first)[i] * strides[i] for i in range(len(shape)) if strides[i] is not None))
               for first, pos in references]
        solution = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
        for j, i in enumerate(unknown):
            strides[i] = int(round(solution[j + 1]))
    for i in range(len(shape) - 1, -1, -1):
        if strides[i] is None:
            strides[i] = strides[i + 1] * held[i + 1] if i + 1 < len(shape) else 1
    first, position = references[0]
    offset = position - sum(i * s for i, s in zip(local(first), strides))
    for first, position in references:
        if offset + sum(i * s for i, s in zip(local(first), strides)) != position:
            raise NotAView("the blocks' parts are not stacked at one stride")
    last = offset + sum((m - 1) * s for m, s in zip(held, strides))
    if offset < 0 or last >= param_numel:
        raise NotAView(f"the view (offset {offset}, stride {strides}) falls outside the parameter")
    shard = tuple((i, low[i], held[i]) for i in range(len(shape)) if i != d and held[i] != shape[i])
    return offset, tuple(strides), tuple(sorted((*shard, (d, lo, n, k))))

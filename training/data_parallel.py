"""Data parallelism across serving replicas: each replica trains its share of every step's
batch on its own copy of the weights, the gradients are summed across replicas before any
weight is written, and every replica takes the same optimizer step.

A step's batch is split by the mode's item weights (``split_by_weight``) and each replica's
micro-batches are weighted by their share of the *whole* batch, so that the summed gradient
is the one a single replica computes on the whole batch (``ModeLoss.weight``: a step's loss
is the weighted mean over its items). ``DataParallel`` holds the group's
``torch.distributed`` process group (gloo on CPU, NCCL on GPU); the functions that split
and fingerprint are plain and checkable by hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GRADIENT_BUCKET_BYTES = 64 << 20  # gradients all-reduced in buckets of this size: one flat copy never holds them all
FINGERPRINT_BLOCK = 1 << 20  # elements a block checksum covers (the unit a catching-up replica receives)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def split_by_weight(items: Sequence, weight: Callable[[object], float], size: int) -> list[list]:
    """``items`` in ``size`` contiguous parts of about equal total weight (a part may be empty
    when there are fewer items than parts): part r is replica r's share of a step."""
    total = sum(weight(item) for item in items)
    parts: list[list] = [[] for _ in range(size)]
    seen = 0.0
    for item in items:
        middle = seen + weight(item) / 2  # the item goes where the middle of its weight falls
        parts[min(size - 1, int(middle * size / total) if total > 0 else 0)].append(item)
        seen += weight(item)
    return parts


@torch.no_grad()
def block_checksums(tensor: torch.Tensor, block: int = FINGERPRINT_BLOCK) -> torch.Tensor:
    """Two int64 sums of each ``block`` elements of ``tensor``'s bit patterns: the plain sum and
    the sum weighted by position in the block (so that a swap of two values shows too).
    Shape (n_blocks, 2); any change of any bit of one element changes its block's pair."""
    flat = tensor.detach().contiguous().reshape(-1).view(_INT_VIEW[tensor.element_size()]).to(torch.int64)
    out = torch.empty((max(1, -(-flat.numel() // block)), 2), dtype=torch.int64, device=flat.device)
    for i, start in enumerate(range(0, max(1, flat.numel()), block)):
        part = flat[start : start + block]
        out[i, 0] = part.sum()
        out[i, 1] = (part * torch.arange(1, part.numel() + 1, device=part.device)).sum()
    return out


def fingerprint(checksums: Sequence[torch.Tensor]) -> str:
    """One short hex digest of every tensor's block checksums (in the model's order)."""
    digest = hashlib.blake2b(digest_size=8)
    for c in checksums:
        digest.update(c.cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class StepReduction:
    """What every replica knows after a step's all-reduce."""

    loss: float  # the whole batch's loss
    finite: bool  # every replica's losses were finite (else every replica skips the step)
    bytes_sent: int  # what this replica handed to the all-reduce


class DataParallel:
    """One replica's place in the data-parallel group: its rank, the group's size, and the
    collectives of a training step (over ``group``, a ``torch.distributed`` process group)."""

    def __init__(self, group, rank: int, size: int, device: torch.device):
        self.group, self.rank, self.size, self.device = group, rank, size, device
        self.bytes_sent = 0  # handed to all-reduces since this object was made

    def share(self, batch: Sequence, weight: Callable[[object], float]) -> list:
        """This replica's part of a step's ``batch``."""
        return split_by_weight(batch, weight, self.size)[self.rank]

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        self.group.allreduce([tensor]).wait()
        self.bytes_sent += tensor.numel() * tensor.element_size()

    @torch.no_grad()
    def reduce_step(self, params: Sequence[torch.nn.Parameter], loss: float, finite: bool) -> StepReduction:
        """Sum the gradients of ``params`` (a missing one counts as zeros: a replica whose share
        was empty) and the partial losses across replicas, and whether all were finite. Every
        replica then holds the same gradients: nothing has been written to any weight yet."""
        before = self.bytes_sent
        head = torch.tensor([loss, 0.0 if finite else 1.0], dtype=torch.float64, device=self.device)
        self._all_reduce(head)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in list(params) + [None]:
            if p is not None and (not bucket or (size + p.numel() * p.element_size() <= GRADIENT_BUCKET_BYTES
                                                  and p.dtype == bucket[0].dtype)):
                bucket.append(p)
                size += p.numel() * p.element_size()
                continue
            if bucket:
                grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in bucket]
                flat = torch.cat([g.reshape(-1) for g in grads])
                self._all_reduce(flat)
                for q, part in zip(bucket, flat.split([q.numel() for q in bucket])):
                    q.grad = part.view_as(q).clone() if q.grad is None else q.grad.copy_(part.view_as(q))
            bucket, size = ([p], p.numel() * p.element_size()) if p is not None else ([], 0)
        return StepReduction(loss=float(head[0]), finite=bool(head[1] == 0), bytes_sent=self.bytes_sent - before)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every replica (whether to stop: all stop at the same step)."""
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        self.group.broadcast(value, 0).wait()
        return bool(value.item())

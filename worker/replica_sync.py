"""What replicas of a group exchange about their weights, over the group's process group:
each one's fingerprint (compared after every job), and the catch-up of a replica that
joins with other weights (the blocks that differ from the source's, and its optimizer).

Every function here is a collective: every replica of the group calls it, in the same
order, with its own model. ``group`` is a ``torch.distributed`` process group used
directly (``allgather``, ``broadcast``): it is not the trainer's default group, which
tensor parallelism owns.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from hogwild.training.data_parallel import FINGERPRINT_BLOCK, block_checksums, fingerprint


class GroupRefused(Exception):
    """The replicas cannot train as one group (different models, tensor parallel sizes): each serves on, none trains."""


def _all_gather(group, tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    group.allgather([parts], [tensor]).wait()
    return parts


def _broadcast(group, tensor: torch.Tensor, root: int) -> None:
    group.broadcast(tensor, root).wait()


def _broadcast_bytes(group, data: bytes | None, root: int, device: torch.device) -> bytes:
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    _broadcast(group, length, root)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data
              else torch.empty(int(length.item()), dtype=torch.uint8, device=device))
    if buffer.numel():
        _broadcast(group, buffer, root)
    return bytes(buffer.cpu().numpy())


def gather_numbers(group, value: int, device: torch.device) -> list[int]:
    """Every replica's ``value`` (an int64), by rank."""
    return [int(t.item()) for t in _all_gather(group, torch.tensor([value], dtype=torch.int64, device=device))]


def structure_id(model: torch.nn.Module) -> int:
    """The model's parameter names, shapes and dtypes as one number: replicas must agree on it."""
    digest = hashlib.blake2b(digest_size=7)
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return int.from_bytes(digest.digest(), "little")


def model_checksums(model: torch.nn.Module) -> list[torch.Tensor]:
    return [block_checksums(p) for _, p in model.named_parameters()]


@dataclass
class Comparison:
    """Every replica's fingerprint, and the first tensor where one differs from replica 0's."""

    fingerprints: list[str]
    consistent: bool
    first_difference: str | None = None  # "replica R: tensor NAME"


def compare(group, model: torch.nn.Module, device: torch.device) -> Comparison:
    """Every replica's fingerprint (its per-tensor checksums), compared with replica 0's."""
    names = [name for name, _ in model.named_parameters()]
    sums = model_checksums(model)
    per_tensor = torch.stack([s.sum(dim=0) for s in sums]).to(device)  # (tensors, 2)
    everyone = [p.cpu() for p in _all_gather(group, per_tensor)]
    prints = [fingerprint([row for row in p]) for p in everyone]
    for rank, p in enumerate(everyone[1:], start=1):
        differs = (p != everyone[0]).any(dim=1).nonzero()
        if differs.numel():
            return Comparison(prints, False, f"replica {rank}: tensor {names[int(differs[0])]}")
    return Comparison(prints, True)


@dataclass
class CatchUp:
    """What a sync did: which replica's weights every replica took, and what moved."""

    source: int
    blocks_sent: int
    bytes_sent: int  # weight blocks the source broadcast
    optimizer_bytes: int
    received: bool  # this replica's weights or optimizer changed
    weights_version: int  # the version every replica now serves
    seconds: float

    def as_dict(self) -> dict:
        return dict(vars(self))


@torch.no_grad()
def catch_up(group, rank: int, trainer, weights_version: int, tensor_parallel_size: int, device: torch.device) -> CatchUp:
    """Make every replica's weights and optimizer the source's: the replica whose optimizer has
    taken the most steps (it has applied the most group updates; ties: the lowest rank).
    Only the blocks of ``FINGERPRINT_BLOCK`` elements that differ somewhere are sent: a
    replica restarted from an older copy on disk gets what changed since, never more than
    the whole weights. Raises ``GroupRefused`` when the replicas serve different models."""
    started = time.perf_counter()
    model = trainer.model
    mine = torch.tensor([trainer.global_step, weights_version, tensor_parallel_size, structure_id(model),
                         int(trainer.optimizer is not None)], dtype=torch.int64, device=device)
    metas = [m.cpu().tolist() for m in _all_gather(group, mine)]
    if len({m[2] for m in metas}) > 1 or metas[0][2] > 1:
        raise GroupRefused("replica groups need tensor parallel size 1 on every replica (tensor parallel sizes: "
                           f"{[m[2] for m in metas]}); a group of tensor-parallel replicas is not supported yet")
    if len({m[3] for m in metas}) > 1:
        raise GroupRefused("the replicas serve different models (their parameter names, shapes or dtypes differ)")
    source = max(range(len(metas)), key=lambda r: (metas[r][0], -r))
    params = [p for _, p in model.named_parameters()]
    sums = model_checksums(model)
    flat = torch.cat([s.reshape(-1) for s in sums]).to(device)
    everyone = [p.cpu().view(-1, 2) for p in _all_gather(group, flat)]
    differs = torch.zeros(everyone[0].shape[0], dtype=torch.bool)
    for other in everyone:
        differs |= (other != everyone[source]).any(dim=1)
    blocks, sent, received, first = 0, 0, False, 0
    for p, s in zip(params, sums):
        flat_p = p.data.reshape(-1)
        for b in differs[first : first + s.shape[0]].nonzero().flatten().tolist():
            part = flat_p[b * FINGERPRINT_BLOCK : (b + 1) * FINGERPRINT_BLOCK]
            buffer = part.contiguous().to(device)
            _broadcast(group, buffer, source)
            if rank != source:
                part.copy_(buffer)
                received = True
            blocks, sent = blocks + 1, sent + buffer.numel() * buffer.element_size()
        if rank != source and flat_p.data_ptr() != p.data.data_ptr():  # reshape copied a non-contiguous view
            p.data.copy_(flat_p.view_as(p))
        first += s.shape[0]
    optimizer_bytes = 0
    if any(m[0] != metas[source][0] or m[4] != metas[source][4] for m in metas):
        state = trainer.save_state() if rank == source else None
        tensors = _broadcast_bytes(group, state[0] if state else None, source, device)
        meta = _broadcast_bytes(group, state[1] if state else None, source, device)
        optimizer_bytes = len(tensors) + len(meta)
        if rank != source:
            if meta:
                trainer.restore_state(tensors, meta)
            else:
                trainer.optimizer, trainer.structure, trainer.hyper, trainer.global_step = None, None, None, metas[source][0]
            received = True
    anyone_received = blocks > 0 or optimizer_bytes > 0
    version = max(m[1] for m in metas) + int(anyone_received)
    return CatchUp(source, blocks, sent, optimizer_bytes, received, version, time.perf_counter() - started)

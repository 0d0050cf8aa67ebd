"""What every tensor-parallel rank runs for a command (``contracts.trainer_ranks``), on
its own shard: the same code on each rank, so that their collectives meet. Rank 0 runs
it for the service, the others for ``follower``. At tensor parallel size 1 the same
functions run alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from hogwild.contracts.manifest import Manifest, rank_manifest_name, read_manifest

from .views import held_shape, served_views


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, token_nll, token_ids: list[int]) -> list[float]:
    """log P(token_ids[p] | token_ids[:p]) for p >= 1."""
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    return (-token_nll(model(input_ids=ids).logits[0, :-1], ids[0, 1:])).tolist()


def optimizer_files(rank: int, size: int) -> tuple[str, str]:
    """The state files of one rank's optimizer (its shard's moments) in a checkpoint's state directory."""
    if size == 1:
        return "optimizer.safetensors", "optimizer.json"
    return f"optimizer.tp{size}.rank{rank}.safetensors", f"optimizer.tp{size}.rank{rank}.json"


def restore_optimizer(trainer, state_dir: Path, manifest: Manifest) -> str | None:
    """Rebuild ``trainer``'s optimizer from this rank's files (``manifest`` says which rank)
    in a checkpoint's state directory, when it saved one. Returns why the saved state was not
    restored (unreadable, or not this model's), else None; the optimizer is then left as it was."""
    rank, size = manifest.tensor_parallel_rank, manifest.tensor_parallel_size
    tensors, meta = (state_dir / name for name in optimizer_files(rank, size))
    if not meta.exists():
        return None
    try:
        trainer.restore_state(tensors.read_bytes(), meta.read_bytes())
    except (OSError, ValueError, KeyError) as exc:
        return f"the saved optimizer state was not restored: {exc}"
    return None


def _place(full: torch.Tensor, shard, part: torch.Tensor) -> None:
    """Write one rank's ``part`` where ``shard`` says it lies in ``full``."""
    target = full
    for dim, start, length, *blocks in shard:
        if blocks:
            size = full.shape[dim] // blocks[0]
            for b, piece in enumerate(part.split(length, dim)):
                target.narrow(dim, b * size + start, length).copy_(piece)
            return
        target = target.narrow(dim, start, length)
    target.copy_(part)


def send_parts(manifest: Manifest, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """A rank other than 0: send rank 0 this rank's part of each split tensor of ``names``, in order."""
    views = {v.name: v for v in manifest.checkpoint_views}
    local = served_views(tensors, [views[n] for n in names])
    for name in names:
        if views[name].shard:
            dist.send(local[name].contiguous(), dst=0)


class GatheredTensors:
    """Rank 0: the checkpoint's tensors whole, each gathered from the ranks when it is read
    and dropped after (no rank ever holds the whole model). Read them in ``names``'
    order; ``drain`` takes the rest, so the other ranks' sends always complete."""

    def __init__(self, session: Path, manifest: Manifest, tensors: dict[str, torch.Tensor], names: list[str]):
        size = manifest.tensor_parallel_size
        self.ranks = [manifest] + [read_manifest(session, rank_manifest_name(r)) for r in range(1, size)]
        self.views = [{v.name: v for v in m.checkpoint_views} for m in self.ranks]
        self.local = served_views(tensors, [self.views[0][n] for n in names])
        self.names = list(names)
        self.next = 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        while self.names[self.next] != name:  # skipped by the reader: the sends still have to be taken
            self._gather(self.names[self.next])
            self.next += 1
        self.next += 1
        return self._gather(name)

    def _gather(self, name: str) -> torch.Tensor:
        mine = self.views[0][name]
        if not mine.shard:
            return self.local[name]
        full = torch.empty(self._whole_shape(name), dtype=self.local[name].dtype)
        _place(full, mine.shard, self.local[name])
        for rank in range(1, len(self.ranks)):
            view = self.views[rank][name]
            part = torch.empty(held_shape(full.shape, view.shard), dtype=full.dtype, device=self.local[name].device)
            dist.recv(part, src=rank)
            _place(full, view.shard, part.cpu())
        return full

    def _whole_shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape: along each split dim, as far as the ranks' parts reach."""
        shape = list(self.views[0][name].shape)
        for dim, _, _, *blocks in self.views[0][name].shard:
            reach = max(start + length for view in self.views for d, start, length, *_ in view[name].shard if d == dim)
            shape[dim] = reach * (blocks[0] if blocks else 1)
        return tuple(shape)

    def drain(self) -> None:
        while self.next < len(self.names):
            self._gather(self.names[self.next])
            self.next += 1

"""The reward heads (BTRM) the trainer holds: what they were trained with, their
optional private trunk LoRA, scoring, and how they are saved with a checkpoint and
restored at start-up (both or neither)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from hogwild.contracts.protocol import HeadScores, HeadScoresOp, OpError
from hogwild.training.btrm import RewardHeads
from hogwild.training.lora import factors_from_bytes, factors_to_bytes

from .model_access import ModelAccess

TRUNK_LORA_R, TRUNK_LORA_ALPHA = 16, 32  # the reward heads' optional trunk LoRA


class ThreadLora:
    """A LoRA added to its target Linears' outputs by forward hooks, only on a thread inside
    ``reading``: the model's structure never changes (no peft attach), so a scoring forward
    runs beside a training job, whose forwards on other threads never see it."""

    def __init__(self):
        self._local = threading.local()
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def hook(self, access: ModelAccess, names: set[str]) -> None:
        """Hooks on exactly ``names`` (plain-model module names); changed under the structure
        lock, so no forward iterates a module's hooks meanwhile. A no-op once they are there."""
        if set(self._hooks) == names:
            return
        with access.restructuring() as model:
            for name in set(self._hooks) - names:
                self._hooks.pop(name).remove()
            for name in names - set(self._hooks):
                self._hooks[name] = model.get_submodule(name).register_forward_hook(self._add(name))

    def _add(self, name: str):
        def add(module, args, out):
            factors = getattr(self._local, "factors", None)
            if factors is None or name not in factors:
                return None  # another thread (a job's forward), or no LoRA: untouched
            a, b, scaling = factors[name]
            # peft's LoRA forward without dropout: bit for bit the scores of the attached adapter
            return (out + F.linear(F.linear(args[0].to(a.dtype), a), b) * scaling).to(out.dtype)
        return add

    @contextmanager
    def reading(self, access: ModelAccess, factors: dict | None) -> Iterator[torch.nn.Module]:
        """``access.reading()`` with ``factors`` (module -> (A, B, scaling)) added on this thread."""
        names = set(factors or ())
        while True:
            self.hook(access, names)
            with access.reading() as model:
                if names <= set(self._hooks):  # not changed by another scoring's heads meanwhile
                    self._local.factors = factors
                    try:
                        yield model
                    finally:
                        self._local.factors = None
                    return


class HeadBook:
    def __init__(self):
        self.heads: RewardHeads | None = None
        self.info: dict | None = None  # names, descriptions, meta-prompt, held-out accuracy, ...
        self.trunk_lora: dict | None = None  # module -> (A, B, scaling) of the heads' private trunk LoRA
        self._lora = ThreadLora()
        self._on_device: tuple[dict, dict] | None = None  # (trunk_lora, its factors on the model's device)

    def replace(self, heads: RewardHeads, info: dict, trunk_lora: dict | None) -> None:
        self.heads, self.info, self.trunk_lora = heads, info, trunk_lora

    def restore(self, saved: Path) -> dict:
        """The heads saved with the checkpoint in ``saved`` (a ``.hogwild`` directory); what was restored."""
        if not (saved / "heads.json").exists():
            return {}
        try:
            heads = RewardHeads.from_bytes((saved / "heads.safetensors").read_bytes(), (saved / "heads.json").read_bytes())
            trunk_lora = None
            if heads.extra.get("trunk_lora"):  # the heads read the trunk through it: both or neither
                trunk_lora = factors_from_bytes((saved / "heads_trunk_lora.safetensors").read_bytes(),
                                                json.loads((saved / "heads_trunk_lora.json").read_text()))
        except (OSError, ValueError, KeyError) as exc:
            return {"heads_error": f"the saved reward heads were not restored: {exc}"}
        self.replace(heads, heads.extra, trunk_lora)
        return {"heads": heads.names}

    def files(self) -> dict[str, bytes]:
        """What a checkpoint saves of the heads (file name -> bytes)."""
        if self.heads is None:
            return {}
        tensors, meta = self.heads.to_bytes(self.info)
        files = {"heads.safetensors": tensors, "heads.json": meta}
        if self.trunk_lora:
            lora, scaling = factors_to_bytes(self.trunk_lora)
            files.update({"heads_trunk_lora.safetensors": lora, "heads_trunk_lora.json": json.dumps(scaling).encode()})
        return files

    def scores(self, access: ModelAccess, op: HeadScoresOp) -> HeadScores:
        """Every wanted head at each position, from one trunk forward beside a running job
        (HOGWILD); the heads' trunk LoRA, if any, is added by hooks on this thread only."""
        if not all(0 <= p < len(op.token_ids) for p in op.positions):
            raise OpError("invalid", f"positions must be within the {len(op.token_ids)} tokens")
        wanted, rows = self.score_rows(access, [(op.token_ids, op.positions)], op.heads)
        return HeadScores(heads=wanted, scores=rows[0])

    def score_last_tokens(self, access: ModelAccess, sequences: list[list[int]], heads: list[str],
                          batch: int = 16) -> list[dict[str, float]]:
        """Each sequence's scores at its last token (RL's ``reward_heads``), ``batch`` sequences a forward."""
        out = []
        for i in range(0, len(sequences), batch):
            wanted, rows = self.score_rows(access, [(ids, [len(ids) - 1]) for ids in sequences[i : i + batch]], heads)
            out += [dict(zip(wanted, row[0])) for row in rows]
        return out

    def score_rows(self, access: ModelAccess, items: list[tuple[list[int], list[int]]],
                   heads: list[str] | None) -> tuple[list[str], list[list[list[float]]]]:
        """The wanted heads (default: all) and, per (token ids, positions) item, one row of scores
        per position: one trunk forward over the items, right-padded (a causal trunk's state at a
        position does not see the padding after it)."""
        book, trunk_lora = self.heads, self.trunk_lora
        if book is None:
            raise OpError("conflict", "no reward heads have been trained on this server yet (POST /train with mode btrm)")
        wanted = heads or book.names
        unknown = [h for h in wanted if h not in book.names]
        if unknown:
            raise OpError("invalid", f"no head {unknown[0]!r}; the heads are {book.names}")
        device = access.device()
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for r, (ids, _) in enumerate(items):
            input_ids[r, : len(ids)], mask[r, : len(ids)] = torch.tensor(ids), 1
        factors = self._factors_on(trunk_lora, device) if trunk_lora else None
        with self._lora.reading(access, factors) as model, torch.no_grad():
            hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                      use_cache=False).last_hidden_state
            picked = [hidden[r, torch.tensor(positions, device=device)] for r, (_, positions) in enumerate(items)]
            scores = book(torch.cat(picked).float().cpu())
        columns = [book.names.index(h) for h in wanted]
        rows, start = [], 0
        for _, positions in items:
            rows.append([[float(row[c]) for c in columns] for row in scores[start : start + len(positions)].tolist()])
            start += len(positions)
        return wanted, rows

    def _factors_on(self, trunk_lora: dict, device: torch.device) -> dict:
        """The trunk LoRA's factors on the model's device, moved once per set of heads."""
        if self._on_device is None or self._on_device[0] is not trunk_lora:
            self._on_device = (trunk_lora, {n: (a.to(device), b.to(device), s) for n, (a, b, s) in trunk_lora.items()})
        return self._on_device[1]

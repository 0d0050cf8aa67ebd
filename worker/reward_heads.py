"""The reward heads (BTRM) the trainer holds: what they were trained with, their
optional private trunk LoRA, scoring, and how they are saved with a checkpoint and
restored at start-up (both or neither)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from hogwild.contracts.protocol import HeadScores, HeadScoresOp, OpError
from hogwild.training.btrm import RewardHeads
from hogwild.training.lora import factors_from_bytes, factors_to_bytes, load_factors

from .model_access import ModelAccess

TRUNK_LORA_R, TRUNK_LORA_ALPHA = 16, 32  # the reward heads' optional trunk LoRA


class HeadBook:
    def __init__(self):
        self.heads: RewardHeads | None = None
        self.info: dict | None = None  # names, descriptions, meta-prompt, held-out accuracy, ...
        self.trunk_lora: dict | None = None  # module -> (A, B, scaling) of the heads' private trunk LoRA

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
        """Every wanted head at each position, from one trunk forward: beside a running job
        (HOGWILD) unless the heads read through their trunk LoRA, which is attached for it."""
        heads, trunk_lora = self.heads, self.trunk_lora
        if heads is None:
            raise OpError("conflict", "no reward heads have been trained on this server yet (POST /train with mode btrm)")
        wanted = op.heads or heads.names
        unknown = [h for h in wanted if h not in heads.names]
        if unknown:
            raise OpError("invalid", f"no head {unknown[0]!r}; the heads are {heads.names}")
        if not all(0 <= p < len(op.token_ids) for p in op.positions):
            raise OpError("invalid", f"positions must be within the {len(op.token_ids)} tokens")
        device = access.device()
        with contextlib.ExitStack() as stack, torch.no_grad():
            if trunk_lora:
                stack.enter_context(access.exclusive())
                load_factors(stack.enter_context(access.adapter(r=TRUNK_LORA_R, alpha=TRUNK_LORA_ALPHA, dropout=0.0)), trunk_lora)
                model = access.model
            else:
                model = stack.enter_context(access.reading())
            hidden = model.base_model(input_ids=torch.tensor([op.token_ids], device=device), use_cache=False).last_hidden_state[0]
            scores = heads(hidden[torch.tensor(op.positions, device=device)].float().cpu())
        columns = [heads.names.index(h) for h in wanted]
        return HeadScores(heads=wanted, scores=[[float(row[c]) for c in columns] for row in scores.tolist()])

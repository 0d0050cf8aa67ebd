"""vLLM's LoRA worker manager, made to serve a trained adapter's new version as soon as a
batch uses it.

The trainer writes every optimizer step of an adapter into the adapter's live file and then
stamps it (``contracts/live_adapter.py``). vLLM's engine asks its LoRA worker manager for the
adapters of every batch before the forward pass (``add_adapter``, once per adapter in the
batch), and loads an adapter only when it is not in its CPU cache yet. Here that call first
reads the adapter's stamp (one 16-byte read); when it differs from the stamp this worker
loaded, the new factors are copied in place, between two forward passes: into the tensors of
vLLM's CPU copy of the adapter (as vLLM's loading makes them: the model's LoRA dtype, B times
the scaling) and, when the adapter holds a LoRA slot, into that slot: through the layers' own
``set_lora`` the first time, then straight into the rows ``set_lora`` was seen to fill (one
batched copy; a layer that lays them out otherwise keeps ``set_lora``). No call from the API
server, no copy on disk, no object rebuilt. An adapter whose layout the copy does not know (a
module that is neither a plain nor a packed linear, e.g. MoE experts; rsLoRA or per-module
ranks) is loaded again through vLLM's own path instead (``load_inplace``). What was served and
how long it took is written beside the stamp (``served``).

If an update fails, the error is logged and the version already loaded stays served until the
trainer's next change (tried again then): an engine must not die for an adapter. Adapters
without a stamp (``--lora-modules``, ``/v1/load_lora_adapter``) are left to vLLM as they are.
Installed in every vLLM process when the plugin is enabled (``general.py``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hogwild.contracts.live_adapter import CONFIG, FACTORS, map_factors, read_stamp, write_served

from . import vllm_internals

logger = logging.getLogger("vllm.hogwild")
_installed = False


@dataclass
class CopyPlan:
    """For one loaded copy of an adapter (``model``, vLLM's ``LoRAModel``) and one live factors
    file (``file``: its inode and size, mapped once): the file's tensors (``sources``, views of
    its pages) and where each lands in the CPU copy (``targets``; ``scaled``: the B ones, times
    ``scaling``), each target's place in the layers' slots (vLLM module, slice, A or B), the
    modules, and for each LoRA slot the adapter was written into: the slot rows of each target,
    once vLLM's own ``set_lora`` was seen to put them there (False: it does not; use it)."""

    model: object
    file: tuple[int, int]
    sources: list[torch.Tensor]
    targets: list[torch.Tensor]
    scaled: list[torch.Tensor]
    scaling: float
    places: list[tuple[str, int, bool]]
    modules: list[str]
    slots: dict[int, list[torch.Tensor] | bool] = field(default_factory=dict)


def copy_plan(manager, lora_model, directory: Path, file: tuple[int, int]) -> CopyPlan | None:
    """How to copy the adapter's live factors into ``lora_model``, or None where its layout is
    not a plain LoRA on plain or packed linear modules."""
    config = json.loads((directory / CONFIG).read_text())
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        return None
    views = map_factors(directory / FACTORS)  # the live pages, mapped for as long as the plan lives
    packed_in = {sub: (packed, i) for packed, subs in manager.packed_modules.items() for i, sub in enumerate(subs)}
    plan = CopyPlan(lora_model, file, [], [], [], config["lora_alpha"] / config["r"], [], [])
    for key, (name, is_a) in vllm_internals.lora_module_names(manager.model, views).items():
        weights, index = lora_model.loras.get(name), None
        if weights is None and name in packed_in:
            name, index = packed_in[name]
            weights = lora_model.loras.get(name)
        if weights is None or name not in manager.modules:
            return None
        side = weights.lora_a if is_a else weights.lora_b
        target = side if index is None else (side[index] if isinstance(side, list) else None)
        if not isinstance(target, torch.Tensor) or target.shape != views[key].shape:
            return None
        plan.sources.append(views[key])
        plan.targets.append(target)
        if not is_a:
            plan.scaled.append(target)
        plan.places.append((name, index or 0, is_a))
    plan.modules = sorted({name for name, _, _ in plan.places})
    return plan


def slot_rows(manager, plan: CopyPlan, index: int) -> list[torch.Tensor] | bool:
    """Each target's rows in LoRA slot ``index``, where vLLM's ``set_lora`` has just put it
    (``lora_a_stacked[slice][index, 0, :rows, :cols]``, B likewise); False if any target is
    not found there (a layer that slices, splits or pads otherwise). Decided on B factors that
    are not all zero, so no empty factor matches by chance (True: not decided yet)."""
    if not all(bool(t.any()) for t in plan.scaled):
        return True
    rows = []
    for target, (name, piece, is_a) in zip(plan.targets, plan.places):
        try:
            stacked = getattr(manager.modules[name], "lora_a_stacked" if is_a else "lora_b_stacked")[piece]
            row = stacked[index, 0, : target.shape[0], : target.shape[1]]
        except (AttributeError, IndexError, TypeError):
            return False
        if row.shape != target.shape or not torch.equal(row, target):
            return False
        rows.append(row)
    return rows


def copy_in_place(manager, plan: CopyPlan, lora_id: int) -> None:
    """The live factors into vLLM's CPU copy (the same operations as vLLM's loading: cast,
    then B times the scaling), then into the adapter's slot rows if it holds a slot: copied
    straight into them where vLLM's ``set_lora`` was seen to put them, else by ``set_lora``."""
    torch._foreach_copy_(plan.targets, plan.sources)
    torch._foreach_mul_(plan.scaled, plan.scaling)
    if lora_id not in manager.lora_index_to_id:
        return
    index = manager.lora_index_to_id.index(lora_id)
    rows = plan.slots.get(index, True)
    if isinstance(rows, list):
        torch._foreach_copy_(rows, plan.targets)  # the rows past the rank stay the zeros set_lora left
        return
    for name in plan.modules:
        weights = plan.model.loras[name]
        manager.modules[name].set_lora(index, weights.lora_a, weights.lora_b)
    if rows is True:
        plan.slots[index] = slot_rows(manager, plan, index)


def update_in_place(worker_manager, plans: dict, lora_id: int, directory: Path) -> bool:
    """Copy the adapter's live factors into what vLLM loaded of it; False where the layout asks
    for vLLM's own loading instead."""
    manager = vllm_internals.lora_model_manager(worker_manager)
    lora_model = manager.get_adapter(lora_id)
    stat = (directory / FACTORS).stat()
    file = (stat.st_ino, stat.st_size)  # a restored or new adapter's file is another inode
    plan = plans.get(lora_id)
    if plan is None or plan.model is not lora_model or plan.file != file:
        plan = plans[lora_id] = copy_plan(manager, lora_model, directory, file)
    if plan is None:
        return False
    copy_in_place(manager, plan, lora_id)
    return True


def install() -> None:
    """Wrap the LRU worker manager's ``add_adapter`` (idempotent; nothing without vLLM's LoRA)."""
    global _installed
    worker_manager = vllm_internals.lru_worker_lora_manager()
    if _installed or worker_manager is None:
        return
    _installed = True
    add_adapter = worker_manager.__dict__["add_adapter"]

    def add_adapter_as_stamped(self, lora_request) -> bool:
        stamp = read_stamp(lora_request.lora_path) if lora_request.lora_path else None
        if stamp is None:
            return add_adapter(self, lora_request)
        loaded = self.__dict__.setdefault("_hogwild_stamps", {})
        plans = self.__dict__.setdefault("_hogwild_plans", {})
        lora_id = lora_request.lora_int_id
        listed = self.list_adapters()
        cached = lora_id in listed
        if cached and loaded.get(lora_id) == stamp:
            return add_adapter(self, lora_request)
        started = time.perf_counter()
        in_place = False
        for gone in set(plans) - listed:  # vLLM dropped it: unmap its file
            del plans[gone]
        if cached:
            try:
                in_place = update_in_place(self, plans, lora_id, Path(lora_request.lora_path))
            except Exception:
                plans.pop(lora_id, None)
                logger.exception("hogwild: adapter %s could not be updated in place; vLLM loads it again",
                                 lora_request.lora_name)
        try:
            result = add_adapter(self, lora_request if in_place or not cached else vllm_internals.reloading(lora_request))
        except Exception:
            if not cached:
                raise  # vLLM's own failure for an adapter it never loaded: its error, as without the plugin
            logger.exception("hogwild: vLLM could not load adapter %s at version %d; it is served as before until "
                             "the trainer's next change", lora_request.lora_name, stamp[0])
            loaded[lora_id] = stamp  # tried once per change, not at every batch
            return add_adapter(self, lora_request)
        loaded[lora_id] = stamp  # read before the update: a step that lands during it is taken at the next batch
        write_served(lora_request.lora_path, stamp, time.perf_counter() - started, in_place)
        return result

    worker_manager.add_adapter = add_adapter_as_stamped

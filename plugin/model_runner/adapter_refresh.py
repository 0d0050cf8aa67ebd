"""vLLM's LoRA worker manager, made to load a trained adapter again when the trainer changed it.

The trainer writes every optimizer step of an adapter into the adapter's live file and then
stamps it (``contracts/adapter_stamp.py``). vLLM's engine asks its LoRA worker manager for the
adapters of every batch before the forward pass (``add_adapter``, once per adapter in the
batch), and loads an adapter only when it is not in its CPU cache yet. Here that call first
reads the adapter's stamp (one 16-byte read); when it differs from the stamp this worker
loaded, the request is passed on with vLLM's ``load_inplace``, so vLLM loads the adapter again
from the live file through its own path (into its CPU cache and, when active, its LoRA slot),
between two forward passes: no call from the API server, no copy on disk. The load's time is
written beside the stamp (``served``).

If the load fails, the error is logged and the version already loaded stays served until the
trainer's next change (tried again then): an engine must not die for an adapter. Adapters without a stamp (loaded
with ``--lora-modules`` or ``/v1/load_lora_adapter``) are left to vLLM as they are.
Installed in every vLLM process when the plugin is enabled (``general.py``).
"""

from __future__ import annotations

import logging
import time

from hogwild.contracts.adapter_stamp import read_stamp, write_served

from . import vllm_internals

logger = logging.getLogger("vllm.hogwild")
_installed = False


def install() -> None:
    """Wrap the LRU worker manager's ``add_adapter`` (idempotent; nothing without vLLM's LoRA)."""
    global _installed
    manager = vllm_internals.lru_worker_lora_manager()
    if _installed or manager is None:
        return
    _installed = True
    add_adapter = manager.__dict__["add_adapter"]

    def add_adapter_as_stamped(self, lora_request) -> bool:
        stamp = read_stamp(lora_request.lora_path) if lora_request.lora_path else None
        if stamp is None:
            return add_adapter(self, lora_request)
        loaded = self.__dict__.setdefault("_hogwild_stamps", {})
        lora_id = lora_request.lora_int_id
        cached = lora_id in self.list_adapters()
        if cached and loaded.get(lora_id) == stamp:
            return add_adapter(self, lora_request)
        started = time.perf_counter()
        try:
            result = add_adapter(self, vllm_internals.reloading(lora_request) if cached else lora_request)
        except Exception:
            if not cached:
                raise  # vLLM's own failure for an adapter it never loaded: its error, as without the plugin
            logger.exception("hogwild: adapter %s could not be loaded again at version %d; the one loaded before "
                             "stays served until the trainer's next change", lora_request.lora_name, stamp[0])
            loaded[lora_id] = stamp  # tried once per change, not at every batch
            return add_adapter(self, lora_request)
        loaded[lora_id] = stamp  # read before the load: a step that lands during it is loaded at the next batch
        write_served(lora_request.lora_path, stamp, time.perf_counter() - started)
        return result

    manager.add_adapter = add_adapter_as_stamped

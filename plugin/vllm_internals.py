"""The vLLM internals the worker-side plugin relies on, in one place.

Checked against vLLM 0.32 (``SUPPORTED``): the weight-transfer dry run that maps
checkpoint tensors onto vLLM's parameters (``sharded_rdt``: its fake tensor and
sink, the layerwise-reload meta copies, the engine's recording stamps, which
vLLM keeps private). ``check_version`` fails loudly at start-up on another vLLM.
"""

from __future__ import annotations

from vllm.distributed.weight_transfer.sharded_rdt_engine import ShardedRDTWeightTransferEngine
from vllm.distributed.weight_transfer.sharded_rdt_fake import BakeSink, FakeRDTTensor
from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, initialize_layerwise_reload

SUPPORTED = ("0.32",)  # major.minor releases these internals were checked against

__all__ = ["BakeSink", "FakeRDTTensor", "LAYERWISE_INFO", "initialize_layerwise_reload", "install_recording_stamps",
           "restore_after_dry_run", "check_version"]


def check_version(version: str) -> str | None:
    """Why this vLLM is not one the plugin was checked against, or None."""
    if any(version == v or version.startswith(v + ".") for v in SUPPORTED):
        return None
    return (f"vLLM {version} is not a version the hogwild plugin was checked against ({', '.join(SUPPORTED)}.x): "
            "its weight mapping and readout rely on vLLM internals")


def install_recording_stamps(model, sink: BakeSink) -> None:
    """Wrap each parameter's original ``weight_loader`` so that a copy during the dry
    run is attributed to (module, parameter). The engine's method uses no state."""
    ShardedRDTWeightTransferEngine._install_recording_stamps(None, model, sink)


def restore_after_dry_run(model) -> None:
    """Put the live tensors back and unwrap the stamps, on the meta copies too (vLLM
    leaves them there, where a later real reload would run through them)."""
    ShardedRDTWeightTransferEngine._restore_after_dry_run(None, model)
    for module in model.modules():
        info = LAYERWISE_INFO.get(module)
        if info is None:
            continue
        for t in (*info.restore_metadata[0].values(), *info.restore_metadata[1].values()):
            loader, added = getattr(t, "weight_loader", None), False
            while loader is not None and hasattr(loader, "_rdt_stamp_inner"):
                added = added or getattr(loader, "_rdt_stamp_added", False)
                loader = loader._rdt_stamp_inner
                t.weight_loader = loader
            if added:
                del t.weight_loader

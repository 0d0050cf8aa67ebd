"""Every vLLM internal the model-worker side of the plugin relies on, in one place.

Checked against vLLM 0.32 (``SUPPORTED``; ``tests/test_vllm_internals.py`` checks each
against vLLM's real classes): where the CPU backend lays weights out anew (the linear
dispatch, the MoE experts, Gated DeltaNet's conv kernels), the model loader's hooks,
the model runners' ``load_model``, the V1 runner's batch (which request owns which rows
at which positions) and each request's sampling arguments, vLLM's custom-op
registration, and the weight-transfer dry run that maps checkpoint tensors onto vLLM's
parameters (its fake tensor and sink, the layerwise-reload meta copies, the engine's
recording stamps, which vLLM keeps private). ``check_version`` says at start-up when
the installed vLLM is not one of these; the plugin then trains nothing and refuses to
read out, with that reason, instead of misreading a changed internal later.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

SUPPORTED = ("0.32",)  # major.minor releases these internals were checked against


def check_version(version: str) -> str | None:
    """Why this vLLM is not one the plugin was checked against, or None."""
    if any(version == v or version.startswith(v + ".") for v in SUPPORTED):
        return None
    return (f"vLLM {version} is not a version the hogwild plugin was checked against ({', '.join(SUPPORTED)}.x): "
            "its weight mapping and readout rely on vLLM internals")


def installed_version_problem() -> str | None:
    import vllm

    return check_version(vllm.__version__)


def _optional(module: str, name: str | None = None):
    """A module (or one of its attributes) that only some builds of vLLM have, else None."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(found, name, None) if name else found


# ---- patch points ------------------------------------------------------------


def linear_dispatch_module():
    """Holds ``dispatch_cpu_unquantized_gemm`` (looked up at call time by vLLM's CPU linear layers)."""
    from vllm.model_executor.layers import utils

    return utils


def gated_deltanet_cpu_kernels():
    """Holds ``_causal_conv1d_fwd_cpu`` and ``_causal_conv1d_update_cpu`` (None without them)."""
    return _optional("vllm.model_executor.layers.mamba.ops.cpu.gdn_attention")


def cpu_moe_experts():
    """``CPUUnquantizedExperts``: ``process_weights_after_loading(layer)`` and ``apply(...)`` (None without it)."""
    return _optional("vllm.model_executor.layers.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts")


def model_loader():
    """(the ``base_loader`` module, whose ``process_weights_after_loading`` it calls; ``BaseModelLoader``)."""
    from vllm.model_executor.model_loader import base_loader

    return base_loader, base_loader.BaseModelLoader


def model_runner_classes() -> list:
    """The V1 model runners whose ``load_model`` the readout tap wraps."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    cpu = _optional("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")
    return [GPUModelRunner] + ([cpu] if cpu is not None else [])


def register_custom_op(name: str, fn, mutates_args: list[str], fake_impl, library) -> None:
    """vLLM's registration helper (its dispatch costs ~2 us a call; torch's ``custom_op`` ~13 us)."""
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(name, fn, mutates_args=mutates_args, fake_impl=fake_impl, target_lib=library)


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


# ---- the V1 runner's batch ------------------------------------------------------


@dataclass
class StepRows:
    """Which request owns which rows of this step's flat batch: request ``i`` owns rows
    ``query_starts[i]:query_starts[i + 1]``, the first at position ``computed[i]``."""

    request_ids: list[str]
    query_starts: list[int]
    computed: list[int]


def step_rows(runner) -> StepRows:
    batch = runner.input_batch
    n = batch.num_reqs
    # Plain lists: indexing numpy arrays one element at a time costs more than the tap's whole loop.
    return StepRows(list(batch.req_ids[:n]), runner.query_start_loc.np[: n + 1].tolist(),
                    batch.num_computed_tokens_cpu[:n].tolist())


def live_request_ids(runner):
    """The ids of the requests the runner holds (finished ones are gone)."""
    return runner.requests


def request_arguments(runner, request_id: str) -> tuple[dict, int] | None:
    """(the request's ``vllm_xargs``, as ``sampling_params.extra_args``; its prompt length), or None."""
    state = runner.requests.get(request_id)
    if state is None:
        return None
    return getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}, int(state.num_prompt_tokens)


# ---- the weight-transfer dry run (``weight_mapping``) ----------------------------


def dry_run_parts():
    """(``FakeRDTTensor``, ``BakeSink``, ``LAYERWISE_INFO``, ``initialize_layerwise_reload``)."""
    from vllm.distributed.weight_transfer.sharded_rdt_fake import BakeSink, FakeRDTTensor
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, initialize_layerwise_reload

    return FakeRDTTensor, BakeSink, LAYERWISE_INFO, initialize_layerwise_reload


def install_recording_stamps(model, sink) -> None:
    """Wrap each parameter's original ``weight_loader`` so that a copy during the dry
    run is attributed to (module, parameter). The engine's method uses no state."""
    from vllm.distributed.weight_transfer.sharded_rdt_engine import ShardedRDTWeightTransferEngine

    ShardedRDTWeightTransferEngine._install_recording_stamps(None, model, sink)


def restore_after_dry_run(model) -> None:
    """Put the live tensors back and unwrap the stamps, on the meta copies too (vLLM
    leaves them there, where a later real reload would run through them)."""
    from vllm.distributed.weight_transfer.sharded_rdt_engine import ShardedRDTWeightTransferEngine
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

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

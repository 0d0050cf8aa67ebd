"""The vLLM internals the plugin reaches through ``vllm_internals``, checked against
vLLM's real classes: a vLLM that changed one fails here, not in a silent readout."""

from __future__ import annotations

import inspect

import pytest

from hogwild.plugin.model_runner import vllm_internals


def test_the_installed_vllm_is_supported_and_others_are_named():
    assert vllm_internals.installed_version_problem() is None
    assert vllm_internals.check_version("0.32.0+cpu") is None and vllm_internals.check_version("0.32.3") is None
    problem = vllm_internals.check_version("0.33.0")
    assert "vLLM 0.33.0 is not a version the hogwild plugin was checked against (0.32.x)" in problem
    assert vllm_internals.check_version("0.320.1") is not None


def test_patch_points_exist_with_the_signatures_the_patches_assume():
    assert callable(vllm_internals.linear_dispatch_module().dispatch_cpu_unquantized_gemm)
    assert list(inspect.signature(vllm_internals.linear_dispatch_module().dispatch_cpu_unquantized_gemm).parameters) == \
        ["layer", "remove_weight"]
    base_loader, loader = vllm_internals.model_loader()
    assert list(inspect.signature(base_loader.process_weights_after_loading).parameters) == \
        ["model", "model_config", "target_device"]
    assert "process_weights_after_loading(model, model_config, target_device)" in inspect.getsource(loader.load_model)
    experts = vllm_internals.cpu_moe_experts()
    assert list(inspect.signature(experts.apply).parameters) == [
        "self", "output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation", "global_num_experts",
        "expert_map", "a1q_scale", "a2_scale", "workspace13", "workspace2", "expert_tokens_meta",
        "apply_router_weight_on_input"]
    assert "replace_parameter" in inspect.getsource(experts.process_weights_after_loading)  # the repack we skip
    kernels = vllm_internals.gated_deltanet_cpu_kernels()
    for name in ("_causal_conv1d_fwd_cpu", "_causal_conv1d_update_cpu"):
        assert {"weight", "is_weight_packed"} <= set(inspect.signature(getattr(kernels, name)).parameters)
    for runner in vllm_internals.model_runner_classes():
        assert "load_model" in runner.__dict__


def test_the_runner_batch_fields_the_readout_tap_reads():
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    batch_init = inspect.getsource(InputBatch)
    for field in ("self._req_ids", "self.num_computed_tokens_cpu", "def num_reqs", "def req_ids"):
        assert field in batch_init, field
    runner_source = inspect.getsource(GPUModelRunner)
    assert "self.query_start_loc = self._make_buffer(" in runner_source
    assert "self.requests: dict[str, CachedRequestState] = {}" in runner_source
    fields = {f.name for f in __import__("dataclasses").fields(CachedRequestState)}
    assert {"sampling_params"} <= fields and "self.num_prompt_tokens" in inspect.getsource(CachedRequestState)


def test_the_weight_transfer_dry_run_parts():
    from vllm.distributed.weight_transfer.sharded_rdt_engine import ShardedRDTWeightTransferEngine

    fake, sink, layerwise_info, initialize = vllm_internals.dry_run_parts()
    assert callable(initialize) and isinstance(layerwise_info, object)
    assert {"copies_by_layer", "current", "copied_names"} <= set(sink.__dataclass_fields__)
    assert hasattr(fake, "_intercept") and hasattr(fake, "_make_child")
    for method in ("_install_recording_stamps", "_restore_after_dry_run"):
        assert "self." not in inspect.getsource(getattr(ShardedRDTWeightTransferEngine, method)).split(":", 1)[1].replace(
            "self,", ""), f"{method} now uses the engine's state: it cannot be called without an engine"


@pytest.mark.parametrize("version", ["0.31.2", "1.0.0"])
def test_an_unsupported_vllm_keeps_training_off_with_the_reason(version, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    assert f"vLLM {version} is not a version" in vllm_internals.installed_version_problem()

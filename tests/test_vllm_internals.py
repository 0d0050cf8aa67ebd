"""The vLLM internals the plugin reaches through ``vllm_internals``, checked against
vLLM's real classes: a vLLM that changed one fails here, not in a silent readout."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

from hogwild.plugin.model_runner import vllm_internals

REPO = Path(__file__).resolve().parents[1]


def _inspector():
    """packaging/inspect_vllm.py, by path (a folder named ``packaging`` would shadow the library)."""
    spec = importlib.util.spec_from_file_location("hogwild_inspect_vllm", REPO / "packaging" / "inspect_vllm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_installed_vllm_is_supported_and_others_are_named():
    assert vllm_internals.installed_version_problem() is None
    assert vllm_internals.check_version("0.32.0+cpu") is None and vllm_internals.check_version("0.32.3") is None
    assert vllm_internals.check_version("0.33.0") is None and vllm_internals.check_version("0.33.2") is None
    problem = vllm_internals.check_version("0.34.0")
    assert ("vLLM 0.34.0 is not a version the hogwild plugin was checked against (run: 0.32.x; inspected only: 0.33.x)"
            in problem)
    assert vllm_internals.check_version("0.320.1") is not None and vllm_internals.check_version("0.330.1") is not None
    # Which were run and which only inspected: the log says so for the latter.
    assert vllm_internals.version_note("0.32.0+cpu") is None
    note = vllm_internals.version_note("0.33.1")
    assert "vLLM 0.33.1 is admitted on inspection only" in note and "tests ran on vLLM 0.32.x" in note


def test_the_installed_vllm_passes_the_inspection_of_every_internal_the_plugin_lists():
    inspector = _inspector()
    site = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]).parent
    rows = inspector.inspect_tree(inspector.Tree.from_dir(site), vllm_internals.INTERNALS)
    assert [r for r in rows if r["status"] != "ok"] == []


def test_the_inspection_fails_what_the_plugin_could_not_use():
    """A tiny vLLM-shaped tree in which each internal is changed the way a release could change it."""
    inspector, I = _inspector(), vllm_internals.Internal
    files = {
        "vllm/__init__.py": "MODULE_ATTRS = {'Thing': '.things:Thing'}\n",
        "vllm/things.py": (
            "from vllm.util import helper\n"
            "class Base:\n    def __init__(self):\n        self.inherited = 1\n"
            "class Thing(Base):\n    field: int = 0\n"
            "    def method(self, a, b, *, c=1):\n        return self.inherited\n"
            "def call_site():\n    helper(1, weight=2)\n"),
        "vllm/util.py": "def helper(*, weight, packed):\n    pass\ndef call_site():\n    helper(weight=1)\n",
    }
    tree = inspector.Tree(files.get, "test")

    def status(internal):
        return inspector.check(tree, internal)

    assert status(I("vllm", "Thing", "class", "", attrs=("field", "inherited", "method")))["status"] == "ok"
    assert status(I("vllm", "Thing", "class", "", attrs=("gone",)))["problems"] == ["has no member 'gone'"]
    assert status(I("vllm", "Thing.method", "method", "", params=("self", "a", "b", "*", "c"), exact=True))["status"] == "ok"
    assert "replacement takes" in status(I("vllm", "Thing.method", "method", "", params=("self", "a", "c"), exact=True))[
        "problems"][0]
    assert status(I("vllm", "Thing.method", "method", "", positional=1))["problems"] == [
        "needs 'b', which the plugin does not pass"]
    assert "uses self" in status(I("vllm", "Thing.method", "method", "", positional=2, stateless=True))["problems"][0]
    assert status(I("vllm", "Thing.method", "method", "", call=False, own=True))["status"] == "ok"
    assert status(I("vllm", "Missing", "function", ""))["status"] == "fail"
    assert status(I("vllm", "Missing", "function", "", optional=True))["status"] == "absent"
    assert "imports it at import time" in status(I("vllm.util", "helper", "function", "", params=("weight", "packed"),
                                                   late_in=("vllm.things",)))["problems"][0]
    keyword_calls = status(I("vllm.util", "helper", "function", "", params=("weight", "packed"), call=False,
                             keywords=("weight", "packed")))["problems"]
    assert keyword_calls == ["line 4 passes arguments by position or without weight, packed"]
    assert inspector.verdict({"0.1.0": [{"status": "fail"}]}, "vllm>=0.1,<0.2", ("0.1",)) == [
        "vllm>=0.1,<0.2 admits vLLM 0.1.0, which fails the inspection",
        "the runtime check admits 0.1.x, which has no passing release inside vllm>=0.1,<0.2"]


def test_the_committed_report_is_of_this_list_and_this_pin():
    inspector = _inspector()
    report = json.loads((REPO / "packaging" / "vllm-inspection.json").read_text())
    listed = [r["internal"] for r in inspector.inspect_tree(inspector.Tree(lambda p: None, "empty"), vllm_internals.INTERNALS)]
    assert report["pin"] == inspector.gpu_pin() and report["problems"] == []
    assert tuple(report["run"]) == vllm_internals.RUN and tuple(report["inspected"]) == vllm_internals.INSPECTED
    for version, rows in report["results"].items():
        assert [r["internal"] for r in rows] == listed, f"{version}: rerun `make inspect-vllm`"


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


def test_the_dry_run_swaps_in_the_meta_copies_layerwise_info_keeps_and_puts_everything_back():
    from vllm.model_executor.model_loader.reload import record_metadata_for_reloading

    _, sink, layerwise_info, initialize = vllm_internals.dry_run_parts()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    live = model[0].weight
    record_metadata_for_reloading(model)  # vLLM does this when it loads a model
    initialize(model)
    meta = layerwise_info.get(model[0]).restore_metadata[0]["weight"]  # what weight_mapping reads the geometry from
    assert model[0].weight is meta and meta.is_meta and meta.shape == live.shape
    vllm_internals.install_recording_stamps(model, sink())
    assert hasattr(meta.weight_loader, "_rdt_stamp_inner")
    vllm_internals.restore_after_dry_run(model)
    assert model[0].weight is live
    # vLLM's own restore leaves the stamp on the meta copy, where a later real reload would run through it.
    assert not hasattr(getattr(meta, "weight_loader", None), "_rdt_stamp_inner")


def test_the_weight_transfer_dry_run_parts():
    from vllm.distributed.weight_transfer.sharded_rdt_engine import ShardedRDTWeightTransferEngine

    fake, sink, _, _ = vllm_internals.dry_run_parts()
    assert {"copies_by_layer", "current", "copied_names"} <= set(sink.__dataclass_fields__)
    assert hasattr(fake, "_intercept") and hasattr(fake, "_make_child")
    for method in ("_install_recording_stamps", "_restore_after_dry_run"):
        assert "self." not in inspect.getsource(getattr(ShardedRDTWeightTransferEngine, method)).split(":", 1)[1].replace(
            "self,", ""), f"{method} now uses the engine's state: it cannot be called without an engine"


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0"])
def test_an_unsupported_vllm_keeps_training_off_with_the_reason(version, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    assert f"vLLM {version} is not a version" in vllm_internals.installed_version_problem()

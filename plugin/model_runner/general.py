"""``vllm.general_plugins`` entry point: runs in every vLLM process.

In each process it makes sure the session directory exists (the API server
creates it while vLLM parses its arguments, before the engine is started, so
the engine and workers inherit its path) and installs these patches (the
first two and the last matter in the worker process, where the model is loaded):

1. On CPU, vLLM lays some weights out anew for its kernels (linear layers, a
   conv1d, MoE experts) and computes with the copies; in-place updates of the
   parameters would then change nothing. ``live_weights`` keeps them live.
2. After the model loader has loaded and post-processed the weights (and before
   warm-up), the weights (each tensor-parallel rank its shard) are published for
   the trainer (``weight_export``), with where each Hugging Face tensor lies in them (``weight_mapping``; what
   ``process_weights_after_loading`` rewrote is watched and never mapped).
   Before it reads the model directory, a checkpoint sync that was killed
   half-way is finished or undone (``hogwild.worker.checkpoint.recover``).
3. Qwen3-VL / Qwen3.5 model files import without torchvision, in every process
   that inspects or loads them (``torchvision_free``).
4. When ``VLLM_READOUT_VECTORS`` is set, the model runner's ``load_model``
   also taps every decoder layer for concept readouts (``readout_tap``).
5. vLLM's CPU LoRA ops give requests without an adapter the last LoRA slot's delta;
   ``lora_rows`` makes them add nothing (served adapters: the base answers as alone).
6. vLLM's LoRA worker manager takes a served adapter's new factors when the trainer has
   stamped a change to it since (``adapter_refresh``).

Nothing happens unless ``VLLM_PLUGINS`` names ``hogwild``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hogwild import envs

from .. import session
from . import adapter_refresh, live_weights, lora_rows, torchvision_free, vllm_internals

logger = logging.getLogger("vllm.hogwild")  # under "vllm": vLLM's log handlers print it

_installed = False
_published = False


def register() -> None:
    """Entry point. Idempotent; inert unless the plugin was asked for."""
    global _installed
    if _installed or not session.enabled():
        return
    _installed = True
    torchvision_free.install()  # before vLLM inspects the architecture (in a subprocess that runs this too)
    session.ensure_session_dir()
    live_weights.patch_cpu_dispatch(_publishing)
    live_weights.patch_cpu_moe(_publishing)
    lora_rows.install()
    adapter_refresh.install()
    _patch_model_loader()
    if envs.readout_vectors() is not None:
        # The tap reads the V1 runner's batch; on GPU vLLM 0.32 defaults to V2.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        _patch_model_runner()


def _publishing() -> bool:
    """False where the weights will not be published (e.g. pipeline parallel, a quantized
    base): then vLLM's fast packed path stays. Tensor-parallel ranks publish their shards."""
    from ..trainability import quantization, unsupported_reason

    try:
        config = vllm_internals.current_vllm_config()
        return unsupported_reason(config) is None and quantization(config) is None
    except Exception:
        return True


def _finish_interrupted_checkpoint(model_dir: Path) -> None:
    """A sync killed half-way is finished (or undone) before vLLM reads the files."""
    if not model_dir.is_dir():
        return
    from hogwild.worker.checkpoint import recover

    for action in recover(model_dir):
        logger.warning("hogwild: interrupted checkpoint in %s: %s", model_dir, action)


def _patch_model_loader() -> None:
    from .weight_mapping import watch_post_load

    base_loader, BaseModelLoader = vllm_internals.model_loader()
    original = BaseModelLoader.load_model
    if getattr(original, "hogwild_original", None):
        return
    base_loader.process_weights_after_loading = watch_post_load(base_loader.process_weights_after_loading)

    def load_model_and_publish(self, vllm_config, model_config, prefix: str = ""):
        _finish_interrupted_checkpoint(Path(str(model_config.model)))
        model = original(self, vllm_config, model_config, prefix)
        global _published
        # Only the served model: a speculative-decoding drafter loads here too.
        if not _published and model_config is vllm_config.model_config:
            _published = True
            from .weight_export import publish

            publish(model, vllm_config, Path(session.ensure_session_dir()))
        return model

    load_model_and_publish.hogwild_original = original
    BaseModelLoader.load_model = load_model_and_publish


def _patch_model_runner() -> None:
    for cls in vllm_internals.model_runner_classes():
        original = cls.__dict__.get("load_model")
        if original is None or getattr(original, "hogwild_original", None):
            continue

        def load_model_and_tap(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            if getattr(self, "hogwild_readout", None) is None:
                from .readout_tap import attach

                self.hogwild_readout = attach(self, Path(session.ensure_session_dir()))
            return result

        load_model_and_tap.hogwild_original = original
        cls.load_model = load_model_and_tap

"""Let vLLM import its Qwen3-VL / Qwen3.5 model files where torchvision is not installed.

vLLM 0.32's ``qwen3_vl.py`` (imported by ``qwen3_5.py``, so by the text-only
``Qwen3_5ForCausalLM`` too) imports ``smart_resize`` from transformers'
*torchvision* image-processor module, which imports torchvision unconditionally.
On a CPU stack there is none that works (PyPI's x86_64 wheels all link torch's
CUDA libraries). transformers ships a torchvision-free twin of that module
(``image_processing_pil_qwen2_vl``: the same ``smart_resize``, marked "Copied
from", and the PIL image processor that transformers itself substitutes for the
torchvision one). Only when torchvision is absent, a meta-path finder answers for
exactly that one module name with those two objects; nothing of torchvision is
faked, so whatever really needs it (video processors) still fails loudly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

TARGET = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
SOURCE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        pil = importlib.import_module(SOURCE)
        module.smart_resize = pil.smart_resize
        module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
        module.__all__ = ["Qwen2VLImageProcessor", "smart_resize"]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), origin=f"{__name__} (torchvision-free stand-in)")


def install() -> bool:
    """Install the finder if torchvision is absent; True when it is in place."""
    if importlib.util.find_spec("torchvision") is not None:
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True

"""The readout file format: concept vectors per hooked layer, and their manifest.

``readout.safetensors`` holds one tensor per hooked layer, keyed
``layer_<idx>.vectors``, shape ``(n_concepts, hidden_size)``; ``readout.json``
beside it says ``{"concepts": [...], "layers": [...], "hidden_size": H,
"dtype": "float16"}``. A set is checked whole against the served model before
anything uses it, so a bad file is refused with a message naming the problem
and never half-applied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

VECTORS_FILE = "readout.safetensors"
MANIFEST_FILE = "readout.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ReadoutFileError(ValueError):
    """A vector file or manifest that cannot be used; the message names the problem."""


def vectors_key(layer: int) -> str:
    return f"layer_{layer}.vectors"


@dataclass(frozen=True)
class VectorSet:
    """One complete, checked set of concept vectors (kept in fp32 for the dot products)."""

    concepts: tuple[str, ...]
    layers: tuple[int, ...]
    hidden_size: int
    dtype: str
    vectors: dict[int, torch.Tensor]  # layer -> (n_concepts, hidden_size), float32

    @property
    def manifest(self) -> dict:
        return {"concepts": list(self.concepts), "layers": list(self.layers), "hidden_size": self.hidden_size,
                "dtype": self.dtype}

    def stacked(self) -> torch.Tensor:
        """(n_layers, n_concepts, hidden_size), in manifest layer order."""
        return torch.stack([self.vectors[layer] for layer in self.layers])


def default_manifest_path(vectors_path: Path) -> Path:
    return Path(vectors_path).with_name(MANIFEST_FILE)


def load_vector_set(vectors_path: str | Path, manifest_path: str | Path | None = None, *, hidden_size: int | None = None,
                    num_layers: int | None = None) -> VectorSet:
    """Read and check a vector file and its manifest; with ``hidden_size`` and
    ``num_layers`` it is also checked against the model that will use it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    vectors_path = Path(vectors_path)
    manifest_path = Path(manifest_path) if manifest_path else default_manifest_path(vectors_path)
    if not vectors_path.is_file():
        raise ReadoutFileError(f"readout vectors {vectors_path}: no such file")
    if not manifest_path.is_file():
        raise ReadoutFileError(f"readout manifest {manifest_path}: no such file (VLLM_READOUT_MANIFEST names another)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReadoutFileError(f"readout manifest {manifest_path}: not JSON ({exc})") from None
    try:
        tensors = load_file(str(vectors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ReadoutFileError(f"readout vectors {vectors_path}: not a safetensors file ({exc})") from None
    return check_vector_set(manifest, tensors, hidden_size=hidden_size, num_layers=num_layers, where=str(vectors_path))


def check_vector_set(manifest: dict, tensors: dict[str, torch.Tensor], *, hidden_size: int | None = None,
                     num_layers: int | None = None, where: str = "readout") -> VectorSet:
    """Build a VectorSet from a manifest and tensors, or raise ReadoutFileError naming the first problem."""
    if not isinstance(manifest, dict):
        raise ReadoutFileError(f"{where}: the manifest must be a JSON object")
    missing = [k for k in ("concepts", "layers", "hidden_size", "dtype") if k not in manifest]
    if missing:
        raise ReadoutFileError(f"{where}: the manifest lacks {', '.join(missing)}")
    concepts, layers, hidden, dtype = manifest["concepts"], manifest["layers"], manifest["hidden_size"], manifest["dtype"]
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c for c in concepts):
        raise ReadoutFileError(f"{where}: 'concepts' must be a non-empty list of names")
    if len(set(concepts)) != len(concepts):
        raise ReadoutFileError(f"{where}: 'concepts' names a concept twice")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ReadoutFileError(f"{where}: 'layers' must be a non-empty list of layer indices")
    if len(set(layers)) != len(layers):
        raise ReadoutFileError(f"{where}: 'layers' names a layer twice")
    if not isinstance(hidden, int) or hidden <= 0:
        raise ReadoutFileError(f"{where}: 'hidden_size' must be a positive integer")
    if dtype not in DTYPES:
        raise ReadoutFileError(f"{where}: 'dtype' {dtype!r} is not one of {sorted(DTYPES)}")
    if hidden_size is not None and hidden != hidden_size:
        raise ReadoutFileError(f"{where}: hidden_size {hidden} does not match the served model's {hidden_size}")
    if num_layers is not None:
        bad = [x for x in layers if not 0 <= x < num_layers]
        if bad:
            raise ReadoutFileError(f"{where}: layer {bad[0]} is out of range (the served model has layers 0..{num_layers - 1})")
    vectors = {}
    for layer in layers:
        key = vectors_key(layer)
        if key not in tensors:
            raise ReadoutFileError(f"{where}: missing tensor {key!r} for layer {layer} named in the manifest")
        t = tensors[key]
        if tuple(t.shape) != (len(concepts), hidden):
            raise ReadoutFileError(f"{where}: {key} has shape {tuple(t.shape)}, expected ({len(concepts)}, {hidden}) "
                                   "(n_concepts, hidden_size)")
        if not t.is_floating_point():
            raise ReadoutFileError(f"{where}: {key} is {t.dtype}, not floating point")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise ReadoutFileError(f"{where}: {key} contains NaN or infinite values")
        vectors[layer] = t.contiguous()
    extra = sorted(set(tensors) - {vectors_key(x) for x in layers})
    if extra:
        raise ReadoutFileError(f"{where}: tensor {extra[0]!r} is not named by the manifest's layers")
    return VectorSet(tuple(concepts), tuple(layers), hidden, dtype, vectors)


def save_vector_set(vector_set: VectorSet, out_dir: str | Path) -> Path:
    """Write ``readout.safetensors`` and ``readout.json`` into ``out_dir``, each
    atomically (temp file + rename), the manifest last; returns the vectors' path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[vector_set.dtype]
    path = out_dir / VECTORS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({vectors_key(x): vector_set.vectors[x].to(dtype).contiguous() for x in vector_set.layers}, str(tmp),
              metadata={"format": "hogwild-readout"})
    os.replace(tmp, path)
    manifest = out_dir / MANIFEST_FILE
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text(json.dumps(vector_set.manifest, indent=2) + "\n")
    os.replace(tmp, manifest)
    return path


def unit_vector_set(concepts: list[str], vectors: dict[int, torch.Tensor], dtype: str = "float16") -> VectorSet:
    """A VectorSet of unit-normalised rows (what the trainer writes)."""
    layers = sorted(vectors)
    normed = {x: torch.nn.functional.normalize(vectors[x].to(torch.float32), dim=-1) for x in layers}
    hidden = normed[layers[0]].shape[-1]
    return check_vector_set({"concepts": list(concepts), "layers": layers, "hidden_size": hidden, "dtype": dtype},
                            {vectors_key(x): normed[x] for x in layers})

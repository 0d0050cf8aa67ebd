"""Saving and restoring the optimizer's state without pickle.

``torch.save`` of an APOLLO optimizer pickles its projector objects; loading a
pickle executes code. Here every tensor goes into a safetensors file and every
other value into JSON; projector objects are rebuilt from their attributes,
for the two projector classes apollo-torch has and no other.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT_VERSION = 1


def _projector_classes() -> dict:
    from apollo_torch.random_projector import GradientProjector
    from apollo_torch.svd_projector import GaLoreProjector

    return {"GradientProjector": GradientProjector, "GaLoreProjector": GaLoreProjector}


def _split(prefix: str, value, tensors: dict, meta: dict) -> None:
    """Store ``value`` under ``prefix``: tensors in ``tensors``, the rest in ``meta``."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().contiguous().cpu()
    elif value is None or isinstance(value, (bool, int, float, str)):
        meta[prefix] = value
    elif type(value).__name__ in _projector_classes():
        meta[prefix] = {"__class__": type(value).__name__}
        for attr, item in vars(value).items():
            _split(f"{prefix}.{attr}", item, tensors, meta)
    else:
        raise TypeError(f"cannot save optimizer state {prefix} of type {type(value).__name__}")


def optimizer_state_to_bytes(optimizer: torch.optim.Optimizer, extra: dict) -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON bytes) of the optimizer's per-parameter state,
    its parameter groups' settings, and ``extra`` (JSON-able)."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            _split(f"{index[id(param)]}.{key}", value, tensors, meta)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])} for g in optimizer.param_groups]
    document = {"format": FORMAT_VERSION, "groups": groups, "state": meta, "extra": extra}
    return save_tensors(tensors) if tensors else save_tensors({"__empty__": torch.zeros(0)}), json.dumps(document).encode()


def _join(prefix: str, tensors: dict, meta: dict):
    if prefix in tensors:
        return tensors[prefix]
    value = meta[prefix]
    if isinstance(value, dict) and "__class__" in value:
        obj = _projector_classes()[value["__class__"]].__new__(_projector_classes()[value["__class__"]])
        attrs = {key[len(prefix) + 1 :].split(".")[0] for key in (*tensors, *meta) if key.startswith(prefix + ".")}
        for attr in attrs:
            setattr(obj, attr, _join(f"{prefix}.{attr}", tensors, meta))
        return obj
    return value


def read_extra(json_bytes: bytes) -> dict:
    document = json.loads(json_bytes)
    if document.get("format") != FORMAT_VERSION:
        raise ValueError(f"optimizer state format {document.get('format')} is not {FORMAT_VERSION}")
    return document["extra"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensor_bytes: bytes, json_bytes: bytes) -> None:
    """Put saved state into ``optimizer``, built over the same parameters in the same order."""
    document = json.loads(json_bytes)
    if document.get("format") != FORMAT_VERSION:
        raise ValueError(f"optimizer state format {document.get('format')} is not {FORMAT_VERSION}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if [g["n_params"] for g in document["groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError("the saved optimizer state is for a different set of parameters")
    tensors = load_tensors(tensor_bytes)
    meta = document["state"]
    top_keys: dict[int, set[str]] = {}
    for key in (*tensors, *meta):
        if key == "__empty__":
            continue
        i, _, rest = key.partition(".")
        top_keys.setdefault(int(i), set()).add(rest.split(".")[0])
    for i, keys in top_keys.items():
        param = params[i]
        optimizer.state[param] = {
            k: (v.to(param.device) if isinstance(v, torch.Tensor) else v)
            for k, v in ((k, _join(f"{i}.{k}", tensors, meta)) for k in keys)
        }
        projector = optimizer.state[param].get("projector")
        if projector is not None and isinstance(getattr(projector, "ortho_matrix", None), torch.Tensor):
            projector.ortho_matrix = projector.ortho_matrix.to(param.device)

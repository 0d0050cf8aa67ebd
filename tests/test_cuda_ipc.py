"""GPU only: the CUDA IPC path of weight publishing, between two processes.

Skipped where no CUDA device exists (this project's CI machine has none); run
it on a GPU box to check the path the CPU tests cannot reach.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _owner(directory: str, ready, done) -> None:
    from pathlib import Path

    from hogwild.contracts.manifest import Manifest, write_manifest
    from hogwild.plugin.model_runner.weight_export import export_cuda

    layer = torch.nn.Linear(64, 96, bias=True).cuda()
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(2.0)
    manifest = Manifest(model="test", architectures=[], dtype="float32", backend="cuda_ipc",
                        tensors=export_cuda(layer), worker_pid=os.getpid(), vllm_version="test")
    write_manifest(manifest, Path(directory))
    ready.set()
    done.wait(60)
    torch.cuda.synchronize()
    # The other process's in-place writes are visible here, in the owner's own tensors.
    assert float(layer.weight.sum()) == 64 * 96 * 3.0 and float(layer.bias.sum()) == 96 * 5.0


def test_a_second_process_writes_into_published_cuda_weights(tmp_path):
    from hogwild.contracts.manifest import read_manifest
    from hogwild.worker.views import map_tensors

    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    owner = ctx.Process(target=_owner, args=(str(tmp_path), ready, done))
    owner.start()
    assert ready.wait(120)
    tensors = map_tensors(read_manifest(tmp_path))
    assert float(tensors["weight"].sum()) == 64 * 96 * 1.0
    tensors["weight"].add_(2.0)
    tensors["bias"].add_(3.0)
    torch.cuda.synchronize()
    done.set()
    owner.join(120)
    assert owner.exitcode == 0

"""The house rules the layout keeps: each process's code in its own package, small modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_api_server_package_loads_no_trainer_loss_optimizer_or_view_model():
    # A fresh interpreter: import every module of the API server's package, then list what got loaded.
    script = """
import importlib, pkgutil, sys
import hogwild.plugin.api_server as pkg
for m in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"{pkg.__name__}.{m.name}")
print("\\n".join(sorted(sys.modules)))
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    forbidden = [m for m in loaded if m.startswith(("hogwild.training", "hogwild.worker", "apollo_torch", "peft"))]
    assert not forbidden, forbidden
    assert "hogwild.plugin.api_server.routes" in loaded and "hogwild.contracts.protocol" in loaded


def test_of_the_model_worker_package_the_api_server_imports_only_the_list_of_vllm_internals():
    # vllm_internals imports nothing of vLLM, torch or the trainer at import time; the rest of model_runner does.
    for path in (REPO / "plugin" / "api_server").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "model_runner" in (node.module or ""):
                imported = [node.module] if node.module.endswith(".vllm_internals") else [
                    f"{node.module}.{a.name}" for a in node.names]
                assert all(m.endswith("model_runner.vllm_internals") for m in imported), f"{path.name}: {imported}"


def test_no_module_of_the_processes_packages_is_over_450_lines():
    long = {str(p.relative_to(REPO)): n for folder in ("plugin", "worker", "training", "readout", "contracts")
            for p in (REPO / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_every_job_request_has_a_job_kind_in_the_trainer():
    from hogwild.contracts.jobs import JOB_REQUESTS
    from hogwild.worker.kinds import KINDS

    assert set(KINDS) == set(JOB_REQUESTS)
    assert len({r.model_fields["mode"].default for r in JOB_REQUESTS}) == len(JOB_REQUESTS)  # one mode each

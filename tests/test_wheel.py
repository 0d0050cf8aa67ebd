"""Installed as users install it: the wheel, not the editable checkout.

Builds the wheel from a copy of the tree, checks that it holds every module and data
file of the mapped source folders, installs it (non-editable) into a fresh virtual
environment that sees the same vLLM and torch, and from there imports every module and
starts the training subprocess far enough to load every job kind and answer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from hogwild.contracts.protocol import SOCKET_NAME, StatusOp

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"hogwild": "hogwild", "contracts": "hogwild/contracts", "plugin": "hogwild/plugin", "worker": "hogwild/worker",
           "training": "hogwild/training", "readout": "hogwild/readout", "stories": "hogwild/stories"}
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "demo-output", ".cache", "tests")


def source_files() -> dict[str, Path]:
    """Every file the wheel must hold, by its path in the wheel: the mapped folders'
    modules, and the story corpus (package data)."""
    wanted = {}
    for folder, installed in FOLDERS.items():
        for path in (REPO / folder).rglob("*"):
            if path.suffix == ".py" or (folder == "stories" and path.suffix in (".txt", ".md")):
                if "__pycache__" not in path.parts:
                    wanted[f"{installed}/{path.relative_to(REPO / folder)}"] = path
    return wanted


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, tmp / "src", ignore=SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tmp / "src"),
                    "-w", str(tmp / "dist")], check=True, cwd=tmp)
    (found,) = (tmp / "dist").glob("vllm_hogwild-*.whl")
    return found


def test_the_wheel_holds_every_module_and_data_file_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(set(source_files()) - names)
    assert not missing, f"not in the wheel: {missing}"
    assert "hogwild/worker/kinds/sft.py" in names  # the subpackage the hand-written list once missed


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no editable finder), that sees this venv's
    packages (vLLM, torch, ...) after its own: returns its python."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # A plain path line: this venv's .pth files (the editable install's finder among them) are not run.
    (site / "shared-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    return python


def run_installed(python: Path, code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import hogwild
assert "site-packages" in hogwild.__file__, hogwild.__file__
names = [m.name for m in pkgutil.walk_packages(hogwild.__path__, "hogwild.") if not m.name.startswith("hogwild.demo")]
for name in names:
    importlib.import_module(name)
from importlib.metadata import entry_points
plugin = entry_points(group="vllm.general_plugins")["hogwild"].load()
from hogwild.worker.kinds import KINDS
print(hogwild.__file__, len(names), plugin.__module__, sorted(k.__name__ for k in KINDS))
"""


def test_the_installed_wheel_imports_every_module_and_its_entry_points(installed, tmp_path):
    out = run_installed(installed, IMPORT_EVERYTHING, tmp_path)
    where, count, plugin, kinds = out.split(maxsplit=3)
    assert str(installed.parents[1]) in where  # the wheel's copy, not the checkout
    assert int(count) >= 60 and plugin == "hogwild.plugin.model_runner.general"
    assert "SubmitOp" in kinds and "SubmitPreferenceOp" in kinds


def test_the_installed_trainer_starts_with_every_job_kind_and_answers(installed, tmp_path):
    """``python -m hogwild.worker`` from the wheel: it imports the service and every kind
    before it listens, then answers a status request (it waits for a model meanwhile)."""
    from hogwild.plugin.api_server.trainer_client import TrainerClient

    session, state = tmp_path / "session", tmp_path / "state"
    session.mkdir()
    log = (tmp_path / "trainer.log").open("w")
    proc = subprocess.Popen([str(installed), "-m", "hogwild.worker", "--session", str(session), "--state-dir", str(state),
                             "--parent-pid", str(os.getpid()), "--threads", "1"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (session / SOCKET_NAME).exists():
            assert proc.poll() is None, (tmp_path / "trainer.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the trainer did not listen within 300 s"
            time.sleep(0.2)

        async def ask():
            client = TrainerClient(session)
            try:
                return await client.request(StatusOp(), timeout=30, connect_timeout=30)
            finally:
                client.close()

        status = asyncio.run(ask())
        assert status.state == "starting" and status.pid == proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

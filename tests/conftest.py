"""Shared fixtures. End-to-end tests share one real `vllm serve` per model for
the whole session (start-up costs ~35 s on this machine)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import httpx
import pytest

from hogwild import tiny_model
from hogwild.launch import VllmServer

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
# Small limits, so that tests can reach them (the defaults are in plugin/api_server/limits.py).
LIMITS = {"HOGWILD_MAX_SAMPLES": "256", "HOGWILD_MAX_TOKENS": "65536", "HOGWILD_MAX_STEPS": "5000",
          "HOGWILD_MAX_BODY_BYTES": str(4 << 20), "HOGWILD_MAX_QUEUED_JOBS": "4",
          "HOGWILD_TRAINER_MEMORY_LIMIT": str(1 << 30)}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("models") / "tiny-qwen2")


REPO = Path(__file__).resolve().parents[1]


def train_readout_vectors(model_dir: Path, out: Path, layers: list[int]) -> Path:
    """Concept vectors for ``model_dir`` from the project's story corpus; returns readout.safetensors."""
    from hogwild.readout.train import train_model_directory

    return train_model_directory(model_dir, REPO / "stories", out, layers)


@pytest.fixture(scope="session")
def tiny_readout(tiny_model_dir, tmp_path_factory) -> Path:
    return train_readout_vectors(tiny_model_dir, tmp_path_factory.mktemp("readout"), [0, 1])


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


class Served:
    """A running server and what tests need to look inside it."""

    def __init__(self, server: VllmServer, model_dir: Path, session: Path, state_dir: Path):
        self.server, self.model_dir, self.session, self.state_dir = server, model_dir, session, state_dir
        admin = server.env.get("HOGWILD_ADMIN_KEY")
        headers = {**server.headers(), **({"X-Hogwild-Admin-Key": admin} if admin else {})}
        self.http = httpx.Client(base_url=server.url, headers=headers, timeout=300)

    def arena_digest(self, rank: int | None = None) -> str:
        """SHA-256 of every byte of the served weights (the shared arena; a tensor-parallel rank's)."""
        from hogwild.contracts.manifest import rank_arena_name

        return hashlib.sha256((self.session / (rank_arena_name(rank) if rank is not None else "weights.bin")).read_bytes()).hexdigest()

    def complete(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        r = self.http.post("/v1/completions", json={"model": str(self.model_dir), "prompt": prompt_ids,
                                                     "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    def trainer_call(self, body) -> dict:
        """Talk to the training subprocess directly over its ZMQ socket; the result as JSON."""
        from hogwild.plugin.api_server.trainer_client import TrainerClient

        async def go():
            client = TrainerClient(self.session)
            try:
                return (await client.request(body, connect_timeout=10.0)).model_dump()
            finally:
                client.close()

        return asyncio.run(go())


SERVER_LOG_TAIL = 40  # lines of each server's log shown under a failed test


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of the log of each server it used:
    what the server saw is gone with the run's temporary files otherwise."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        server = value.server if isinstance(value, Served) else value if isinstance(value, VllmServer) else None
        if server is not None and server.log_path is not None and server.log_path.exists():
            lines = server.log_path.read_text(errors="replace").splitlines()[-SERVER_LOG_TAIL:]
            report.sections.append((f"server log of {name} (last {len(lines)} lines)", "\n".join(lines)))


@pytest.fixture(scope="session", autouse=True)
def _remove_session_dirs():
    """Every test server's session directory (its weight arena in /dev/shm) goes with the run."""
    yield
    for path in Path("/dev/shm").glob(f"hogwild-test-{os.getpid()}-*"):
        shutil.rmtree(path, ignore_errors=True)


def start_served(model_dir: Path, tmp: Path, name: str, env: dict | None = None, wait_trainer: bool = True,
                 api_key: str | None = API_KEY, copy_model: bool = True, **kwargs) -> tuple[VllmServer, Served]:
    """A real `vllm serve` with the plugin, its session directory at a known path.
    It serves a copy of ``model_dir`` unless told not to: checkpoints write into
    the served directory."""
    if copy_model:
        shutil.copytree(model_dir, tmp / f"{name}-model")
        model_dir = tmp / f"{name}-model"
    session = Path("/dev/shm") / f"hogwild-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    state_dir = tmp / f"{name}-state"
    server = VllmServer(model_dir, log_path=tmp / f"{name}-vllm.log", api_key=api_key,
                        env={"HOGWILD_SESSION_DIR": str(session), "HOGWILD_STATE_DIR": str(state_dir), **(env or {})}, **kwargs)
    server.start(timeout=600)
    if wait_trainer:
        try:
            server.wait_trainer()
        except BaseException:  # a server whose trainer never came up must not outlive the test
            server.stop()
            shutil.rmtree(session, ignore_errors=True)
            raise
    return server, Served(server, model_dir, session, state_dir)


@contextlib.contextmanager
def serving(model_dir: Path, tmp: Path, name: str, **kwargs):
    """``start_served`` for a fixture's life: the handle, then the server stopped and its
    session directory removed."""
    server, handle = start_served(model_dir, tmp, name, **kwargs)
    try:
        yield handle
    finally:
        server.stop()
        shutil.rmtree(handle.session, ignore_errors=True)


@pytest.fixture(scope="session")
def served(tiny_model_dir, tiny_readout, tmp_path_factory):
    # Priority scheduling, vLLM's dev-mode /pause and /resume, and its log of requests sent to the
    # engine: what lets a test see that a score's priority reaches the scheduler (test_operability.py).
    with serving(tiny_model_dir, tmp_path_factory.mktemp("served"), "qwen2", dtype="float32",
                 extra_args=["--scheduling-policy", "priority", "--enable-log-requests"],
                 env={"HOGWILD_ADMIN_KEY": ADMIN_KEY, "VLLM_READOUT_VECTORS": str(tiny_readout), "VLLM_SERVER_DEV_MODE": "1",
                      **LIMITS}) as handle:
        yield handle

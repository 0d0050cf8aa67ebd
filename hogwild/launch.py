"""Start and stop a real ``vllm serve`` with the plugin enabled.

Used by the demo, the benchmarks and the end-to-end tests, so that all three
run the server exactly the way a user does: the ``vllm`` command, with
``VLLM_PLUGINS=hogwild``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> str:
    """The ``vllm`` executable next to this Python (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "vllm"
    return str(beside) if beside.exists() else (shutil.which("vllm") or "vllm")


class VllmServer:
    """``vllm serve MODEL`` on a loopback port, with the plugin, as a context manager."""

    def __init__(self, model: str | Path, *, log_path: str | Path | None = None, api_key: str | None = None,
                 max_model_len: int = 512, dtype: str | None = None, eager: bool = True, host: str = "127.0.0.1", extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, port: int | None = None):
        self.model = str(model)
        self.port = port or free_port()
        self.api_key = api_key
        self.log_path = Path(log_path) if log_path else None
        self.args = ["serve", self.model, "--host", host, "--port", str(self.port),
                     "--max-model-len", str(max_model_len)]
        if dtype:  # vLLM on CPU serves float32 checkpoints as bfloat16 unless told
            self.args += ["--dtype", dtype]
        if eager:
            self.args.append("--enforce-eager")
        if api_key:
            self.args += ["--api-key", api_key]
        self.args += extra_args or []
        self.env = {
            **os.environ,
            "VLLM_PLUGINS": "hogwild",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            # On CPU vLLM sizes its KV cache from this (GiB); ignored on GPU.
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 300.0) -> "VllmServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([vllm_command(), *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy after {timeout:.0f} s{self._log_tail()}")

    def wait_trainer(self, timeout: float = 120.0) -> dict:
        """Wait until ``/train/status`` leaves the starting states (and the parity gate); returns it."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = httpx.get(f"{self.url}/train/status", headers=self.headers(), timeout=30).json()
            if status.get("state") not in ("starting", "verifying", "unavailable"):
                return status
            time.sleep(0.5)
        raise TimeoutError(f"the trainer did not start: {status}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._remove_vllm_channels()

    def _remove_vllm_channels(self) -> None:
        """vLLM's CPU tensor-parallel workers leave their shared-memory channels behind when
        stopped (4 MiB per rank in /dev/shm, and a rendezvous file in /tmp, at every start):
        remove this server's, which its log names."""
        if not self.log_path or not self.log_path.exists():
            return
        for key in set(re.findall(r"file:///tmp/(vllm_dist_[0-9a-f]+)", self.log_path.read_text(errors="replace"))):
            for path in [Path("/tmp") / key, *Path("/dev/shm").glob(f"{key}-*")]:
                path.unlink(missing_ok=True)

    def _log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- server log (tail) ---\n" + "\n".join(tail)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""The session directory that vLLM's processes and the trainer share.

The first vLLM process that loads the plugin (the API server, while vLLM parses
its arguments) creates an owner-only directory and exports its path in
``HOGWILD_SESSION_DIR``; the engine and worker processes it starts inherit it.
It holds the weight arena (on CPU), the weight manifest, the trainer's ZMQ
socket and the lock that elects the one API server process that runs the
trainer. It lives in /dev/shm, so it is removed at exit and stale ones (whose
creating process is gone) are swept at the next start.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from hogwild import envs

SESSION_ENV = "HOGWILD_SESSION_DIR"
PLUGIN_NAME = "hogwild"


def enabled() -> bool:
    """True only when the user named the plugin in ``VLLM_PLUGINS``.

    vLLM loads every installed general plugin when ``VLLM_PLUGINS`` is unset, so
    installing this package must not change a server that did not ask for it.
    """
    names = os.environ.get("VLLM_PLUGINS")
    return names is not None and PLUGIN_NAME in [n.strip() for n in names.split(",")]


def shm_root() -> Path:
    root = envs.shm_dir()
    return root if root.is_dir() else Path(tempfile.gettempdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(root: Path) -> None:
    """Remove session directories of this user whose creating process is gone."""
    prefix = f"hogwild-{os.getuid()}-"
    for entry in root.glob(prefix + "*"):
        try:
            pid = int(entry.name[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def ensure_session_dir() -> Path:
    """The current session directory, creating it (and the env var) if needed."""
    existing = os.environ.get(SESSION_ENV)
    if existing:
        path = Path(existing)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path
    root = shm_root()
    sweep_stale(root)
    path = root / f"hogwild-{os.getuid()}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    os.environ[SESSION_ENV] = str(path)
    creator = os.getpid()
    # Forked children inherit atexit handlers; only the creator removes it.
    atexit.register(lambda: os.getpid() == creator and shutil.rmtree(path, ignore_errors=True))
    return path


def lock_path(session: Path) -> Path:
    return session / "trainer.lock"

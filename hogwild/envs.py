"""Every ``HOGWILD_*`` setting, in one place (as ``vllm.envs`` does for vLLM).

Each is read when asked for, so a test or a restarted process sees the
current environment. The README's settings table lists the same variables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def admin_key() -> str | None:
    """Key for the routes that change the model (else the server's API key)."""
    return os.environ.get("HOGWILD_ADMIN_KEY") or None


def adapter_keys() -> dict[str, list[str]]:
    """``HOGWILD_ADAPTER_KEYS``: a JSON object {key: [adapter names]}: keys that train and delete
    those adapters only. Raises ValueError for anything else."""
    raw = os.environ.get("HOGWILD_ADAPTER_KEYS")
    if not raw:
        return {}
    value = json.loads(raw)
    if not (isinstance(value, dict) and all(isinstance(k, str) and k and isinstance(v, list) and v
                                             and all(isinstance(n, str) and n for n in v) for k, v in value.items())):
        raise ValueError('HOGWILD_ADAPTER_KEYS must be a JSON object {"<key>": ["<adapter>", ...], ...}')
    return value


def allow_unauthenticated_training() -> bool:
    """Training routes on without any key on a non-loopback address."""
    return os.environ.get("HOGWILD_ALLOW_UNAUTHENTICATED_TRAINING") == "1"


def state_dir() -> Path | None:
    """Where the trainer keeps the ledger and the job journal (default: per model)."""
    value = os.environ.get("HOGWILD_STATE_DIR")
    return Path(value) if value else None


def path_roots() -> list[Path] | None:
    """Directories that paths in requests may point into (default: model and state dirs)."""
    value = os.environ.get("HOGWILD_PATH_ROOTS")
    return [Path(p) for p in value.split(os.pathsep) if p] if value else None


def shm_dir() -> Path:
    """Where session directories (the CPU weight arena, the socket) are made."""
    return Path(os.environ.get("HOGWILD_SHM_DIR", "/dev/shm"))


def checkpoint_after_minutes() -> float:
    """Sync this long after the last job that changed the weights; 0: never on its own."""
    return _float("HOGWILD_CHECKPOINT_AFTER_MINUTES", 10.0)


def wait_timeout_s() -> float:
    """How long a `"wait": true` caller is kept waiting for its job's end before a 504 (the job goes on)."""
    return _float("HOGWILD_WAIT_TIMEOUT_S", 3600.0)


def test_faults() -> Path | None:
    """Tests only: a file naming a fault for the trainer to inject (``worker/faults.py``)."""
    value = os.environ.get("HOGWILD_TEST_FAULTS")
    return Path(value) if value else None


def checkpoint_fault_after() -> int | None:
    """Tests only: kill the process at this durable step of a checkpoint sync."""
    return _int("HOGWILD_CHECKPOINT_FAULT_AFTER", 0) or None


def max_samples() -> int:
    return _int("HOGWILD_MAX_SAMPLES", 4096)


def max_tokens() -> int:
    return _int("HOGWILD_MAX_TOKENS", 1 << 20)


def max_steps() -> int:
    return _int("HOGWILD_MAX_STEPS", 100_000)


def max_body_bytes() -> int:
    return _int("HOGWILD_MAX_BODY_BYTES", 64 << 20)


def max_queued_jobs() -> int:
    return _int("HOGWILD_MAX_QUEUED_JOBS", 16)


def max_adapters() -> int:
    """Adapters the trainer holds at most (``/train`` with ``adapter``); vLLM's --max-loras bounds
    only how many are in its LoRA slots at once."""
    return _int("HOGWILD_MAX_ADAPTERS", 64)


def trainer_memory_limit() -> int | None:
    """Bytes a job may need at most (default: whatever the device has free)."""
    return _int("HOGWILD_TRAINER_MEMORY_LIMIT", 0) or None


def trainer_threads() -> int | None:
    """CPU threads of the training process (default: half the cores)."""
    return _int("HOGWILD_TRAINER_THREADS", 0) or None


def readout_vectors() -> Path | None:
    """``VLLM_READOUT_VECTORS``: the concept vectors a server reads out with from start-up."""
    value = os.environ.get("VLLM_READOUT_VECTORS")
    return Path(value) if value else None


def readout_manifest() -> Path | None:
    """``VLLM_READOUT_MANIFEST``: their manifest (default: ``readout.json`` beside the vectors)."""
    value = os.environ.get("VLLM_READOUT_MANIFEST")
    return Path(value) if value else None


def replica_group() -> tuple[str, int, int] | None:
    """This replica's group: (``host:port`` of the rendezvous store, size, rank); None: alone."""
    address = os.environ.get("HOGWILD_GROUP")
    if not address:
        return None
    size, rank = _int("HOGWILD_GROUP_SIZE", 0), _int("HOGWILD_GROUP_RANK", -1)
    if ":" not in address or size < 1 or not 0 <= rank < size:
        raise ValueError(f"HOGWILD_GROUP={address!r} needs host:port, HOGWILD_GROUP_SIZE >= 1 and 0 <= "
                         f"HOGWILD_GROUP_RANK < size (got size {size}, rank {rank})")
    return address, size, rank


def replica_group_timeout_s() -> float:
    """How long a replica waits for its group to form before it says it serves alone (it keeps trying)."""
    return _float("HOGWILD_GROUP_TIMEOUT_S", 300.0)

"""The ledger of trained sample ids: a sample whose ``id`` is here is skipped.

An append-only JSON-lines file in the state directory, fsynced after each job.
It must agree with the weights: it survives a restart of the training process
(the served weights live on in shared memory), but when the server itself
restarts, the weights come from the model directory again, so the ledger is
replaced by the copy saved with that checkpoint (or emptied if there is none):
samples trained after the last checkpoint are trained again. A torn last line
(crash mid-write) is ignored on load.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class Ledger:
    @classmethod
    def open(cls, path: Path, session: str, checkpoint_copy: Path | None) -> "Ledger":
        """The ledger for this server session (see the module docstring)."""
        marker = path.with_suffix(".session")
        if not (marker.exists() and marker.read_text() == session):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(checkpoint_copy.read_bytes() if checkpoint_copy and checkpoint_copy.exists() else b"")
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            marker.write_text(session)
        return cls(path)

    def __init__(self, path: Path):
        self.path = path
        self.ids: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.ids.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    continue

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, sample_ids: list[str], job_id: str) -> None:
        new = [i for i in dict.fromkeys(sample_ids) if i not in self.ids]
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write("".join(json.dumps({"id": i, "job": job_id, "t": now}) + "\n" for i in new))
            f.flush()
            os.fsync(f.fileno())
        self.ids.update(new)

"""The ledger of trained sample ids: a sample whose ``id`` is here is skipped.

An append-only JSON-lines file in the state directory, fsynced after each job,
so it survives restarts. A torn last line (crash mid-write) is ignored on load.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class Ledger:
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

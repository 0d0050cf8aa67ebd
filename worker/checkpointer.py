"""Checkpoints of the trainer's state: ``POST /checkpoint`` and the sync scheduled after
training stops. The block-level, crash-safe writing of the weights is ``checkpoint.py``;
this writes the served weights through it, by the checkpoint's own tensor names, with
the optimizer state, the ledger and the reward heads beside them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hogwild import envs
from hogwild.contracts.live_adapter import CONFIG, FACTORS
from hogwild.contracts.protocol import CheckpointReport, OpError
from hogwild.contracts.trainer_ranks import SaveOptimizerCommand, WriteTensorsCommand

from . import faults
from .checkpoint import CheckpointError, copy_model_dir, read_layout, sync, write_state_file
from .rank_group import gather_errors
from .rank_work import GatheredTensors, optimizer_files

ADAPTERS_DIRNAME = "adapters"  # <model dir>/adapters/<name>/: each served adapter as a PEFT directory
ADAPTER_FILES = (CONFIG, FACTORS)
from .views import served_views

if TYPE_CHECKING:
    from .service import TrainerService

logger = logging.getLogger("hogwild.worker")


def sync_weights(service: TrainerService, model, directory: Path) -> dict:
    """Sync the served weights into ``directory`` by the checkpoint's own names (transformers
    may fuse what the files keep apart). Under tensor parallelism each split tensor is
    gathered whole on rank 0 as the sync reaches it, and dropped after."""
    views = service.manifest.checkpoint_views
    if service.group is None:
        return sync(served_views(model.hogwild_served_tensors, views), directory).as_dict()
    layout = read_layout(directory)
    names = sorted((v.name for v in views), key=lambda n: str(layout[n].file) if n in layout else "")  # sync's order
    with service.on_ranks(WriteTensorsCommand(names=names)):
        gathered = GatheredTensors(service.session, service.manifest, model.hogwild_served_tensors, names)
        try:
            return sync(gathered, directory).as_dict()
        finally:
            gathered.drain()


class Checkpointer:
    def __init__(self):
        self.restored: dict = {}  # what start-up brought back from the served directory's last checkpoint
        self.last: dict | None = None
        self.after_s = 60 * envs.checkpoint_after_minutes()  # 0: never on its own
        self.due: float | None = None
        self.totals = {"checkpoint_bytes_written": 0, "checkpoint_seconds": 0.0, "last_checkpoint_at": None}

    def schedule(self) -> None:
        """After a job changed something worth saving: sync later, batched (each job pushes it back)."""
        if self.after_s > 0:
            self.due = time.monotonic() + self.after_s

    def write(self, service: TrainerService, target: str | None, adapters: list[str] | None = None) -> CheckpointReport:
        """Sync the served weights into ``target`` (default: the served directory), with the
        optimizer state, the ledger, the heads and the served adapters (``adapters/<name>/``, PEFT
        directories); with ``adapters``, only those adapters. Waits for the running job's end."""
        source = service.model_dir()
        if not source.is_dir():
            raise OpError("conflict", f"the served model {source} is not a local directory: give a target directory")
        directory = Path(target) if target else source
        if adapters is not None:
            return self.write_adapters(service, directory, adapters)
        with service.access.exclusive() as model:
            faults.point("checkpoint")
            try:
                if not (directory / "config.json").exists():
                    copy_model_dir(source, directory)
                report = sync_weights(service, model, directory)
                state = service.trainer.save_state()
                ledger = service.ledger
                files = {"ledger.jsonl": ledger.path.read_bytes() if ledger.path.exists() else b"", **service.heads.files()}
                if state is not None:
                    files.update(zip(optimizer_files(service.manifest.tensor_parallel_rank, service.manifest.tensor_parallel_size), state))
                if state is not None and service.group is not None:
                    with service.on_ranks(SaveOptimizerCommand(directory=str(directory))):
                        # The other ranks write their shards' state beside rank 0's, and say whether they could.
                        failed = [e for e in gather_errors(None, service.group.device)[1:] if e]
                    if failed:
                        raise OSError(failed[0])
                for name, data in files.items():
                    write_state_file(directory, name, data)
                report["adapters_written"] = service.served_adapters.export(directory / ADAPTERS_DIRNAME)
            except CheckpointError as exc:
                raise OpError("conflict", str(exc)) from None
            except OSError as exc:
                raise OpError("conflict", f"could not write the checkpoint to {directory}: {exc}") from None
            report.update(state_bytes_written=sum(map(len, files.values())), optimizer_step=service.trainer.global_step,
                          optimizer_saved=state is not None, heads_saved=service.heads.heads.names if service.heads.heads else [],
                          ledger_ids=len(ledger), weights_version=service.weights_version, time=time.time())
            write_state_file(directory, "checkpoint.json", json.dumps(report).encode())
        if directory == source:
            self.due = None
        self.last = report
        self.totals["checkpoint_bytes_written"] += report["bytes_written"] + report["state_bytes_written"]
        self.totals["checkpoint_seconds"] += report["seconds"]
        self.totals["last_checkpoint_at"] = report["time"]
        logger.info("checkpoint to %s: %d of %d blocks written (%d bytes) in %.2f s", directory, report["blocks_written"],
                    report["blocks_compared"], report["bytes_written"], report["seconds"])
        return CheckpointReport(**report)

    def write_adapters(self, service: TrainerService, directory: Path, names: list[str]) -> CheckpointReport:
        """Only the served adapters ``names`` (an adapter key's checkpoint), into ``<directory>/adapters``."""
        started = time.time()
        with service.access.exclusive():  # no job is midway through one of them
            try:
                written = service.served_adapters.export(directory / ADAPTERS_DIRNAME, names)
            except OSError as exc:
                raise OpError("conflict", f"could not write the adapters to {directory}: {exc}") from None
        data = sum((directory / ADAPTERS_DIRNAME / n / f).stat().st_size for n in written for f in ADAPTER_FILES)
        return CheckpointReport(target=str(directory), blocks_written=0, bytes_written=data, seconds=time.time() - started,
                                weights_version=service.weights_version, adapters_written=written)

    def when_idle(self, service: TrainerService) -> None:
        """Called by the job thread while idle: sync when the schedule says so."""
        if self.due is None or time.monotonic() < self.due:
            return
        self.due = None
        try:
            self.write(service, None)
        except Exception as exc:  # reported by status; the job thread goes on
            error = str(exc) if isinstance(exc, OpError) else f"{type(exc).__name__}: {exc}"
            self.last = {"error": error, "time": time.time()}
            logger.exception("scheduled checkpoint failed: %s", error)

    def status(self) -> dict:
        return {"restored": self.restored, "last": self.last,
                "scheduled_in_s": max(0.0, self.due - time.monotonic()) if self.due else None,
                "after_minutes": self.after_s / 60}

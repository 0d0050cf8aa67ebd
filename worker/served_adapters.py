"""The adapters the trainer trains on the frozen served base and vLLM serves by name.

Each adapter is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``,
fp32 factors) in two places:

- **live**, in the session directory (``/dev/shm``): the file vLLM loads the adapter from.
  While a job trains it, the adapter's factor parameters *are* views of this file's pages
  (``map_factors``), so every optimizer step lands in it with no save; after each step the
  trainer stamps it (``contracts/live_adapter.py``) and vLLM's model worker copies the new
  factors into its loaded adapter before the next forward pass that uses it.
- **durable**, in the state directory: a copy written atomically when a job ends, with the
  adapter's optimizer state and its record (``meta.json``, written last). A new trainer (a
  restart, a new server) copies it back to the live place: the trainer's copy is the source of
  truth, whatever vLLM evicted from its LoRA slots or caches.

Jobs that train adapters hold the model exclusively (``ModelAccess``), so one adapter at a
time is attached; the record list is read by status on another thread (``lock``).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from hogwild import envs
from hogwild.contracts.live_adapter import CONFIG, FACTORS, map_factors, write_stamp
from hogwild.contracts.protocol import OpError
from hogwild.contracts.served_adapter import AdapterSpec, ServedAdapter
from hogwild.training.adapter_trainer import AdapterTrainer, adapter_targets, bind_factors, factors_of
from hogwild.training.lora import lora_targets

from .checkpoint import write_atomic
from .model_access import ModelAccess

logger = logging.getLogger("hogwild.trainer")

META = "meta.json"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"


@dataclass
class AdapterRun:
    """What a job training an adapter holds: ``trainer`` (as a tensor-parallel rank's holder,
    ``kinds.base.RankTrainer``) and the adapter's record, one version more per step."""

    trainer: AdapterTrainer
    record: ServedAdapter
    steps_before: int
    version_before: int

    def stepped(self, steps_in_job: int) -> None:
        """The job has taken ``steps_in_job`` optimizer steps (its factors are in the live file)."""
        self.record.steps, self.record.version = self.steps_before + steps_in_job, self.version_before + steps_in_job
        self.record.updated_at = time.time()
        write_stamp(Path(self.record.path), self.record.version)  # vLLM's worker loads it again before its next use


class ServedAdapters:
    def __init__(self, live: Path, durable: Path):
        self.live, self.durable = live, durable
        self.lock = threading.Lock()
        self.records: dict[str, ServedAdapter] = {}
        self.adaptable: list[str] = []  # the model's adaptable modules (``bind_model``)
        for meta_path in sorted(durable.glob(f"*/{META}")) if durable.is_dir() else []:
            try:
                record = ServedAdapter.model_validate_json(meta_path.read_bytes())
                for name in (CONFIG, FACTORS):
                    write_atomic(live / record.name / name, (meta_path.parent / name).read_bytes())
                write_stamp(live / record.name, record.version)
            except (OSError, ValueError) as exc:
                logger.error("served adapter %s could not be restored: %s", meta_path.parent.name, exc)
                continue
            self.records[record.name] = record.model_copy(update={"path": str(live / record.name)})

    def bind_model(self, model: torch.nn.Module) -> None:
        """Learn the model's adaptable modules once, so that a request is checked without the model."""
        self.adaptable = lora_targets(model)

    def ledger_scope(self, name: str) -> str:
        """The prefix of this adapter's sample ids in the ledger: its name and birth."""
        record = self.records.get(name)
        return f"adapter/{name}/{record.created_at!r}/" if record is not None else f"adapter/{name}/new/"

    def info(self) -> list[ServedAdapter]:
        with self.lock:
            return [r.model_copy() for r in self.records.values()]

    def resolve(self, spec: AdapterSpec) -> tuple[AdapterSpec, list[str]]:
        """The spec with every field set (an existing adapter's own shape), and its targets' full
        module names. ``OpError`` (nothing changes) for a shape unlike the existing adapter's,
        targets the model lacks, or a new adapter beyond ``HOGWILD_MAX_ADAPTERS``."""
        record = self.records.get(spec.name)
        if record is not None:
            own = {"rank": record.rank, "alpha": record.alpha, "dropout": record.dropout, "targets": record.targets}
            clash = [f"adapter_{k} {getattr(spec, k)} (it has {v})" for k, v in own.items()
                     if getattr(spec, k) is not None and getattr(spec, k) != v]
            if clash:
                raise OpError("conflict", f"adapter {spec.name!r} exists with another shape: {', '.join(clash)}; "
                              "leave the adapter_* fields out to continue it, or name a new adapter")
            spec = spec.model_copy(update=own)
        elif len(self.records) >= envs.max_adapters():
            raise OpError("too_large", f"the trainer holds {len(self.records)} adapters, the most HOGWILD_MAX_ADAPTERS "
                          f"allows ({envs.max_adapters()}): DELETE /adapters/<name> one, or raise the limit")
        spec = spec.with_defaults()
        try:
            targets = adapter_targets(self.adaptable, spec.targets)
        except ValueError as exc:
            raise OpError("invalid", str(exc)) from None
        leaves = sorted({name.rpartition(".")[2] for name in targets})
        return spec.model_copy(update={"targets": leaves}), targets

    @contextmanager
    def training(self, spec: AdapterSpec, access: ModelAccess, pad_id: int, seed: int) -> Iterator[AdapterRun]:
        """The adapter attached to the model with its factors bound to its live file and its own
        optimizer, for a job to train; afterwards taken off and its durable copy written (also
        when the job failed midway: the steps it took are in the live file). The caller holds
        ``access.exclusive()``."""
        spec, targets = self.resolve(spec)
        with ExitStack() as attached:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # a new adapter's initial A: the job's seed
                peft_model = attached.enter_context(access.adapter(r=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                                                                   targets=targets))
            record = self.records.get(spec.name) or self._create(spec, peft_model)
            bind_factors(peft_model, map_factors(Path(record.path) / FACTORS))
            trainer = AdapterTrainer(peft_model, pad_id)
            saved = self.durable / spec.name
            if (saved / OPTIMIZER_JSON).is_file():
                trainer.restore_state((saved / OPTIMIZER_TENSORS).read_bytes(), (saved / OPTIMIZER_JSON).read_bytes())
            run = AdapterRun(trainer, record, record.steps, record.version)
            try:
                yield run
            finally:
                self._commit(run)

    def _create(self, spec: AdapterSpec, peft_model) -> ServedAdapter:
        """A new adapter's live directory, with PEFT's initial factors (B = 0: the base's outputs)."""
        directory = self.live / spec.name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700)
        config = peft_model.peft_config["default"]
        config.base_model_name_or_path = str(getattr(peft_model.base_model.model.config, "_name_or_path", "") or "")
        config.save_pretrained(str(directory))
        factors = {key: p.detach().float().contiguous() for key, p in factors_of(peft_model).items()}
        write_atomic(directory / FACTORS, save(factors))
        write_stamp(directory, 0)
        now = time.time()
        record = ServedAdapter(name=spec.name, version=0, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                               targets=spec.targets, path=str(directory), created_at=now, updated_at=now)
        with self.lock:
            self.records[spec.name] = record
        return record

    def _commit(self, run: AdapterRun) -> None:
        """The adapter's durable copy: factors, config, optimizer, then the record that names them."""
        record, saved = run.record, self.durable / run.record.name
        live = Path(record.path)
        write_atomic(saved / FACTORS, (live / FACTORS).read_bytes())
        write_atomic(saved / CONFIG, (live / CONFIG).read_bytes())
        state = run.trainer.save_state()
        if state is not None:
            write_atomic(saved / OPTIMIZER_TENSORS, state[0])
            write_atomic(saved / OPTIMIZER_JSON, state[1])
        write_atomic(saved / META, record.model_dump_json().encode())

    def export(self, directory: Path, names: list[str] | None = None) -> list[str]:
        """Each adapter (of ``names``, default all) as a PEFT directory ``<directory>/<name>/``, as
        ``PeftModel.from_pretrained`` and ``vllm serve --lora-modules`` load it: the files of its
        durable copy, written (atomically) where they changed. Returns the adapters written."""
        written = []
        for name in sorted(self.records if names is None else set(names) & set(self.records)):
            changed = False
            for file in (CONFIG, FACTORS):
                data, target = (self.durable / name / file).read_bytes(), directory / name / file
                if not target.is_file() or target.read_bytes() != data:
                    write_atomic(target, data)
                    changed = True
            if changed:
                written.append(name)
        return written

    def delete(self, name: str) -> ServedAdapter:
        """Forget an adapter: its live and durable copies removed. The caller holds the model
        exclusively (no job trains it meanwhile)."""
        with self.lock:
            record = self.records.pop(name, None)
        if record is None:
            raise OpError("not_found", f"no adapter named {name!r}")
        shutil.rmtree(self.durable / name, ignore_errors=True)
        shutil.rmtree(self.live / name, ignore_errors=True)
        return record

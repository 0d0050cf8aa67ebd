"""The training subprocess's state: the view model, the job queue and the ops.

One thread (the transport loop in ``__main__``) answers requests; one job
thread loads the model and then runs jobs one at a time. Status never waits
for the model; ops that run the model (``token_logprobs``) wait for the job
thread to be between jobs, on a thread of their own.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hogwild import envs
from hogwild.training.batches import Sample
from hogwild.training.memory import available_memory, estimate_job_memory
from hogwild.training.sft import SFTOptions, SFTTrainer

from .checkpoint import STATE_DIRNAME, CheckpointError, copy_model_dir, sync, write_state_file
from .jobs import Job, JobBook
from .journal import JobJournal
from .ledger import Ledger
from .manifest import Manifest, read_manifest
from .process_memory import memory_snapshot, release_free_heap
from .protocol import (
    CancelOp,
    CheckpointOp,
    ErrorInfo,
    Event,
    JobInfo,
    JobOp,
    OpError,
    Reply,
    Request,
    StatusOp,
    SubmitOp,
    TokenLogprobsOp,
)
from .views import UnsupportedModel, bind_views, model_skeleton, shared_parameter_bytes

logger = logging.getLogger("hogwild.worker")


class TrainerService:
    def __init__(self, session: Path, state_dir: Path, manifest_timeout: float = 120.0, restart_reason: str | None = None):
        self.session = session
        self.state_dir = state_dir
        self.manifest_timeout = manifest_timeout
        self.state = "starting"  # starting | ready | unsupported | failed
        self.reason: str | None = None
        self.manifest: Manifest | None = None
        self.model = None
        self.trainer: SFTTrainer | None = None
        self.vocab_size = 0
        self.ledger: Ledger | None = None  # opened once the model directory is known
        self.trainer_id = secrets.token_hex(6)
        self.jobs = JobBook(JobJournal(state_dir / "jobs"), self.trainer_id, envs.max_queued_jobs())
        for info in self.jobs.recover(restart_reason or "the training process stopped"):
            logger.warning("job %s was running when the previous trainer died: reported failed", info.job_id)
        self.memory_limit = envs.trainer_memory_limit()
        self.model_lock = threading.Lock()
        self.weights_version = 0
        # (client identity, message) to send; identity None = every client.
        self.outbox: queue.Queue[tuple[bytes | None, Reply | Event]] = queue.Queue()
        self.model_ops = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hogwild-model-ops")
        self.optimizer_state_bytes = 0
        self.binding_private_bytes: int | None = None
        self.shared_param_bytes = 0
        self.param_bytes = 0
        self.stopping = False
        # Checkpoints: what was restored at start-up, the last sync, the next scheduled one.
        self.restored: dict = {}
        self.last_checkpoint: dict | None = None
        self.sync_after_s = 60 * envs.checkpoint_after_minutes()  # 0: never on its own
        self.sync_due: float | None = None

    # ---- loading --------------------------------------------------------

    def load(self) -> None:
        """Map the served weights and build the view model (job thread)."""
        deadline = time.monotonic() + self.manifest_timeout
        while True:
            try:
                self.manifest = read_manifest(self.session)
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    self._fail("failed", f"no weight manifest appeared in {self.session}: the vLLM worker did not "
                               "publish its weights (was the server started with VLLM_PLUGINS=hogwild?)")
                    return
                time.sleep(0.2)
            except ValueError as exc:
                self._fail("failed", str(exc))
                return
        try:
            skeleton = model_skeleton(self.manifest)
            release_free_heap()
            before = memory_snapshot()
            model = bind_views(skeleton, self.manifest)
            release_free_heap()
            after = memory_snapshot()
            # What binding the weights cost in private memory: ~0 with views, ~model size with a copy.
            self.binding_private_bytes = after.get("rss_anon", 0) - before.get("rss_anon", 0)
            self.shared_param_bytes = shared_parameter_bytes(model)
            self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        except UnsupportedModel as exc:
            self._fail("unsupported", str(exc))
            return
        except Exception as exc:
            logger.exception("building the view model failed")
            self._fail("failed", f"could not build the training model: {type(exc).__name__}: {exc}")
            return
        config = model.config
        self.model = model
        self.vocab_size = int(config.vocab_size)
        pad = getattr(config, "pad_token_id", None)
        self.trainer = SFTTrainer(model, pad_id=int(pad) if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0)
        self._restore()
        self.state = "ready"
        logger.info("trainer ready: %s (%s, %d tensors)", self.manifest.model, self.manifest.dtype, len(self.manifest.tensors))

    def model_dir(self) -> Path:
        return Path(self.manifest.model)

    def _restore(self) -> None:
        """Bring back what the last checkpoint of the served directory saved."""
        saved = self.model_dir() / STATE_DIRNAME
        self.ledger = Ledger.open(self.state_dir / "ledger.jsonl", str(self.session), saved / "ledger.jsonl")
        self.restored = {"from": str(saved) if saved.is_dir() else None, "ledger_ids": len(self.ledger), "optimizer_step": None}
        if (saved / "optimizer.json").exists():
            try:
                self.trainer.restore_state((saved / "optimizer.safetensors").read_bytes(), (saved / "optimizer.json").read_bytes())
                self.restored["optimizer_step"] = self.trainer.global_step
                self.optimizer_state_bytes = self.trainer.optimizer_bytes()
            except (OSError, ValueError, KeyError) as exc:
                self.restored["optimizer_error"] = f"the saved optimizer state was not restored: {exc}"
                logger.warning(self.restored["optimizer_error"])

    def _fail(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason
        logger.error("trainer %s: %s", state, reason)

    # ---- requests -------------------------------------------------------

    def handle(self, request: Request, client: bytes) -> Reply | None:
        """The reply, or None when the op runs on the model thread and its reply
        goes to ``outbox`` later (the transport never waits for the model)."""
        if isinstance(request.body, (TokenLogprobsOp, CheckpointOp)):
            self.model_ops.submit(lambda: self.outbox.put((client, self._answer(request))))
            return None
        return self._answer(request)

    def _answer(self, request: Request) -> Reply:
        body = request.body
        try:
            if isinstance(body, StatusOp):
                result = self.status()
            elif isinstance(body, SubmitOp):
                result = self.submit(body).model_dump()
            elif isinstance(body, JobOp):
                result = self.jobs.get(body.job_id).info.model_dump()
            elif isinstance(body, CancelOp):
                result = self.cancel(body.job_id).model_dump()
            elif isinstance(body, TokenLogprobsOp):
                result = {"logprobs": self.token_logprobs(body.token_ids)}
            elif isinstance(body, CheckpointOp):
                result = self.checkpoint(body.target)
            else:  # pragma: no cover - the union is exhaustive
                raise OpError("invalid", f"unknown op {body!r}")
            return Reply(id=request.id, ok=True, result=result)
        except OpError as exc:
            return Reply(id=request.id, ok=False, error=ErrorInfo(code=exc.code, message=str(exc)))
        except Exception as exc:
            logger.exception("op failed")
            return Reply(id=request.id, ok=False, error=ErrorInfo(code="internal", message=f"{type(exc).__name__}: {exc}"))

    def _require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "starting":
            raise OpError("unavailable", "the trainer is still starting")
        raise OpError("unsupported" if self.state == "unsupported" else "unavailable", self.reason or self.state)

    def submit(self, op: SubmitOp) -> JobInfo:
        self._require_ready()
        for i, sample in enumerate(op.samples):
            ids = sample.context_ids + sample.continuation_ids
            if max(ids) >= self.vocab_size:
                raise OpError("invalid", f"samples[{i}]: token id {max(ids)} is outside the vocabulary (size {self.vocab_size})")
        self._check_memory(op)
        seen: set[str] = set()
        skipped = []
        for s in op.samples:
            if s.id is not None and (s.id in self.ledger or s.id in seen):
                skipped.append(s.id)
            elif s.id is not None:
                seen.add(s.id)
        return self.jobs.add(op, skipped)

    def _check_memory(self, op: SubmitOp) -> None:
        """Refuse a job that cannot fit, before it touches the weights."""
        options: SFTOptions = op.options
        micro = min(options.micro_batch_size, options.batch_size or len(op.samples), len(op.samples))
        seq = max(len(s.context_ids) + len(s.continuation_ids) for s in op.samples)
        trainer = self.trainer
        new_optimizer = trainer.optimizer is None or trainer.structure != options.structure()
        need = estimate_job_memory(self.model, micro, seq, options.rank, new_optimizer)
        device = next(self.model.parameters()).device
        free = available_memory(device)
        budget = min(free, self.memory_limit) if self.memory_limit else free
        if need.total > budget:
            raise OpError("too_large", f"this job needs about {need.describe()} on {device.type}, but only "
                          f"{budget / 2**30:.2f} GiB is available to the trainer: lower micro_batch_size or the sample length")

    def cancel(self, job_id: str) -> JobInfo:
        info = self.jobs.cancel(job_id)
        if info.state == "cancelled":
            self.outbox.put((None, Event(event="job_finished", trainer_id=self.trainer_id, job=info,
                                         weights_version=self.weights_version, weights_changed=False,
                                         trainer_idle=self.jobs.running is None and self.jobs.idle())))
        return info

    def checkpoint(self, target: str | None) -> dict:
        """Sync the served weights into ``target`` (default: the served directory),
        with the optimizer state and the ledger; waits for the running job's end."""
        self._require_ready()
        source = self.model_dir()
        if not source.is_dir():
            raise OpError("conflict", f"the served model {source} is not a local directory: give a target directory")
        directory = Path(target) if target else source
        with self.model_lock:
            try:
                if not (directory / "config.json").exists():
                    copy_model_dir(source, directory)
                tensors = {name: p.data for name, p in self.model.named_parameters()}
                report = sync(tensors, directory).as_dict()
                state = self.trainer.save_state()
                files = {"ledger.jsonl": self.ledger.path.read_bytes() if self.ledger.path.exists() else b""}
                if state is not None:
                    files.update({"optimizer.safetensors": state[0], "optimizer.json": state[1]})
                for name, data in files.items():
                    write_state_file(directory, name, data)
            except CheckpointError as exc:
                raise OpError("conflict", str(exc)) from None
            except OSError as exc:
                raise OpError("conflict", f"could not write the checkpoint to {directory}: {exc}") from None
            report.update(state_bytes_written=sum(map(len, files.values())), optimizer_step=self.trainer.global_step,
                          optimizer_saved=state is not None,
                          ledger_ids=len(self.ledger), weights_version=self.weights_version, time=time.time())
            write_state_file(directory, "checkpoint.json", json.dumps(report).encode())
        if directory == source:
            self.sync_due = None
        self.last_checkpoint = report
        logger.info("checkpoint to %s: %d of %d blocks written (%d bytes) in %.2f s", directory, report["blocks_written"],
                    report["blocks_compared"], report["bytes_written"], report["seconds"])
        return report

    def scheduled_sync(self) -> None:
        """Called by the job thread while idle: sync when the schedule says so."""
        if self.sync_due is None or time.monotonic() < self.sync_due:
            return
        self.sync_due = None
        try:
            self.checkpoint(None)
        except OpError as exc:
            self.last_checkpoint = {"error": str(exc), "time": time.time()}
            logger.error("scheduled checkpoint failed: %s", exc)

    def token_logprobs(self, token_ids: list[int]) -> list[float]:
        self._require_ready()
        if max(token_ids) >= self.vocab_size:
            raise OpError("invalid", f"token id {max(token_ids)} is outside the vocabulary (size {self.vocab_size})")
        device = next(self.model.parameters()).device
        with self.model_lock, torch.no_grad():
            ids = torch.tensor([token_ids], device=device)
            logits = self.model(input_ids=ids).logits.float()
            logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
            return logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()

    def status(self) -> dict:
        queued, running, recent = self.jobs.snapshot()
        trainer = self.trainer
        memory = memory_snapshot()
        return {
            "trainer_id": self.trainer_id,
            "pid": os.getpid(),
            "state": self.state,
            "reason": self.reason,
            "model": self.manifest.model if self.manifest else None,
            "architectures": self.manifest.architectures if self.manifest else [],
            "dtype": self.manifest.dtype if self.manifest else None,
            "backend": self.manifest.backend if self.manifest else None,
            "queue": [j.model_dump() for j in queued],
            "running": running.model_dump() if running else None,
            "recent": [j.model_dump() for j in recent],
            "max_queued_jobs": self.jobs.max_queued,
            "weights_version": self.weights_version,
            "ledger_size": len(self.ledger) if self.ledger else 0,
            "checkpoint": {
                "restored": self.restored,
                "last": self.last_checkpoint,
                "scheduled_in_s": max(0.0, self.sync_due - time.monotonic()) if self.sync_due else None,
                "after_minutes": self.sync_after_s / 60,
            },
            "optimizer": {
                "step": trainer.global_step if trainer else 0,
                "structure": trainer.structure.model_dump() if trainer and trainer.structure else None,
                "hyper": trainer.hyper.model_dump() if trainer and trainer.hyper else None,
                "state_bytes": self.optimizer_state_bytes,
            },
            "memory": {
                **memory,
                "model_bytes": self.manifest.model_bytes if self.manifest else 0,
                "param_bytes": self.param_bytes,
                "shared_param_bytes": self.shared_param_bytes,
                "binding_private_bytes": self.binding_private_bytes,
                "optimizer_state_bytes": self.optimizer_state_bytes,
            },
        }

    # ---- the job thread -------------------------------------------------

    def job_loop(self) -> None:
        self.load()
        while not self.stopping:
            job = self.jobs.next(lambda: self.stopping, on_idle=self.scheduled_sync)
            if job is not None:
                self._run(job)
                self.jobs.end(job)

    def _run(self, job: Job) -> None:
        info = job.info
        version_before = self.weights_version
        if self.state != "ready":
            state, error = "failed", f"the trainer is {self.state}: {self.reason}"
        elif job.cancel_requested:
            state, error = "cancelled", None
        else:
            state, error = self._train(job)
        if self.trainer is not None and self.trainer.optimizer is not None:
            self.optimizer_state_bytes = self.trainer.optimizer_bytes()  # the job thread owns the optimizer
        release_free_heap()
        info.finished_at, info.weights_version, info.error = time.time(), self.weights_version, error
        if self.weights_version != version_before and self.sync_after_s > 0:
            self.sync_due = time.monotonic() + self.sync_after_s  # batched: each job pushes it back
        info.state = state  # last: whoever sees a finished job sees all of it
        self.outbox.put((None, Event(event="job_finished", trainer_id=self.trainer_id, job=info,
                                     weights_version=self.weights_version, weights_changed=self.weights_version != version_before,
                                     trainer_idle=self.jobs.idle())))

    def _train(self, job: Job) -> tuple[str, str | None]:
        """Run the job's training; returns its final (state, error)."""
        info = job.info
        chosen, seen = [], set()
        for s in job.op.samples:
            if s.id is not None and (s.id in self.ledger or s.id in seen):
                if s.id not in info.skipped_ids:
                    info.skipped_ids.append(s.id)
                continue
            if s.id is not None:
                seen.add(s.id)
            chosen.append(s)
        samples = [Sample(tuple(s.context_ids), tuple(s.continuation_ids), s.weight, s.id) for s in chosen]
        version_before = self.weights_version

        def on_step(step: int, total: int, result) -> None:
            self.weights_version = version_before + result.steps
            self.jobs.progress(job, step, total)

        if not samples:
            info.result = {"steps": 0, "note": "every sample was already trained"}
            return "succeeded", None
        try:
            self._check_memory(job.op)  # memory may have changed since submission
            with self.model_lock:
                result = self.trainer.run(samples, job.op.options, on_step=on_step, should_stop=lambda: job.cancel_requested)
        except OpError as exc:
            return "failed", str(exc)
        except Exception as exc:
            logger.error("job %s failed:\n%s", info.job_id, traceback.format_exc())
            return "failed", f"{type(exc).__name__}: {exc}"
        info.result = result.as_dict()
        if result.stopped_early:
            return "cancelled", None  # its completed steps stay applied; its samples are not in the ledger
        self.ledger.record([s.id for s in samples if s.id is not None], info.job_id)
        return "succeeded", None

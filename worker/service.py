"""The training subprocess's state and the dispatch of every op.

The transport thread (``__main__``) hands each request to ``handle``, which answers at
once (status, jobs, admission) or, for ops that run the model, on a thread of their own
(the reply goes out later through the outbox). One job thread loads the model, waits
for the parity gate, then runs jobs one at a time: each job kind (``kinds/``) admits and
runs its own requests; what they share (readiness, token ids, memory, the journal, the
ledger, events) is done here once.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from hogwild import envs
from hogwild.contracts.manifest import Manifest, read_manifest
from hogwild.contracts.protocol import (
    CancelOp,
    CheckpointOp,
    ErrorInfo,
    Event,
    HeadScoresOp,
    JobInfo,
    JobOp,
    OpError,
    ParityOp,
    ParityReport,
    Reply,
    Request,
    StatusOp,
    TokenLogprobs,
    TokenLogprobsOp,
)
from hogwild.contracts.served_adapter import quantized_base_refusal
from hogwild.contracts.trainer_ranks import RANK_DIED_EXIT, LogprobsCommand, RankEnvelope, StopCommand, TrainCommand
from hogwild.contracts.weights_version import WeightsVersionWriter
from hogwild.training.hf_model import pad_token_id
from hogwild.training.memory import available_memory
from hogwild.training.sft import SFTTrainer

from . import faults
from .adapters import AdapterBook
from .checkpoint import STATE_DIRNAME
from .checkpointer import Checkpointer
from .jobs import Job, JobBook
from .journal import JobJournal
from .kinds import Outcome, kind_of
from .ledger import Ledger
from .model_access import ModelAccess
from .parity import probe_ids, verify_parity
from .process_memory import release_free_heap
from .rank_group import RankGroup, agree, gather_bindings, gather_errors, group_device
from .rank_work import restore_optimizer, token_logprobs
from .replica_group import ReplicaGroup
from .reward_heads import HeadBook
from .served_adapters import ServedAdapters
from .status import TrainedTotals, trainer_status
from .views import Binding, UnsupportedModel, bind

logger = logging.getLogger("hogwild.worker")


class TrainerService:
    def __init__(self, session: Path, state_dir: Path, manifest_timeout: float = 120.0, restart_reason: str | None = None):
        self.session = session
        self.state_dir = state_dir
        self.manifest_timeout = manifest_timeout
        self.state = "starting"  # starting | verifying (the parity gate) | ready | unsupported | failed
        self.reason: str | None = None
        self.manifest: Manifest | None = None
        self.access: ModelAccess | None = None
        self.bound = Binding()
        self.trainer: SFTTrainer | None = None  # holds the server's one optimizer
        self.vocab_size = 0
        self.pad_id = 0
        self.ledger: Ledger | None = None  # opened once the model directory is known
        self.trainer_id = secrets.token_hex(6)
        self.jobs = JobBook(JobJournal(state_dir / "jobs"), self.trainer_id, envs.max_queued_jobs())
        self.jobs.recover(restart_reason or "the training process stopped")
        self.memory_limit = envs.trainer_memory_limit()
        self.version = WeightsVersionWriter(state_dir)  # shared with the API server: completions carry it
        self.optimizer_state_bytes = 0
        self.heap_held = False  # a job's freed memory not yet handed back to the OS
        self.trained = TrainedTotals()  # what this trainer process has trained, for metrics
        self.group: RankGroup | None = None  # the other tensor-parallel ranks, when vLLM serves with TP > 1
        self.replicas: ReplicaGroup | None = None  # the other serving replicas that train with this one (HOGWILD_GROUP)
        self.heads = HeadBook()
        # Circuit-breaker adapters merged into the served weights, kept to be reverted exactly (a restart too).
        self.adapters = AdapterBook(session / "adapters")
        self.served_adapters = ServedAdapters(session / "served-adapters", state_dir / "served-adapters")
        self.checkpointer = Checkpointer()
        self.parity = ParityReport(state="pending")
        self.gate_done = threading.Event()  # the parity gate has decided (or loading failed): jobs may run
        self.stopping = False
        self._tokenizer = None
        # (client identity, message) to send; identity None = every client. ``doorbell`` wakes the transport.
        self.outbox: queue.Queue[tuple[bytes | None, Reply | Event]] = queue.Queue()
        self.doorbell: Callable[[], None] = lambda: None
        self.model_ops = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hogwild-model-ops")
        self.reader_ops = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hogwild-reader-ops")
        # The ops other than job requests, and the thread each runs on (None: the transport's).
        self.ops = {
            StatusOp: (None, lambda op: trainer_status(self)),
            JobOp: (None, lambda op: self.jobs.get(op.job_id).info),
            CancelOp: (None, lambda op: self.cancel(op.job_id)),
            CheckpointOp: (self.model_ops, self.checkpoint),
            TokenLogprobsOp: (self.model_ops, self.token_logprobs),
            ParityOp: (self.model_ops, lambda op: verify_parity(self, op)),
            HeadScoresOp: (self.reader_ops, self.head_scores),  # beside a running job (HOGWILD)
        }

    @property
    def weights_version(self) -> int:
        """One more for each change to the served weights; continues across trainer restarts."""
        return self.version.value

    @weights_version.setter
    def weights_version(self, value: int) -> None:
        self.version.write(value)

    @property
    def tensor_parallel_size(self) -> int:
        return self.group.size if self.group is not None else 1

    # ---- loading --------------------------------------------------------

    def load(self) -> None:
        """Map the served weights, build the view model and restore the last checkpoint's state (job thread)."""
        deadline = time.monotonic() + self.manifest_timeout
        while True:
            try:
                self.manifest = read_manifest(self.session)
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    return self._fail("failed", f"no weight manifest appeared in {self.session}: the vLLM worker did not "
                                      "publish its weights (was the server started with VLLM_PLUGINS=hogwild?)")
                time.sleep(0.2)
            except ValueError as exc:
                return self._fail("failed", str(exc))
        if self.manifest.tensor_parallel_size > 1 and not self.manifest.unsupported:
            self.group = RankGroup(self.session, self.state_dir, self.trainer_id, self.manifest.tensor_parallel_size,
                                   torch.get_num_threads(), group_device(self.manifest))
        failure = None
        try:
            model, self.bound = bind(self.manifest)
        except UnsupportedModel as exc:
            failure = ("unsupported", str(exc))
        except Exception as exc:
            logger.exception("building the view model failed")
            failure = ("failed", f"could not build the training model: {type(exc).__name__}: {exc}")
        if self.group is not None:
            others = [e for e in gather_errors(failure and failure[1], self.group.device)[1:] if e]
            failure = failure or (("unsupported", others[0]) if others else None)
            if failure:
                self.group.close(RankEnvelope(command=StopCommand()))
                self.group = None
            else:
                self.group.ranks = gather_bindings(os.getpid(), self.bound, self.group.device)
        if failure:
            return self._fail(*failure)
        self.access = ModelAccess(model)
        self.served_adapters.bind_model(model)
        self.vocab_size = int(model.config.vocab_size)
        self.pad_id = pad_token_id(model.config)
        self.trainer = SFTTrainer(model, pad_id=self.pad_id)
        self._restore()
        self.parity = ParityReport(state="pending", probe_ids=probe_ids(self.vocab_size))
        self.state = "verifying"  # until an API server brings vLLM's log-probabilities of the probe (ParityOp)
        logger.info("trainer bound: %s (%s, %d tensors); checking its forward against vLLM's", self.manifest.model,
                    self.manifest.dtype, len(self.manifest.tensors))

    def _restore(self) -> None:
        """Bring back what the last checkpoint of the served directory saved."""
        saved = self.model_dir() / STATE_DIRNAME
        self.ledger = Ledger.open(self.state_dir / "ledger.jsonl", str(self.session), saved / "ledger.jsonl")
        restored = {"from": str(saved) if saved.is_dir() else None, "ledger_ids": len(self.ledger), "optimizer_step": None,
                    **self.heads.restore(saved)}
        # Under TP each rank restores its own shard's optimizer (``follower`` for the others).
        error = restore_optimizer(self.trainer, saved, self.manifest)
        if error:
            restored["optimizer_error"] = error
            logger.warning(error)
        elif self.trainer.optimizer is not None:
            restored["optimizer_step"] = self.trainer.global_step
            self.optimizer_state_bytes = self.trainer.optimizer_bytes()
        self.checkpointer.restored = restored

    def model_dir(self) -> Path:
        return Path(self.manifest.model)

    def tokenizer(self):
        """The served model's tokenizer, for the jobs that read text (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir()))
        return self._tokenizer

    def _fail(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason
        logger.error("trainer %s: %s", state, reason)
        self.gate_done.set()

    # ---- requests -------------------------------------------------------

    def handle(self, request: Request, client: bytes) -> Reply | None:
        """The reply, or None when the op runs on another thread and its reply goes to
        the outbox later (the transport never waits for the model)."""
        if self.replicas is not None and self.replicas.forwards(request.body):  # a follower: the leader answers
            self.replicas.forwarding.submit(lambda: self.send(client, self.replicas.forward(request)))
            return None
        executor = self.ops.get(type(request.body), (None, None))[0]
        if executor is None:
            return self.answer(request)
        executor.submit(lambda: self.send(client, self.answer(request)))
        return None

    def send(self, client: bytes | None, message: Reply | Event) -> None:
        """Queue a message for one client (None: every client) and wake the transport."""
        self.outbox.put((client, message))
        self.doorbell()

    def answer(self, request: Request) -> Reply:
        body = request.body
        try:
            handler = self.ops.get(type(body), (None, None))[1]
            result = handler(body) if handler is not None else self.submit(body)
            return Reply(id=request.id, ok=True, result=result.model_dump())
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
        if self.state == "verifying":
            raise OpError("unavailable", "the trainer is checking that its forward matches vLLM's (the parity gate)")
        raise OpError("unsupported" if self.state == "unsupported" else "unavailable", self.reason or self.state)

    def check_token_ids(self, token_lists) -> None:
        """Every id of every (where, ids) below the vocabulary size."""
        for where, ids in token_lists:
            bad = next((t for t in ids if t >= self.vocab_size), None)
            if bad is not None:
                raise OpError("invalid", f"{where}: token id {bad} is outside the vocabulary (size {self.vocab_size})")

    def check_memory(self, kind, op) -> None:
        """Refuse a job that cannot fit, before it touches the weights."""
        need = kind.estimate(self, op)
        if need is None:
            return
        device = self.access.device()
        free = available_memory(device)
        budget = min(free, self.memory_limit) if self.memory_limit else free
        if need.total > budget:
            raise OpError("too_large", f"this job needs about {need.describe()} on {device.type}, but only "
                          f"{budget / 2**30:.2f} GiB is available to the trainer: lower micro_batch_size or the sample length")

    def submit(self, op) -> JobInfo:
        """Admit a job request (its kind's checks, then the shared ones) and queue it."""
        kind = kind_of(op)
        self._require_ready()
        if (known := self.jobs.admitted(op)) is not None:  # sent again (a retry): the job it already is
            return known
        if self.group is not None and not kind.tensor_parallel:
            raise OpError("unsupported", f"{op.mode} training with tensor parallel size {self.group.size} is not supported "
                          "yet (sft and preference are): serve with tensor parallel size 1 for it")
        if self.manifest.quantization and op.adapter_name() is None:
            raise OpError("unsupported", quantized_base_refusal(self.manifest.quantization))
        if self.replicas is not None:
            self.replicas.admit(kind, op)
        self.check_token_ids(op.token_lists())
        admission = kind.admit(self, op)
        faults.point("admission", mode=op.mode)
        self.check_memory(kind, op)
        return self.jobs.add(op, admission.n_samples, admission.skipped_ids, admission.warnings)

    def token_logprobs(self, op: TokenLogprobsOp) -> TokenLogprobs:
        self._require_ready()
        self.check_token_ids([("token_ids", op.token_ids)])
        return TokenLogprobs(logprobs=self._logprobs(op.token_ids))

    def head_scores(self, op: HeadScoresOp):
        self._require_ready()
        if self.group is not None:
            raise OpError("unsupported", f"reward-head scoring with tensor parallel size {self.group.size} is not supported yet")
        self.check_token_ids([("token_ids", op.token_ids)])
        return self.heads.scores(self.access, op)

    def checkpoint(self, op: CheckpointOp):
        self._require_ready()
        return self.checkpointer.write(self, op.target, op.adapters)

    def _logprobs(self, token_ids: list[int]) -> list[float]:
        """log P(token_ids[p] | token_ids[:p]) for p >= 1, from the trainer's model."""
        with self.access.exclusive() as model, self.on_ranks(LogprobsCommand(token_ids=token_ids)):
            return token_logprobs(model, self.trainer.token_nll, token_ids)

    @contextmanager
    def on_ranks(self, command) -> Iterator[None]:
        """Under tensor parallelism: every rank runs the block's model work with this one
        (``command`` tells them what). Alone: nothing to tell."""
        with self.group.command(RankEnvelope(command=command)) if self.group is not None else nullcontext():
            yield

    def train_on_ranks(self, kind, request, items: list, on_step, should_stop):
        """``kind.train`` on ``items`` (the admitted samples of ``request``), on every rank;
        the caller holds the model. A failure other than the job's own refusal leaves the
        ranks out of step: the trainer then restarts them once the job is reported."""
        if self.replicas is not None:
            return self.replicas.train(kind, request, items, on_step, should_stop)
        if self.group is None:
            return kind.train(self, items, request.options, on_step=on_step, should_stop=should_stop)
        try:
            with self.on_ranks(TrainCommand(request=request)):
                return kind.train(self, items, request.options, on_step=on_step,
                                  should_stop=lambda: agree(should_stop(), self.group.device))
        except OpError:
            raise
        except Exception:  # the command's broadcast included: a rank may die before the first step
            self.group.broken = True
            dead = self.group.death()
            if dead is not None:
                raise OpError("unavailable", f"{dead}; the job stopped after its last completed step (those steps stay "
                              "applied) and the trainer ranks restart") from None
            raise

    def cancel(self, job_id: str) -> JobInfo:
        info = self.jobs.cancel(job_id)
        if info.state == "cancelled":
            self.send(None, Event(event="job_finished", trainer_id=self.trainer_id, job=info, weights_version=self.weights_version,
                                  weights_changed=False, trainer_idle=self.jobs.running is None and self.jobs.idle()))
        return info

    def report_end(self, job: Job, weights_changed: bool) -> None:
        """The job_finished event to every API server process (a lost one is made up for by the callers' own polling)."""
        try:
            faults.point("event_send", job)
            self.send(None, Event(event="job_finished", trainer_id=self.trainer_id, job=job.info, weights_version=self.weights_version,
                                  weights_changed=weights_changed, trainer_idle=self.jobs.idle()))
        except Exception:
            logger.exception("job %s: its job_finished event was not sent (waiting callers poll for it)", job.info.job_id)

    # ---- the job thread -------------------------------------------------

    def job_loop(self) -> None:
        self.load()
        if envs.replica_group() is not None and self.state != "failed":
            self.replicas = ReplicaGroup(self, *envs.replica_group(), envs.replica_group_timeout_s())
            self.replicas.start()
        while not self.stopping and not self.gate_done.wait(0.5):
            pass  # jobs recovered from the journal wait for the parity gate
        while not self.stopping:
            job = self.jobs.next(lambda: self.stopping, on_idle=self._when_idle)
            if job is not None:
                self._run(job)

    def _when_idle(self) -> None:
        """The job thread with nothing queued: the last job's memory back to the OS, then a
        scheduled checkpoint when due."""
        self._release_heap()
        self.checkpointer.when_idle(self)

    def _release_heap(self) -> None:
        """glibc keeps freed heap pages; hand them back once per job, between jobs (it takes
        30-50 ms, so never between a job's last step and its answer)."""
        if self.heap_held:
            self.heap_held = False
            release_free_heap()

    def _run(self, job: Job) -> None:
        """Run one job and end it, whatever happens: the one guard around every kind. Any
        exception (a kind's, the memory check's, the journal's, the rank group's) fails the
        job with its type and message, logged with its traceback; the job thread goes on
        to the next job and the `wait` callers are answered."""
        self._release_heap()  # before the job's memory check: a job straight after another
        version_before = self.weights_version
        try:
            state, error = self._outcome(job)
        except OpError as exc:
            state, error = "failed", str(exc)
        except Exception as exc:
            logger.error("job %s failed:\n%s", job.info.job_id, traceback.format_exc())
            state, error = "failed", f"{type(exc).__name__}: {exc}"
        if state == "failed" and self.weights_version != version_before:
            error = f"{error} ({self.weights_version - version_before} updates had been applied to the served weights)"
        self._end(job, state, error, version_before)

    def _outcome(self, job: Job) -> Outcome:
        if self.state != "ready":
            return "failed", f"the trainer is {self.state}: {self.reason}"
        if job.cancel_requested:
            return "cancelled", None
        kind = kind_of(job.op)
        self.jobs.started(job)
        faults.point("memory_check", job)
        self.check_memory(kind, job.op)  # memory may have changed since submission
        faults.point("before_first_step", job)
        with faults.during(job):
            return kind.run(self, job)

    def _end(self, job: Job, state: str, error: str | None, version_before: int) -> None:
        """Report the job ended: counted, journaled, then the job_finished event. A failure
        here fails the job (once) and still answers; the event is last (a lost one is made
        up for by the callers' own polling)."""
        info = job.info
        try:
            if self.trainer is not None and self.trainer.optimizer is not None:
                self.optimizer_state_bytes = self.trainer.optimizer_bytes()  # the job thread owns the optimizer
            self.trained.add(info.result or {})
        except Exception:
            logger.exception("job %s: its figures could not be counted", info.job_id)
        self.heap_held = True
        info.finished_at, info.weights_version, info.error = time.time(), self.weights_version, error
        if self.weights_version != version_before:
            self.checkpointer.schedule()
        if self.replicas is not None:  # the other replicas' callers see it ended no later than this one's
            self.replicas.announce_end(info.model_copy(update={"state": state}))
        info.state = state  # last: whoever sees a finished job sees all of it
        try:
            faults.point("journal_write", job)
            self.jobs.end(job)  # counted and journaled before the event: the metrics show it to whoever hears it ended
        except Exception as exc:
            logger.error("job %s: its end could not be journaled:\n%s", info.job_id, traceback.format_exc())
            info.state = "failed"
            info.error = f"its end could not be journaled ({type(exc).__name__}: {exc}); it had ended {state}" + (
                f": {error}" if error else "")
            self.jobs.end(job, journal=False)
        self.report_end(job, self.weights_version != version_before)
        if self.group is not None and self.group.broken:
            logger.error("a job failed midway on the tensor-parallel ranks; restarting them")
            time.sleep(0.5)  # the event out first
            os._exit(RANK_DIED_EXIT)

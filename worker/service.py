"""The training subprocess's state: the view model, the job queue and the ops.

One thread (the transport loop in ``__main__``) answers requests; one job
thread loads the model and then runs jobs one at a time. Status never waits
for the model; ops that run the model (``token_logprobs``) wait for the job
thread to be between jobs, on a thread of their own.
"""

from __future__ import annotations

import contextlib
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
from hogwild.readout import store as readout_store
from hogwild.readout.corpus import CorpusError, read_corpus
from hogwild.readout.train import train_readout, write_training
from hogwild.training.batches import Sample
from hogwild.training.btrm import RewardHeads, last_token_features
from hogwild.training.btrm_data import build_labelled_set
from hogwild.training.btrm_run import encode, train_btrm_with_trunk_lora, train_on_features
from hogwild.training.circuit_breaker import CircuitBreakerTrainer
from hogwild.training.circuit_breaker_data import read_jsonl
from hogwild.training.hf_model import is_vision_language
from hogwild.training.lora import (
    attached_lora,
    factors_from_bytes,
    factors_to_bytes,
    load_factors,
    lora_factors,
    merge_in_place,
    revert_in_place,
)
from hogwild.training.memory import available_memory, estimate_job_memory
from hogwild.training.rounding import default_rounding
from hogwild.training.sft import SFTOptions, SFTTrainer

from .adapters import Adapter, AdapterBook
from .checkpoint import STATE_DIRNAME, CheckpointError, copy_model_dir, sync, write_state_file
from .jobs import Job, JobBook
from .journal import JobJournal
from .ledger import Ledger
from .manifest import Manifest, read_manifest
from .parity import compare, first_differing_tensor, probe_ids
from .process_memory import memory_snapshot, release_free_heap
from .protocol import (
    CancelOp,
    CheckpointOp,
    ErrorInfo,
    Event,
    HeadScoresOp,
    JobInfo,
    JobOp,
    OpError,
    ParityOp,
    Reply,
    Request,
    StatusOp,
    SubmitBTRMOp,
    SubmitCircuitBreakerOp,
    SubmitOp,
    SubmitReadoutOp,
    SubmitRevertOp,
    TokenLogprobsOp,
)
from .views import UnsupportedModel, bind_views, model_skeleton, served_views, shared_parameter_bytes

logger = logging.getLogger("hogwild.worker")

TRUNK_LORA_R, TRUNK_LORA_ALPHA = 16, 32  # the reward heads' optional trunk LoRA


class TrainerService:
    def __init__(self, session: Path, state_dir: Path, manifest_timeout: float = 120.0, restart_reason: str | None = None):
        self.session = session
        self.state_dir = state_dir
        self.manifest_timeout = manifest_timeout
        self.state = "starting"  # starting | verifying (the parity gate) | ready | unsupported | failed
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
        self.reader_ops = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hogwild-reader-ops")
        # Reward heads (BTRM) on the served trunk, and what they were trained with.
        self.heads: RewardHeads | None = None
        self.heads_info: dict | None = None
        self.trunk_lora: dict | None = None  # module -> (A, B, scaling) of the heads' private trunk LoRA
        self.tokenizer = None  # loaded by the jobs that need it
        # Circuit-breaker adapters merged into the served weights, kept so that they
        # can be reverted exactly; in the session directory, so a restarted trainer has them.
        self.adapters = AdapterBook(session / "adapters")
        self.adapter_attached = False  # a LoRA is on the view model: readers must wait
        self.optimizer_state_bytes = 0
        self.binding_private_bytes: int | None = None
        self.frozen: dict[str, str] = {}  # parameters kept frozen (not views of the served weights), with why
        self.parity: dict = {"state": "pending"}
        self.vision_tower: str | None = None  # a vision-language model's tower: what happens to it
        self.gate_done = threading.Event()  # the parity gate has decided (or loading failed): jobs may run
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
            self.frozen = bind_views(skeleton, self.manifest)
            model = skeleton
            if is_vision_language(self.manifest.model):
                self.vision_tower = "not trained: the trainer builds the language model only"
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
        self.parity = {"state": "pending", "probe_ids": probe_ids(self.vocab_size)}
        self.state = "verifying"  # until an API server brings vLLM's log-probabilities of the probe (ParityOp)
        logger.info("trainer bound: %s (%s, %d tensors); checking its forward against vLLM's", self.manifest.model,
                    self.manifest.dtype, len(self.manifest.tensors))

    def verify_parity(self, engine_logprobs: list[float]) -> dict:
        """The parity gate (``parity.py``): ready if the trainer's forward matches vLLM's, else training stays off."""
        if self.state != "verifying":
            return self.parity
        result = compare(self._logprobs(self.parity["probe_ids"]), engine_logprobs, self.manifest.dtype)
        if not result.passed:
            result.first_differing_tensor = first_differing_tensor(dict(self.model.named_parameters()), self.model_dir())
        self.parity.update(state="passed" if result.passed else "failed", max_abs_diff=result.max_abs_diff,
                           position=result.position, tolerance=list(result.tolerance),
                           first_differing_tensor=result.first_differing_tensor)
        if result.passed:
            self.state = "ready"
            self.gate_done.set()
            logger.info("trainer ready: its forward matches vLLM's (max |d log p| %.3g)", result.max_abs_diff)
        else:
            self._fail("unsupported", result.reason())
        return self.parity

    def model_dir(self) -> Path:
        return Path(self.manifest.model)

    def _restore(self) -> None:
        """Bring back what the last checkpoint of the served directory saved."""
        saved = self.model_dir() / STATE_DIRNAME
        self.ledger = Ledger.open(self.state_dir / "ledger.jsonl", str(self.session), saved / "ledger.jsonl")
        self.restored = {"from": str(saved) if saved.is_dir() else None, "ledger_ids": len(self.ledger), "optimizer_step": None}
        if (saved / "heads.json").exists():
            try:
                heads = RewardHeads.from_bytes((saved / "heads.safetensors").read_bytes(), (saved / "heads.json").read_bytes())
                if heads.extra.get("trunk_lora"):  # the heads read the trunk through it: both or neither
                    self.trunk_lora = factors_from_bytes((saved / "heads_trunk_lora.safetensors").read_bytes(),
                                                         json.loads((saved / "heads_trunk_lora.json").read_text()))
                self.heads, self.heads_info = heads, heads.extra
                self.restored["heads"] = self.heads.names
            except (OSError, ValueError, KeyError) as exc:
                self.restored["heads_error"] = f"the saved reward heads were not restored: {exc}"
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
        self.gate_done.set()

    # ---- requests -------------------------------------------------------

    def handle(self, request: Request, client: bytes) -> Reply | None:
        """The reply, or None when the op runs on the model thread and its reply
        goes to ``outbox`` later (the transport never waits for the model)."""
        if isinstance(request.body, (TokenLogprobsOp, CheckpointOp, ParityOp)):
            self.model_ops.submit(lambda: self.outbox.put((client, self._answer(request))))
            return None
        if isinstance(request.body, HeadScoresOp):  # reads the model without waiting for jobs (HOGWILD)
            self.reader_ops.submit(lambda: self.outbox.put((client, self._answer(request))))
            return None
        return self._answer(request)

    def _answer(self, request: Request) -> Reply:
        body = request.body
        try:
            if isinstance(body, StatusOp):
                result = self.status()
            elif isinstance(body, SubmitOp):
                result = self.submit(body).model_dump()
            elif isinstance(body, SubmitBTRMOp):
                result = self.submit_btrm(body).model_dump()
            elif isinstance(body, SubmitCircuitBreakerOp):
                result = self.submit_circuit_breaker(body).model_dump()
            elif isinstance(body, SubmitRevertOp):
                result = self.submit_revert(body).model_dump()
            elif isinstance(body, SubmitReadoutOp):
                result = self.submit_readout(body).model_dump()
            elif isinstance(body, HeadScoresOp):
                result = self.head_scores(body)
            elif isinstance(body, JobOp):
                result = self.jobs.get(body.job_id).info.model_dump()
            elif isinstance(body, CancelOp):
                result = self.cancel(body.job_id).model_dump()
            elif isinstance(body, TokenLogprobsOp):
                result = {"logprobs": self.token_logprobs(body.token_ids)}
            elif isinstance(body, CheckpointOp):
                result = self.checkpoint(body.target)
            elif isinstance(body, ParityOp):
                result = self.verify_parity(body.engine_logprobs)
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
        if self.state == "verifying":
            raise OpError("unavailable", "the trainer is checking that its forward matches vLLM's (the parity gate)")
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
        return self.jobs.add(op, len(op.samples), skipped, self.trainer.warnings(len(op.samples), op.options))

    def submit_btrm(self, op: SubmitBTRMOp) -> JobInfo:
        self._require_ready()
        names = {h.name for h in op.config.heads}
        for i, sample in enumerate(op.samples or []):
            if max(sample.ids) >= self.vocab_size:
                raise OpError("invalid", f"samples[{i}]: token id {max(sample.ids)} is outside the vocabulary (size {self.vocab_size})")
            for head, label in sample.labels.items():
                if head not in names:
                    raise OpError("invalid", f"samples[{i}]: no head {head!r} in the config (heads: {sorted(names)})")
                if label != "positive" and label not in op.config.tier_weights:
                    raise OpError("invalid", f"samples[{i}]: label {label!r} is neither 'positive' nor a tier of "
                                  f"tier_weights {sorted(op.config.tier_weights)}")
        return self.jobs.add(op, len(op.samples or []), [])

    def submit_circuit_breaker(self, op: SubmitCircuitBreakerOp) -> JobInfo:
        self._require_ready()
        for i, sample in enumerate(op.samples or []):
            if max(sample.ids) >= self.vocab_size:
                raise OpError("invalid", f"samples[{i}]: token id {max(sample.ids)} is outside the vocabulary (size {self.vocab_size})")
        if op.samples is not None and {s.split for s in op.samples} != {"harmful", "retain"}:
            raise OpError("invalid", "samples: a circuit-breaker run needs both harmful and retain samples")
        return self.jobs.add(op, len(op.samples or []), [])

    def submit_revert(self, op: SubmitRevertOp) -> JobInfo:
        self._require_ready()
        self.adapters.revertible(op.job_id)  # refuse at once what cannot be reverted
        return self.jobs.add(op, 0, [])

    def submit_readout(self, op: SubmitReadoutOp) -> JobInfo:
        self._require_ready()
        try:  # a corpus that cannot be used is refused now, before any forward pass
            corpus = read_corpus(op.stories, op.min_positives)
        except CorpusError as exc:
            raise OpError("invalid", f"stories: {exc}") from None
        num_layers = self.model.config.num_hidden_layers
        bad = [layer for layer in op.layers if not 0 <= layer < num_layers]
        if bad:
            raise OpError("invalid", f"layers: {bad[0]} is out of range (the served model has layers 0..{num_layers - 1})")
        return self.jobs.add(op, len(corpus.texts()), [])

    def _train_readout(self, job: Job) -> tuple[str, str | None]:
        """Concept vectors from the live weights (inference goes on), written to
        ``out`` and installed as the server's current set when readout is on."""
        op: SubmitReadoutOp = job.op
        try:
            corpus = read_corpus(op.stories, op.min_positives)
            job.info.total_steps = 1
            with torch.no_grad():
                result = train_readout(self.model, self._tokenizer(), corpus, sorted(set(op.layers)), op.aggregator,
                                       op.dtype, progress=False)
            written = write_training(result, op.out)
            loaded = None
            if readout_store.current_files(self.session) is not None:
                files, _ = readout_store.install(self.session, Path(written["vectors"]), Path(written["manifest"]),
                                                 self.model.config.hidden_size, self.model.config.num_hidden_layers)
                loaded = files.version
            self.jobs.progress(job, 1, 1)
        except Exception as exc:
            logger.error("job %s failed:\n%s", job.info.job_id, traceback.format_exc())
            return "failed", f"{type(exc).__name__}: {exc}"
        job.info.result = {**written, "concepts": list(result.vector_set.concepts), "layers": list(result.vector_set.layers),
                           "loaded_version": loaded, "warnings": corpus.warnings, "triage": result.triage}
        return "succeeded", None

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
                # By the checkpoint's own names (transformers may fuse what the files keep apart).
                tensors = served_views(self.model.hogwild_served_tensors, self.manifest.checkpoint_views)
                report = sync(tensors, directory).as_dict()
                state = self.trainer.save_state()
                files = {"ledger.jsonl": self.ledger.path.read_bytes() if self.ledger.path.exists() else b""}
                if state is not None:
                    files.update({"optimizer.safetensors": state[0], "optimizer.json": state[1]})
                if self.heads is not None:
                    tensors_bytes, meta = self.heads.to_bytes(self.heads_info)
                    files.update({"heads.safetensors": tensors_bytes, "heads.json": meta})
                    if self.trunk_lora:
                        lora_bytes, scaling = factors_to_bytes(self.trunk_lora)
                        files.update({"heads_trunk_lora.safetensors": lora_bytes,
                                      "heads_trunk_lora.json": json.dumps(scaling).encode()})
                for name, data in files.items():
                    write_state_file(directory, name, data)
            except CheckpointError as exc:
                raise OpError("conflict", str(exc)) from None
            except OSError as exc:
                raise OpError("conflict", f"could not write the checkpoint to {directory}: {exc}") from None
            report.update(state_bytes_written=sum(map(len, files.values())), optimizer_step=self.trainer.global_step,
                          optimizer_saved=state is not None, heads_saved=self.heads.names if self.heads else [],
                          ledger_ids=len(self.ledger), weights_version=self.weights_version, time=time.time())
            write_state_file(directory, "checkpoint.json", json.dumps(report).encode())
        if directory == source:
            self.sync_due = None
        self.last_checkpoint = report
        logger.info("checkpoint to %s: %d of %d blocks written (%d bytes) in %.2f s", directory, report["blocks_written"],
                    report["blocks_compared"], report["bytes_written"], report["seconds"])
        return report

    def _schedule_sync(self) -> None:
        if self.sync_after_s > 0:
            self.sync_due = time.monotonic() + self.sync_after_s  # batched: each job pushes it back

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

    def head_scores(self, op: HeadScoresOp) -> dict:
        """Scores of the reward heads at the given positions, from one trunk forward."""
        self._require_ready()
        heads = self.heads
        if heads is None:
            raise OpError("conflict", "no reward heads have been trained on this server yet (POST /train with mode btrm)")
        wanted = op.heads or heads.names
        unknown = [h for h in wanted if h not in heads.names]
        if unknown:
            raise OpError("invalid", f"no head {unknown[0]!r}; the heads are {heads.names}")
        if max(op.token_ids) >= self.vocab_size:
            raise OpError("invalid", f"token id {max(op.token_ids)} is outside the vocabulary (size {self.vocab_size})")
        if not all(0 <= p < len(op.token_ids) for p in op.positions):
            raise OpError("invalid", f"positions must be within the {len(op.token_ids)} tokens")
        device = next(self.model.parameters()).device
        trunk_lora = self.trunk_lora
        with contextlib.ExitStack() as stack, torch.no_grad():
            if self.adapter_attached or trunk_lora:  # a LoRA is, or is about to be, on the view model
                stack.enter_context(self.model_lock)
            if trunk_lora:  # the heads read the trunk through their private LoRA
                load_factors(stack.enter_context(attached_lora(self.model, r=TRUNK_LORA_R, alpha=TRUNK_LORA_ALPHA,
                                                               dropout=0.0)), trunk_lora)
            trunk = self.model.base_model
            hidden = trunk(input_ids=torch.tensor([op.token_ids], device=device), use_cache=False).last_hidden_state[0]
            scores = heads(hidden[torch.tensor(op.positions, device=device)].float().cpu())
        columns = [heads.names.index(h) for h in wanted]
        return {"heads": wanted, "scores": [[float(row[c]) for c in columns] for row in scores.tolist()]}

    def token_logprobs(self, token_ids: list[int]) -> list[float]:
        self._require_ready()
        if max(token_ids) >= self.vocab_size:
            raise OpError("invalid", f"token id {max(token_ids)} is outside the vocabulary (size {self.vocab_size})")
        return self._logprobs(token_ids)

    def _logprobs(self, token_ids: list[int]) -> list[float]:
        """log P(token_ids[p] | token_ids[:p]) for p >= 1, from the trainer's model."""
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
            "model_class": self.manifest.model_class if self.manifest else None,
            "frozen": self.frozen,
            "parity": self.parity,
            "vision_tower": self.vision_tower,
            "queue": [j.model_dump() for j in queued],
            "running": running.model_dump() if running else None,
            "recent": [j.model_dump() for j in recent],
            "max_queued_jobs": self.jobs.max_queued,
            "weights_version": self.weights_version,
            "ledger_size": len(self.ledger) if self.ledger else 0,
            "heads": self.heads_info,
            "adapters": self.adapters.history(),
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
                # How updates are written into the weights: the last job's, else the default for their dtype.
                "rounding": (trainer.optimizer.rounding if trainer.optimizer is not None else default_rounding(self.model))
                if trainer else None,
                "weight_spacing": trainer.weight_spacing if trainer else None,
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
        while not self.stopping and not self.gate_done.wait(0.5):
            pass  # jobs recovered from the journal wait for the parity gate
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
        elif isinstance(job.op, SubmitBTRMOp):
            state, error = self._train_btrm(job)
        elif isinstance(job.op, SubmitCircuitBreakerOp):
            state, error = self._train_circuit_breaker(job)
        elif isinstance(job.op, SubmitRevertOp):
            state, error = self._revert(job)
        elif isinstance(job.op, SubmitReadoutOp):
            state, error = self._train_readout(job)
        else:
            state, error = self._train_sft(job)
        if self.trainer is not None and self.trainer.optimizer is not None:
            self.optimizer_state_bytes = self.trainer.optimizer_bytes()  # the job thread owns the optimizer
        release_free_heap()
        info.finished_at, info.weights_version, info.error = time.time(), self.weights_version, error
        if self.weights_version != version_before:
            self._schedule_sync()
        info.state = state  # last: whoever sees a finished job sees all of it
        self.outbox.put((None, Event(event="job_finished", trainer_id=self.trainer_id, job=info,
                                     weights_version=self.weights_version, weights_changed=self.weights_version != version_before,
                                     trainer_idle=self.jobs.idle())))

    def _train_btrm(self, job: Job) -> tuple[str, str | None]:
        """Train the reward heads on features of the frozen, served trunk."""
        op: SubmitBTRMOp = job.op
        config = op.config
        names = [h.name for h in config.heads]
        try:
            if op.samples:
                ids = [s.ids[-config.max_length :] for s in op.samples]
                positive = torch.zeros(len(ids), len(names), dtype=torch.bool)
                negative_weight = torch.zeros(len(ids), len(names))
                for i, sample in enumerate(op.samples):
                    for head, label in sample.labels.items():
                        if label == "positive":
                            positive[i, names.index(head)] = True
                        else:
                            negative_weight[i, names.index(head)] = config.tier_weights[label]
                report = {"samples": len(ids)}
            else:
                labelled = build_labelled_set(config, Path("/"))
                ids, positive, negative_weight, report = (encode(self._tokenizer(), config, labelled.texts), labelled.positive,
                                                          labelled.negative_weight, labelled.report)
            if not ids:
                return "failed", "no samples: the sources held no readable text"
            job.info.n_samples = len(ids)
            job.info.total_steps = config.epochs + (config.trunk_lora_epochs if config.trunk_lora else 0)
            trunk_lora = None
            if config.trunk_lora:  # a LoRA private to this process: attached for training and scoring, never merged
                with self.model_lock:
                    self.adapter_attached = True
                    try:
                        with attached_lora(self.model, r=TRUNK_LORA_R, alpha=TRUNK_LORA_ALPHA, dropout=0.05) as peft_model:
                            result = train_btrm_with_trunk_lora(
                                peft_model, ids, names, positive, negative_weight, config, report,
                                progress=lambda stage, epoch, total: self.jobs.progress(job, epoch, total))
                            trunk_lora = lora_factors(peft_model)
                    finally:
                        self.adapter_attached = False
            else:
                features = last_token_features(self.model, ids)  # the served weights as they are now
                reuse = self.heads if self.heads is not None and self.heads.names == names and self.trunk_lora is None else None
                result = train_on_features(config, names, positive, negative_weight, features, heads=reuse, report=report,
                                           progress=lambda epoch, total, log: self.jobs.progress(job, epoch, total))
        except Exception as exc:
            logger.error("job %s failed:\n%s", job.info.job_id, traceback.format_exc())
            return "failed", f"{type(exc).__name__}: {exc}"
        job.info.result = result.summary()
        self.heads, self.trunk_lora = result.heads, trunk_lora
        self.heads_info = {"names": names, "descriptions": {h.name: h.description for h in config.heads},
                           "meta_prompt": config.meta_prompt, "max_length": config.max_length, "job_id": job.info.job_id,
                           "trained_at": time.time(), "held_out_accuracy": result.held_out_accuracy,
                           "trunk_lora": {"r": TRUNK_LORA_R, "alpha": TRUNK_LORA_ALPHA, "modules": len(trunk_lora)} if trunk_lora else None}
        self._schedule_sync()
        return "succeeded", None

    def _tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir()))
        return self.tokenizer

    def _train_circuit_breaker(self, job: Job) -> tuple[str, str | None]:
        """Train the LoRA on the live model (its weights untouched meanwhile), then
        merge it in place if the guards and the coherence check let it."""
        op: SubmitCircuitBreakerOp = job.op
        report = None
        try:
            samples = op.samples
            if samples is None:
                samples, report = read_jsonl(Path(op.dataset_path))
                if {s.split for s in samples} != {"harmful", "retain"}:
                    return "failed", (f"{op.dataset_path}: a circuit-breaker run needs both harmful and retain samples "
                                      f"({report['rows']} readable rows, {report['bad_rows']} bad)")
            job.info.n_samples, job.info.total_steps = len(samples), op.config.steps
            pad = getattr(self.model.config, "pad_token_id", None)
            trainer = CircuitBreakerTrainer(self.model, self._tokenizer(), op.config,
                                            pad_id=pad if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0)
            with self.model_lock:
                self.adapter_attached = True
                try:
                    result, factors = trainer.run(samples, on_step=lambda step, total: self.jobs.progress(job, step, total),
                                                  should_stop=lambda: job.cancel_requested,
                                                  log=lambda line: logger.info("job %s: %s", job.info.job_id, line))
                finally:
                    self.adapter_attached = False
                record = merge_in_place(self.model, factors) if factors else None
                if record is not None:
                    self.weights_version += 1
        except Exception as exc:
            logger.error("job %s failed:\n%s", job.info.job_id, traceback.format_exc())
            return "failed", f"{type(exc).__name__}: {exc}"
        summary = result.as_dict()
        summary.update(merged=record is not None, dataset=report)
        job.info.result = summary
        if result.tripped == "cancelled":
            return "cancelled", None
        if record is None:
            why = result.tripped and f"tripwire: {result.tripped}; rolled back to step {result.rolled_back_to_step}"
            why = why or "coherence check failed: " + "; ".join(result.coherence.get("reasons", []))
            return "failed", f"{why}; nothing was merged, the served weights are unchanged"
        self.adapters.add(Adapter(job_id=job.info.job_id, merged_at=time.time(), weights_version=self.weights_version,
                                  summary={k: summary[k] for k in ("steps", "target_layers", "lora_layers", "harmful_cos_before",
                                                                   "harmful_cos_after", "retain_l2_relative_after")},
                                  config=op.config.model_dump()), record)
        return "succeeded", None

    def _revert(self, job: Job) -> tuple[str, str | None]:
        """Subtract a merged adapter; exact (bitwise) unless the weights were trained since."""
        try:
            adapter, record = self.adapters.revertible(job.op.job_id)
        except OpError as exc:
            return "failed", str(exc)
        with self.model_lock:
            exact = revert_in_place(self.model, record)
            self.weights_version += 1
        self.adapters.reverted(adapter.job_id, exact)
        job.info.result = {"reverted": adapter.job_id, "exact": exact,
                           "note": None if exact else "the weights were trained after the merge: the adapter's delta "
                           "was subtracted, but the other changes stay"}
        return "succeeded", None

    def _train_sft(self, job: Job) -> tuple[str, str | None]:
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

"""This replica's trainer as a member of a group of serving replicas that train as one
data-parallel group (``contracts.replica_group`` has the wire messages).

Life cycle, on a thread of its own once the parity gate has passed: connect to the c10d
TCP store at ``HOGWILD_GROUP`` (replica 0's trainer hosts it), form a generation of the
group's process group (gloo on CPU; every replica must join), sync (every replica takes
the weights and optimizer of the one that has applied the most updates, only the blocks
that differ, ``replica_sync.catch_up``), compare fingerprints, then serve the group:
replica 0 (the leader) admits every job, its own and those the others forward through the
store, and runs each on the group (``train``); the others follow the leader's commands. A
collective that fails (a replica died) fails the running job on every replica, naming the
replica, and the group forms again with a new generation; until a replica has synced it
reports itself stale. Inference never waits for any of this.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hogwild.contracts.jobs import JOB_REQUESTS
from hogwild.contracts.protocol import CancelOp, JobInfo, JobOp, OpError, Reply, Request
from hogwild.contracts.replica_group import (
    EndedCommand,
    GroupEnvelope,
    GroupInfo,
    MemberRecord,
    ShareCommand,
)
from hogwild.training.data_parallel import DataParallel

from . import faults
from .replica_channel import forward, receive, send, serve_inbox
from .replica_sync import GroupRefused, catch_up, compare, gather_numbers

if TYPE_CHECKING:
    from .service import TrainerService

logger = logging.getLogger("hogwild.worker")

JOIN_ATTEMPT_S = 30.0  # one try at forming a generation's process group
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a step waits for the slowest replica's forward and backward
SILENT_AFTER_S = 3.0  # a member whose record is older than this is gone


class ReplicaGroup:
    """One replica's side of the group: its rank, the group's state, the channel."""

    def __init__(self, service: TrainerService, address: str, size: int, rank: int, timeout_s: float):
        host, _, port = address.rpartition(":")
        self.service, self.host, self.port = service, host, int(port)
        self.address, self.size, self.rank, self.timeout_s = address, size, rank, timeout_s
        self.leader = rank == 0
        self.state, self.reason = "forming", "waiting for the group to form"
        self.stale = True  # until this replica has synced with the group
        self.consistent: bool | None = None
        self.fingerprint: str | None = None
        self.generation = 0
        self.catch_up: dict | None = None
        self.members: list[MemberRecord] = []
        self.members_read_at: float | None = None  # when the heartbeat last read them (epoch seconds)
        self.heard: dict[int, tuple[float, float]] = {}  # rank -> (its record's seen_at, when it last changed here)
        self.formed_with: dict[int, str] = {}  # rank -> trainer id, in the current generation
        self.formed_at = 0.0
        self.store = None  # this replica's client of the group's store (the leader's: the server)
        self.group = None  # the current generation's process group
        self.broken = threading.Event()
        self.lock = threading.Lock()  # the leader: one command and its collectives at a time
        self.last_shared: str | None = None
        self.last_job: dict | None = None  # the last job run on the group: its id and what this replica all-reduced
        self.commands = 0  # commands sent (the leader) or taken (a follower) in this generation
        self.failed_generation = 0
        self.device = torch.device("cpu")
        self.forwarding = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hogwild-group-forward")

    def start(self) -> None:
        threading.Thread(target=self._life, name="hogwild-replica-group", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="hogwild-replica-heartbeat", daemon=True).start()
        if self.leader:
            threading.Thread(target=self._inbox, name="hogwild-replica-inbox", daemon=True).start()

    # ---- what the service asks --------------------------------------------

    def info(self) -> GroupInfo:
        return GroupInfo(size=self.size, rank=self.rank, state=self.state, reason=self.reason, consistent=self.consistent,
                         stale=self.stale, weights_version=self.service.weights_version, fingerprint=self.fingerprint,
                         generation=self.generation, catch_up=self.catch_up, last_job=self.last_job, members=self.members,
                         members_read_at=self.members_read_at)

    def admit(self, kind, op) -> None:
        """The leader: refuse a job the group cannot run now, saying why."""
        if not kind.tensor_parallel:
            raise OpError("unsupported", f"{op.mode} training in a replica group is not supported yet (sft, preference and "
                          "rl are): it would change one replica only")
        if getattr(getattr(op, "options", None), "reward_heads", None):
            raise OpError("unsupported", "reward_heads in a replica group is not supported yet: send rewards")
        if getattr(op, "adapter", None) is not None:
            raise OpError("unsupported", "adapter training in a replica group is not built yet: train adapters on a "
                          "replica alone")
        if self.state == "refused":
            raise OpError("unsupported", f"the replica group cannot train: {self.reason}")
        if self.state != "ready":
            raise OpError("unavailable", f"the replica group cannot train now ({self.state}): {self.reason}")

    def forwards(self, body) -> bool:
        """A follower sends jobs, cancels and the state of jobs it has not run to the leader."""
        if self.leader:
            return False
        if isinstance(body, JobOp):
            return body.job_id not in self.service.jobs.jobs
        return isinstance(body, (CancelOp, *JOB_REQUESTS))

    def forward(self, request: Request) -> Reply:
        """The leader's answer to ``request`` (through the group's store)."""
        return forward(self.host, self.port, self.address, self.rank, request)

    def train(self, kind, request, items, on_step, should_stop):
        """The leader: run a job on every replica, each on its share of every step; then compare fingerprints."""
        job = self.service.jobs.running
        with self.lock:
            if self.state != "ready":
                raise OpError("unavailable", f"the replica group cannot train now ({self.state}): {self.reason}")
            self.last_shared = job.info.job_id
            try:
                self._send(ShareCommand(job=job.info, request=request))
                result = self._train(job.info.job_id, kind, items, request.options, on_step, should_stop)
                self._compare(job.info.job_id)
            except OpError:
                raise
            except Exception as exc:
                raise OpError("unavailable", self._failed_during_job(exc)) from None
        if not self.consistent:
            raise OpError("conflict", self.reason)
        return result

    def announce_end(self, info: JobInfo) -> None:
        """The leader: a job every replica ran has ended: the others report it to their callers."""
        if info.job_id != self.last_shared:
            return
        with self.lock:
            if self.state not in ("ready", "inconsistent"):
                return
            try:
                self._send(EndedCommand(job=info))
                gather_numbers(self.group, 1, self.device)  # every follower has marked it ended
            except Exception as exc:
                self._break(f"the group's channel broke: {exc}")

    def _send(self, command) -> None:
        """The leader: flag the command in the store (what a follower waits on while idle: a
        collective would time out), then broadcast it."""
        self.commands += 1
        self.store.set(f"gen{self.generation}/cmd/{self.commands}", "1")
        send(self.group, GroupEnvelope(command=command))

    # ---- the group's life ---------------------------------------------------

    def _set(self, state: str, reason: str | None) -> None:
        if (state, reason) != (self.state, self.reason):
            logger.log(logging.INFO if state == "ready" else logging.WARNING, "replica group (rank %d of %d): %s%s",
                       self.rank, self.size, state, f": {reason}" if reason else "")
        self.state, self.reason = state, reason

    def _life(self) -> None:
        service = self.service
        service.gate_done.wait()
        if service.state != "ready":
            return self._set("refused", f"this replica's trainer is {service.state}: {service.reason}")
        since = time.monotonic()
        while not service.stopping:
            try:
                self._connect(since)
                self._form(since)
                self._sync()
            except GroupRefused as exc:
                return self._set("refused", f"{exc}; every replica serves on and refuses training until they are "
                                 "configured alike and restarted")
            except Exception as exc:
                self._drop(f"forming the group failed ({type(exc).__name__}: {exc}); trying again")
                time.sleep(1.0)
                continue
            if self.leader:
                self.broken.wait()
            else:
                self._follow()
            since = time.monotonic()

    def _waiting(self, since: float, why: str) -> None:
        """Still forming: past the rendezvous timeout, say this replica serves alone."""
        if time.monotonic() - since > self.timeout_s:
            self._set("alone", f"{why} within {self.timeout_s:g} s; this replica serves alone on its own weights "
                      f"({'stale' if self.stale else 'up to date'}) and keeps trying")
        else:
            self._set("forming", why)

    def _connect(self, since: float) -> None:
        while self.store is None:
            try:
                self.store = dist.TCPStore(self.host, self.port, self.size, self.leader, timeout=timedelta(seconds=10),
                                           wait_for_workers=False)
            except Exception as exc:
                self._waiting(since, f"could not reach the group's store at {self.address} (replica 0 hosts it): {exc}"
                              if not self.leader else f"could not host the group's store at {self.address}: {exc}")
                time.sleep(1.0)

    def _form(self, since: float) -> None:
        store = self.store
        if self.leader:
            generation = store.add("generation", 1)
            while store.add(f"gen{generation}/joined", 0) < self.size - 1:
                heard = sorted(set(self._live_ranks()) | {0})
                self._waiting(since, f"waiting for every replica to join generation {generation} (live: ranks {heard} "
                              f"of {self.size})")
                if self.service.stopping:
                    raise RuntimeError("stopping")
                time.sleep(0.2)
        else:
            while True:
                try:
                    store.wait(["generation"], timedelta(seconds=5))
                    generation = int(store.get("generation"))
                except Exception:
                    self._waiting(since, "waiting for the group's leader (replica 0) to open a generation")
                    continue
                if generation > self.failed_generation and not store.check([f"gen{generation}/formed"]):
                    break  # a generation the leader is still forming (a formed one goes on without this replica)
                self._waiting(since, f"waiting for the leader to open a generation after {generation}")
                time.sleep(0.5)
            store.add(f"gen{generation}/joined", 1)
        self._set("forming", f"forming generation {generation}")
        try:
            group = dist.ProcessGroupGloo(dist.PrefixStore(f"gen{generation}/pg", store), self.rank, self.size,
                                          timedelta(seconds=JOIN_ATTEMPT_S))
        except Exception:
            self.failed_generation = generation
            raise
        group.set_timeout(COLLECTIVE_TIMEOUT)
        if self.leader:
            store.set(f"gen{generation}/formed", "1")
        self.group, self.generation, self.commands = group, generation, 0
        self.broken.clear()

    def _sync(self) -> None:
        service = self.service
        self._set("syncing", f"generation {self.generation}: comparing weights with the other replicas")
        with service.access.exclusive():
            done = catch_up(self.group, self.rank, service.trainer, service.weights_version, service.tensor_parallel_size,
                            self.device)
            if done.weights_version > service.weights_version:
                service.weights_version = done.weights_version
            if done.received:
                service.optimizer_state_bytes = service.trainer.optimizer_bytes()
            self.catch_up = done.as_dict()
            ids = gather_numbers(self.group, int(service.trainer_id, 16), self.device)
            self.formed_with = {rank: f"{value:012x}" for rank, value in enumerate(ids)}
            self.formed_at = time.monotonic()
            self._compare(None)
        self.stale = not self.consistent
        if self.consistent:
            self._set("ready", None)
        logger.info("replica group generation %d synced: %s", self.generation, self.catch_up)

    def _compare(self, job_id: str | None) -> None:
        """Every replica's fingerprint compared; a difference stops training on the group."""
        result = compare(self.group, self.service.trainer.model, self.device)
        self.fingerprint, self.consistent = result.fingerprints[self.rank], result.consistent
        if not result.consistent:
            after = f"after job {job_id}" if job_id else "after the sync"
            self._set("inconsistent", f"the replicas' weights differ {after} ({result.first_difference}; fingerprints "
                      f"{result.fingerprints}): training is stopped on the group while serving goes on; restart the "
                      "replica that differs (it catches up from the others)")

    def _train(self, job_id: str, kind, items, options, on_step, should_stop):
        trainer = self.service.trainer
        trainer.data_parallel = parallel = DataParallel(self.group, self.rank, self.size, self.device)
        try:
            return kind.train(self.service, items, options, on_step=on_step,
                              should_stop=lambda: parallel.agree(should_stop()))
        finally:
            trainer.data_parallel = None
            self.last_job = {"job_id": job_id,
                             "allreduce_bytes": parallel.bytes_sent}

    def _failed_during_job(self, exc: Exception) -> str:
        """Why a job failed on the group: the replicas that went silent, else the collective's error."""
        deadline = time.monotonic() + SILENT_AFTER_S + 3.0  # a dead replica's record stops changing
        while not (gone := [r for r in range(self.size) if r != self.rank and r not in self._live_ranks()]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        who = ", ".join(f"replica {r}" for r in gone) if gone else "a replica"
        reason = (f"{who} of the group failed during this job ({type(exc).__name__}: {str(exc)[:300]}); no replica applied "
                  "a partial step (gradients are summed before any weight is written): the steps completed before stay "
                  "applied on the live replicas, and a restarted replica gets them when it rejoins")
        self._break(reason)
        return reason

    def _break(self, reason: str) -> None:
        self._drop(f"the group broke: {reason}; forming again")
        if not self.leader:
            self.store = None  # the leader may be gone with the store it hosts: connect again
        self.broken.set()

    def _drop(self, reason: str) -> None:
        group, self.group = self.group, None
        if group is not None:
            try:
                group.shutdown()
            except Exception:
                pass
        self.consistent = None
        self._set("forming", reason)

    # ---- a follower ---------------------------------------------------------

    def _follow(self) -> None:
        while not self.service.stopping:
            try:
                flag = f"gen{self.generation}/cmd/{self.commands + 1}"
                try:
                    self.store.wait([flag], timedelta(seconds=5))
                except dist.DistStoreError as exc:
                    if "timeout" not in str(exc).lower():
                        raise
                    if int(self.store.get("generation")) > self.generation:  # the leader formed the group again
                        return self._break("the leader opened a new generation")
                    continue  # nothing to do yet
                self.commands += 1
                self.store.delete_key(flag)
                command = receive(self.group).command
                if isinstance(command, ShareCommand):
                    self._run_share(command)
                else:
                    self._report_end(command.job)
            except Exception as exc:
                logger.exception("replica group: the leader's channel broke")
                return self._break(f"the leader's channel broke ({type(exc).__name__}: {exc})")

    def _run_share(self, command: ShareCommand) -> None:
        from .kinds import kind_of

        service = self.service
        job = service.jobs.mirror(command.job)
        kind = kind_of(command.request)
        faults.point("replica_share", job)
        version_before = service.weights_version

        def on_step(step: int, total: int, result) -> None:
            service.weights_version = version_before + result.steps
            service.jobs.progress(job, step, total)

        with service.access.exclusive():
            try:
                self._train(job.info.job_id, kind, kind.items(command.request.samples), command.request.options, on_step,
                            lambda: False)
            except OpError:
                return  # the job's own refusal: the leader's copy of the job refuses it alike, the group goes on
            self._compare(command.job.job_id)

    def _report_end(self, info: JobInfo) -> None:
        service = self.service
        job = service.jobs.end_mirror(info.model_copy(update={"trainer_id": service.trainer_id,
                                                              "weights_version": service.weights_version}))
        gather_numbers(self.group, 1, self.device)  # the leader ends it for its callers after this
        service.report_end(job, weights_changed=True)

    # ---- the leader's inbox and everyone's record ---------------------------

    def _inbox(self) -> None:
        serve_inbox(self.host, self.port, self.service)

    def record(self) -> MemberRecord:
        return MemberRecord(rank=self.rank, host=socket.gethostname(), pid=os.getpid(), trainer_id=self.service.trainer_id,
                            state=self.state, stale=self.stale, weights_version=self.service.weights_version,
                            fingerprint=self.fingerprint, seen_at=time.time())

    def _live_ranks(self) -> list[int]:
        """The ranks whose record changed in the last ``SILENT_AFTER_S`` (this machine's clock: no skew)."""
        now = time.monotonic()
        return [rank for rank, (_, changed) in self.heard.items() if now - changed < SILENT_AFTER_S]

    def _watch_members(self) -> None:
        """The leader, between jobs: a replica that went silent or restarted (another trainer id)
        breaks the group now, so that it forms again with the replica's next incarnation (in a
        job, the job's collective fails on its own)."""
        if not self.leader or self.state not in ("ready", "inconsistent") or not self.formed_with:
            return
        if time.monotonic() - self.formed_at < SILENT_AFTER_S + 1.0:  # records read before it formed may be older
            return
        live = {m.rank: m.trainer_id for m in self.members if m.rank in self._live_ranks()}
        gone = [r for r, trainer in self.formed_with.items() if r != self.rank and live.get(r) != trainer]
        if gone and self.lock.acquire(blocking=False):
            try:
                self.formed_with = {}
                self._break(f"{', '.join(f'replica {r}' for r in gone)} stopped or restarted")
            finally:
                self.lock.release()

    def _heartbeat(self) -> None:
        """Publish this replica's record and read everyone's, about once a second."""
        store, failing = None, False
        while not self.service.stopping:
            try:
                if store is None:
                    store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=2))
                store.set(f"member/{self.rank}", self.record().model_dump_json())
                keys = [f"member/{r}" for r in range(self.size)]
                self.members = [MemberRecord.model_validate_json(store.get(k)) for k in keys if store.check([k])]
                self.members_read_at = time.time()
                for m in self.members:
                    if self.heard.get(m.rank, (None,))[0] != m.seen_at:
                        self.heard[m.rank] = (m.seen_at, time.monotonic())
                self._watch_members()
                if failing:
                    logger.info("replica group: the group's store answers again")
                failing = False
            except Exception as exc:
                # Once per outage: the member list in /train/status keeps its last read (members_read_at).
                logger.log(logging.DEBUG if failing else logging.WARNING, "replica group: heartbeat through the "
                           "store at %s:%d failed: %s: %s", self.host, self.port, type(exc).__name__, exc)
                store, failing = None, True
            time.sleep(1.0)

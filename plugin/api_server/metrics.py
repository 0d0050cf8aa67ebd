"""The plugin's Prometheus metrics, on vLLM's own ``/metrics``.

They live in prometheus_client's default registry, which vLLM's ``/metrics`` serves; with
several API server processes vLLM runs prometheus_client in multiprocess mode and every
process's values go to files that any process's ``/metrics`` adds up. So the trainer's
figures are published by one process only, the one that owns the trainer (each refresh
sets gauges, and adds to counters what the trainer's totals gained since the last one;
a new trainer process starts its totals at zero and the counters keep climbing), and
gauges take the most recent value; rows of readout each process counts for itself.
"""

from __future__ import annotations

import functools
import time

from prometheus_client import Counter, Gauge

from hogwild.contracts.protocol import TrainerStatus


class Metrics:
    def __init__(self):
        gauge = functools.partial(Gauge, multiprocess_mode="mostrecent")
        self.jobs_submitted = Counter("hogwild_jobs_submitted", "Training jobs accepted, by mode", ["mode"])
        self.jobs_finished = Counter("hogwild_jobs_finished", "Training jobs ended, by mode and final state", ["mode", "state"])
        self.tokens_trained = Counter("hogwild_tokens_trained", "Tokens processed by applied optimizer steps")
        self.optimizer_steps = Counter("hogwild_optimizer_steps", "Optimizer steps applied to the served weights")
        self.checkpoint_bytes = Counter("hogwild_checkpoint_bytes_written", "Bytes written by checkpoint syncs")
        self.checkpoint_seconds = Counter("hogwild_checkpoint_seconds", "Seconds spent in checkpoint syncs")
        self.trainer_restarts = Counter("hogwild_trainer_restarts", "Times the training process was started again")
        self.journal_unreadable = Counter("hogwild_journal_unreadable",
                                          "Job journal records that no longer parsed, moved to the journal's unreadable/")
        self.readout_rows = Counter("hogwild_readout_rows", "Rows of concept readouts received from the model worker")
        self.last_loss = gauge("hogwild_last_loss", "Loss of the last optimizer step")
        self.weights_version = gauge("hogwild_weights_version", "Version of the served weights (+1 per change)")
        self.rl_last_step = gauge("hogwild_rl_last_step", "The last RL job's last optimizer step: loss, ratio_mean, "
                                  "clip_fraction, truncated_fraction, kl, advantage_mean, logprob_gap_mean/max", ["stat"])
        self.queue_depth = gauge("hogwild_queue_depth", "Training jobs waiting")
        self.trainer_up = gauge("hogwild_trainer_up", "1 while the training process answers and is ready to train")
        self.since_step = gauge("hogwild_seconds_since_last_step", "Seconds since the last optimizer step")
        self.group_consistent = gauge("hogwild_group_consistent", "1 while every replica of this replica's group has the "
                                      "same weights (the last fingerprint comparison), 0 otherwise; absent alone")
        self.group_stale = gauge("hogwild_group_stale", "1 until this replica has the group's weights (a load balancer may "
                                 "hold it out meanwhile), 0 after; absent alone")
        self.served_adapters = gauge("hogwild_served_adapters", "Adapters the trainer holds, served by name (--enable-lora)")
        self.since_checkpoint = gauge("hogwild_seconds_since_last_checkpoint", "Seconds since the last checkpoint sync")
        self._seen: tuple[str | None, dict] = (None, {})  # (trainer id, its totals at the last refresh)
        self._restarts = 0

    def refresh(self, status: TrainerStatus | None, restarts: int) -> None:
        """Publish the trainer's figures (``status``: None while it cannot be reached)."""
        if restarts > self._restarts:
            self.trainer_restarts.inc(restarts - self._restarts)
            self._restarts = restarts
        if status is None:
            self.trainer_up.set(0)
            return
        self.trainer_up.set(1 if status.state == "ready" else 0)
        totals = status.totals
        trainer_id, seen = self._seen
        before = seen if trainer_id == status.trainer_id else {}
        for mode, n in totals.get("jobs_submitted", {}).items():
            self._add(self.jobs_submitted.labels(mode=mode), n, before.get("jobs_submitted", {}).get(mode, 0))
        for key, n in totals.get("jobs_finished", {}).items():
            mode, _, state = key.partition("/")
            self._add(self.jobs_finished.labels(mode=mode, state=state), n, before.get("jobs_finished", {}).get(key, 0))
        for counter, key in ((self.tokens_trained, "tokens_trained"), (self.optimizer_steps, "optimizer_steps"),
                             (self.checkpoint_bytes, "checkpoint_bytes_written"), (self.checkpoint_seconds, "checkpoint_seconds"),
                             (self.journal_unreadable, "journal_unreadable")):
            self._add(counter, totals.get(key, 0), before.get(key, 0))
        self._seen = (status.trainer_id, totals)
        if totals.get("last_loss") is not None:
            self.last_loss.set(totals["last_loss"])
        for stat, value in (totals.get("last_rl_step") or {}).items():
            self.rl_last_step.labels(stat=stat).set(value)
        self.weights_version.set(status.weights_version)
        self.queue_depth.set(len(status.queue))
        self.served_adapters.set(len(status.served_adapters))
        if status.group is not None:
            self.group_consistent.set(1 if status.group.get("consistent") else 0)
            self.group_stale.set(1 if status.group.get("stale") else 0)
        now = time.time()
        for gauge, key in ((self.since_step, "last_step_at"), (self.since_checkpoint, "last_checkpoint_at")):
            if totals.get(key) is not None:
                gauge.set(now - totals[key])

    @staticmethod
    def _add(counter, total: float, seen: float) -> None:
        if total > seen:
            counter.inc(total - seen)


@functools.cache
def metrics() -> Metrics:
    """This process's metrics (registered once)."""
    return Metrics()

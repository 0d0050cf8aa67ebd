"""``python -m bench data_parallel``: two serving replicas that train as one data-parallel group
(``HOGWILD_GROUP``) against one replica alone, on the ~28M-parameter bench model (fp32).

- ``replica_weight_max_abs_diff``: after jobs posted to each replica, the largest difference
  between the two replicas' served weights (read from their weight arenas). Goal 0.
- ``allreduce_bytes_per_step_ratio``: what each replica handed to the gradient all-reduce per
  optimizer step / the parameter bytes (the bytes a replica puts on the wire are this times
  2(n-1)/n for a ring all-reduce of n replicas; a peer's full-weight broadcast sends the
  parameter bytes from rank 0 to each of the other n-1 replicas after every update).
- ``dp2_vs_dp1_train_tokens_per_s_ratio``: the same SFT job's training tokens/s on the group of
  two replicas (one core each) / on one replica alone given both cores. Reported, no goal.
- ``catch_up_seconds``, ``catch_up_bytes``: a replica killed after N optimizer steps were taken
  since its copy on disk, restarted: the sync that brings it to the group's weights (changed
  blocks and the optimizer state), against ``weight_bytes`` (the whole weights).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from concurrent.futures import ThreadPoolExecutor
import time
from pathlib import Path

import httpx
import numpy as np

from hogwild.launch import VllmServer, free_port

from .common import CACHE, machine, model_dir

SAMPLES = [{"context_ids": [5 + i, 17, 300 + i, 42] * 4, "continuation_ids": [(7 * i + j) % 900 + 50 for j in range(48)]}
           for i in range(32)]
JOB = {"lr": 1e-5, "rank": 16, "batch_size": 32, "micro_batch_size": 4, "eval_tokens": 0, "shuffle": False}


def start(path: Path, work: Path, name: str, cores: str, threads: int, group: dict | None = None) -> VllmServer:
    env = {"HOGWILD_STATE_DIR": str(work / f"{name}-state"), "HOGWILD_SESSION_DIR": str(Path("/dev/shm") / f"hogwild-bench-{name}-{os.getpid()}"),
           "HOGWILD_ADMIN_KEY": "bench", "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0", "HOGWILD_TRAINER_THREADS": str(threads),
           "VLLM_CPU_OMP_THREADS_BIND": cores, **(group or {})}
    return VllmServer(path, log_path=CACHE / "bench" / f"data-parallel-{name}.log", dtype="float32", env=env)


def train(server: VllmServer, steps: int) -> dict:
    r = httpx.post(f"{server.url}/train", json={"samples": SAMPLES, **JOB, "steps": steps, "wait": True},
                   headers={"X-Hogwild-Admin-Key": "bench"}, timeout=3600)
    r.raise_for_status()
    job = r.json()
    assert job["state"] == "succeeded", job
    return job


def status(server: VllmServer) -> dict:
    return httpx.get(f"{server.url}/train/status", timeout=30).json()


def wait_group_ready(servers: list[VllmServer], timeout: float = 600.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        groups = [status(s).get("group") for s in servers]  # none while a trainer starts
        if all(g and g["state"] == "ready" and not g["stale"] for g in groups):
            return groups
        if time.monotonic() > deadline:
            raise TimeoutError(f"the group did not form: {groups}")
        time.sleep(0.5)


def arena(server: VllmServer) -> np.ndarray:
    return np.fromfile(Path(server.env["HOGWILD_SESSION_DIR"]) / "weights.bin", dtype=np.float32)


def run(quick: bool = False, log=print) -> dict:
    preset = "tiny" if quick else "bench"
    path = model_dir(preset)
    steps = 2 if quick else 4
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    out: dict = {"benchmark": "data_parallel", "machine": machine(), "model": {"preset": preset, "dtype": "float32"},
                 "job": {**JOB, "steps": steps, "samples": len(SAMPLES),
                         "tokens_per_step": sum(len(s["continuation_ids"]) for s in SAMPLES)}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log("one replica alone, both cores")
        shutil.copytree(path, work / "alone-model")
        alone = start(work / "alone-model", work, "alone", "0-1", 2)
        alone.start(timeout=900)
        try:
            alone.wait_trainer(timeout=600)
            train(alone, 1)  # warm-up
            out["dp1_train_tokens_per_s"] = train(alone, steps)["result"]["tokens_per_s"]
            out["model"]["bytes"] = status(alone)["memory"]["param_bytes"]
        finally:
            alone.stop()
            shutil.rmtree(alone.env["HOGWILD_SESSION_DIR"], ignore_errors=True)
        log("two replicas in one group, one core each")
        address = f"127.0.0.1:{free_port()}"
        replicas = []
        for rank in range(2):
            shutil.copytree(path, work / f"replica{rank}-model")
            replicas.append(start(work / f"replica{rank}-model", work, f"replica{rank}", str(rank), 1, {
                "HOGWILD_GROUP": address, "HOGWILD_GROUP_SIZE": "2", "HOGWILD_GROUP_RANK": str(rank)}))
        try:
            with ThreadPoolExecutor(len(replicas)) as pool:  # started side by side; the first failure raises
                list(pool.map(lambda s: s.start(timeout=900), replicas))
            for s in replicas:
                s.wait_trainer(timeout=600)
            wait_group_ready(replicas)
            train(replicas[1], 1)  # warm-up, through the follower
            job = train(replicas[0], steps)
            out["dp2_train_tokens_per_s"] = job["result"]["tokens_per_s"]
            out["dp2_vs_dp1_train_tokens_per_s_ratio"] = out["dp2_train_tokens_per_s"] / out["dp1_train_tokens_per_s"]
            groups = wait_group_ready(replicas)
            per_step = groups[0]["last_job"]["allreduce_bytes"] / job["result"]["steps"]
            out["allreduce_bytes_per_step"] = per_step
            out["allreduce_bytes_per_step_ratio"] = per_step / out["model"]["bytes"]
            out["replica_weight_max_abs_diff"] = float(np.abs(arena(replicas[0]) - arena(replicas[1])).max())
            out["fingerprints_equal"] = groups[0]["fingerprint"] == groups[1]["fingerprint"]
            log("replica 1 killed and restarted: its copy on disk is behind by every step so far")
            behind = status(replicas[1])["optimizer"]["step"]
            os.killpg(replicas[1].proc.pid, signal.SIGKILL)
            replicas[1].proc.wait()
            shutil.rmtree(replicas[1].env["HOGWILD_SESSION_DIR"], ignore_errors=True)
            started = time.perf_counter()
            replicas[1].start(timeout=900)
            groups = wait_group_ready(replicas)
            out["rejoin_seconds_with_server_start"] = time.perf_counter() - started
            caught = groups[1]["catch_up"]
            out["catch_up_steps_missed"] = behind
            out["catch_up_seconds"] = caught["seconds"]
            out["catch_up_bytes"] = caught["bytes_sent"] + caught["optimizer_bytes"]
            out["catch_up_weight_bytes"] = caught["bytes_sent"]
            out["catch_up_optimizer_bytes"] = caught["optimizer_bytes"]
            out["weight_bytes"] = out["model"]["bytes"]
            out["replica_weight_max_abs_diff_after_catch_up"] = float(np.abs(arena(replicas[0]) - arena(replicas[1])).max())
        finally:
            for s in replicas:
                s.stop()
                shutil.rmtree(s.env["HOGWILD_SESSION_DIR"], ignore_errors=True)
    return out

"""Two real `vllm serve` replicas (one core each) that train as one data-parallel group
(``HOGWILD_GROUP``): a job posted to either changes both, bitwise alike; the group's job
equals one replica's on the whole batch; a replica killed mid-job fails the job on the
group with its name while the other serves unchanged, and once restarted it catches up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hogwild.launch import VllmServer, free_port
from ..conftest import ADMIN_KEY, API_KEY, LIMITS, Served
from ..waiting import wait_until
from .test_llama_compiled import hogwild_metrics

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]
SAMPLES = [{"context_ids": [3, 4, 5], "continuation_ids": [40, 41, 42, 43, 44, 45]},
           {"context_ids": [6, 7], "continuation_ids": [50, 51]},
           {"context_ids": [8, 9, 10, 11], "continuation_ids": [60, 61, 62, 63, 64, 65, 66, 67]},
           {"context_ids": [12], "continuation_ids": [70, 71, 72]}]
OPTIONS = {"lr": 1e-3, "rank": 4, "steps": 3, "micro_batch_size": 1, "seed": 5}


class Replica:
    """One replica of the group: its server, restartable with the same model, state and place."""

    def __init__(self, model_dir: Path, tmp: Path, rank: int, address: str, fault_file: Path):
        shutil.copytree(model_dir, tmp / f"replica{rank}-model")
        self.model_dir, self.tmp, self.rank = tmp / f"replica{rank}-model", tmp, rank
        self.env = {"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS, "HOGWILD_GROUP": address, "HOGWILD_GROUP_SIZE": "2",
                    "HOGWILD_GROUP_RANK": str(rank), "HOGWILD_GROUP_TIMEOUT_S": "60", "HOGWILD_TRAINER_THREADS": "1",
                    "VLLM_CPU_OMP_THREADS_BIND": str(rank % max(1, os.cpu_count() or 1)),
                    "HOGWILD_STATE_DIR": str(tmp / f"replica{rank}-state"), "HOGWILD_TEST_FAULTS": str(fault_file)}
        self.server: VllmServer | None = None
        self.handle: Served | None = None

    def start(self, extra_args: list[str] | None = None, env: dict | None = None) -> None:
        session = Path("/dev/shm") / f"hogwild-test-{os.getpid()}-replica{self.rank}-{time.monotonic_ns() % 10**6}"
        self.server = VllmServer(self.model_dir, log_path=self.tmp / f"replica{self.rank}-vllm.log", api_key=API_KEY,
                                 dtype="float32", env={**self.env, "HOGWILD_SESSION_DIR": str(session), **(env or {})},
                                 extra_args=extra_args)
        self.server.start(timeout=600)
        self.server.wait_trainer()
        self.handle = Served(self.server, self.model_dir, session, Path(self.env["HOGWILD_STATE_DIR"]))

    @property
    def http(self) -> httpx.Client:
        return self.handle.http

    def group(self) -> dict:
        return self.http.get("/train/status").json()["group"]

    def score(self) -> float:
        r = self.http.post("/v1/score", json={"prompt": PROMPT, "score_ranges": [[1, len(PROMPT)]]})
        assert r.status_code == 200, r.text
        return r.json()["scores"][0]["total_logprob"]

    def kill(self) -> None:
        os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait()
        shutil.rmtree(self.handle.session, ignore_errors=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.server.env["HOGWILD_SESSION_DIR"], ignore_errors=True)


def wait_ready(replicas, timeout: float = 240.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        groups = [r.group() for r in replicas]
        if all(g["state"] == "ready" and not g["stale"] for g in groups):
            return groups
        assert time.monotonic() < deadline, groups
        time.sleep(0.5)


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replica-faults") / "fault.json"


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory, fault_file):
    tmp = tmp_path_factory.mktemp("replica-group")
    address = f"127.0.0.1:{free_port()}"
    group = [Replica(tiny_model_dir, tmp, rank, address, fault_file) for rank in range(2)]
    try:
        with ThreadPoolExecutor(len(group)) as pool:  # started side by side; the first failure raises
            list(pool.map(Replica.start, group))
        wait_ready(group)
        yield group
    finally:
        for r in group:
            r.stop()


def train(replica: Replica, **extra) -> dict:
    r = replica.http.post("/train", json={"samples": SAMPLES, **OPTIONS, "wait": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_group_job_equals_one_replica_training_on_the_whole_batch(replicas):
    import torch
    from transformers import AutoModelForCausalLM

    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.batches import Sample
    from hogwild.training.sft import SFTTrainer

    job = train(replicas[0])  # on fresh weights: the same as on disk
    assert job["state"] == "succeeded", job
    alone = SFTTrainer(AutoModelForCausalLM.from_pretrained(replicas[0].model_dir, torch_dtype=torch.float32))
    expected = alone.run([Sample(tuple(s["context_ids"]), tuple(s["continuation_ids"]), 1.0, None) for s in SAMPLES],
                         SFTOptions(**OPTIONS))
    got = [h["loss"] for h in job["result"]["history"]]
    assert len(got) == 3
    assert got == pytest.approx([h["loss"] for h in expected.history], rel=1e-5, abs=1e-6)
    assert job["result"]["tokens"] == expected.tokens  # the whole batch's tokens, not one replica's share
    assert replicas[0].group()["last_job"]["allreduce_bytes"] > 0


def test_a_job_posted_to_either_replica_changes_both_alike(replicas, capsys):
    before = [r.score() for r in replicas]
    assert before[0] == before[1]
    for target in (1, 0):
        job = train(replicas[target], lr=2e-3)
        assert job["state"] == "succeeded" and job["result"]["steps"] == 3, job
        after = [r.score() for r in replicas]
        assert after[0] == after[1] and after[0] != before[0], (target, before, after)  # bitwise, and moved
        before = after
    groups = wait_ready(replicas)
    assert groups[0]["fingerprint"] == groups[1]["fingerprint"] and all(g["consistent"] for g in groups)
    assert groups[0]["weights_version"] == groups[1]["weights_version"]
    # A job posted to replica 1 is the group's: one id, answerable from either replica.
    r = replicas[1].http.post("/train", json={"samples": SAMPLES, **OPTIONS})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 60
    while (info := replicas[0].http.get(f"/train/{job_id}").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert info["state"] == "succeeded"
    assert replicas[1].http.get(f"/train/{job_id}").json()["state"] == "succeeded"
    for replica in replicas:
        # Each replica reads the members' records about once a second; a read that times out keeps the last list.
        members = wait_until(lambda: (lambda ms: ms if len(ms) == 2 else None)(replica.group()["members"]), timeout=60,
                             what="both replicas' records in the member list")
        assert sorted(m["rank"] for m in members) == [0, 1]
        assert time.time() - replica.group()["members_read_at"] < 10  # the list is fresh (read ~once a second)
        metrics = hogwild_metrics(replica.server.url, replica.server.headers())
        assert metrics["hogwild_group_consistent"] == 1.0 and metrics["hogwild_group_stale"] == 0.0
    from hogwild.cli import main as cli

    capsys.readouterr()
    cli(["status", replicas[1].server.url, "--api-key", API_KEY])
    printed = capsys.readouterr().out
    assert "rank 1 of 2, ready" in printed and "replicas agree" in printed and "yes" in printed
    assert "replica 0 " in printed and "replica 1 " in printed and "member list read" in printed, printed


def test_a_job_cancelled_through_a_follower_stops_every_replica_at_the_same_step(replicas):
    r = replicas[1].http.post("/train", json={"samples": SAMPLES, **OPTIONS, "steps": 5000, "lr": 1e-6})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 60
    while replicas[1].http.get(f"/train/{job_id}").json()["step"] < 2:  # running on the follower too
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert replicas[1].http.delete(f"/train/{job_id}").status_code == 200
    deadline = time.monotonic() + 60
    while (info := replicas[1].http.get(f"/train/{job_id}").json())["state"] not in ("cancelled", "succeeded", "failed"):
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert info["state"] == "cancelled" and replicas[0].http.get(f"/train/{job_id}").json()["state"] == "cancelled"
    groups = wait_ready(replicas)
    assert groups[0]["fingerprint"] == groups[1]["fingerprint"] and groups[0]["consistent"]
    assert replicas[0].score() == replicas[1].score()


@pytest.mark.parametrize("body, fragment", [
    ({"mode": "circuit_breaker"}, "circuit_breaker training in a replica group is not supported yet"),
])
def test_a_mode_the_group_cannot_run_is_refused_and_changes_nothing(replicas, body, fragment):
    before = [r.score() for r in replicas]
    r = replicas[1].http.post("/train", json={"samples": SAMPLES, **body})
    assert r.status_code in (422, 501), r.text
    if r.status_code == 501:
        assert fragment in r.text
    assert [r.score() for r in replicas] == before


def test_a_replica_killed_mid_job_fails_it_by_name_and_catches_up_when_restarted(replicas, fault_file):
    leader, follower = replicas
    before = leader.score()
    fault_file.write_text(json.dumps({"phase": "replica_share", "mode": None, "action": "hang"}))
    r = leader.http.post("/train", json={"samples": SAMPLES, **OPTIONS})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    fired = fault_file.with_name(fault_file.name + ".fired")
    deadline = time.monotonic() + 60
    while not fired.exists():
        assert time.monotonic() < deadline, "replica 1 never started its share"
        time.sleep(0.1)
    follower.kill()
    deadline = time.monotonic() + 60
    while (info := leader.http.get(f"/train/{job_id}").json())["state"] not in ("failed", "succeeded"):
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert info["state"] == "failed" and "replica 1" in info["error"], info
    assert leader.score() == before  # no step applied anywhere: the all-reduce comes before any write
    refused = leader.http.post("/train", json={"samples": SAMPLES, **OPTIONS})
    assert refused.status_code == 503 and "replica group cannot train now" in refused.text, refused.text
    follower.start()  # from its on-disk weights: the original ones, several jobs behind
    groups = wait_ready(replicas)
    catch_up = groups[1]["catch_up"]
    assert catch_up["source"] == 0 and catch_up["received"] and catch_up["blocks_sent"] > 0, catch_up
    assert follower.score() == leader.score() == before
    assert groups[0]["fingerprint"] == groups[1]["fingerprint"]
    job = train(follower)
    assert job["state"] == "succeeded", job
    assert follower.score() == leader.score() != before


def test_a_tensor_parallel_replica_joined_with_one_alone_is_refused_with_the_reason(replicas):
    leader, follower = replicas
    before = leader.score()
    follower.kill()
    follower.start(extra_args=["--tensor-parallel-size", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    deadline = time.monotonic() + 240
    while (groups := [r.group() for r in replicas]) and not all(g["state"] == "refused" for g in groups):
        assert time.monotonic() < deadline, groups
        time.sleep(0.5)
    for g in groups:
        assert "tensor parallel size 1 on every replica (tensor parallel sizes: [1, 2])" in g["reason"], g
    for replica in replicas:
        r = replica.http.post("/train", json={"samples": SAMPLES, **OPTIONS})
        assert r.status_code == 501 and "tensor parallel sizes: [1, 2]" in r.text, r.text
    assert leader.score() == before

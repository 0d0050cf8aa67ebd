"""A fault at every phase of every job kind, raised or a kill of the trainer, on a real
server (its own: ``HOGWILD_TEST_FAULTS`` arms the trainer's fault points, ``worker/faults.py``).

Each case asserts: the fault fired; the `wait` caller was answered (no hung wait) with
the job's final state and a reason naming the fault; the job is still answerable after
a restart (no job lost); the served weights are bit-identical where the job had not yet
changed them; the model directory is untouched by a failed checkpoint; and the server
still completes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hogwild.training.circuit_breaker_data import synthetic_samples
from tests.conftest import ADMIN_KEY, LIMITS, serving
from tests.waiting import wait_new_trainer, wait_until

pytestmark = pytest.mark.server

SAMPLE = {"context_ids": [5, 6, 7, 8], "continuation_ids": [9, 10, 11]}
PAIR = {"context_ids": [5, 6, 7], "chosen_ids": [8, 9, 10], "rejected_ids": [11, 12, 13]}
# Phases where the job has not yet written the served weights (gradients, at most, exist).
BEFORE_ANY_WRITE = ("admission", "memory_check", "before_first_step", "mid_step")
STEPPED = ("admission", "memory_check", "before_first_step", "mid_step", "after_last_step", "evaluation", "journal_write",
           "event_send", "checkpoint")
PHASES = {
    "sft": STEPPED,
    "preference": STEPPED,
    "btrm": STEPPED,
    "circuit_breaker": STEPPED,
    # No optimizer and no forward after its end: neither mid_step nor evaluation happen.
    "readout": ("admission", "memory_check", "before_first_step", "after_last_step", "journal_write", "event_send", "checkpoint"),
    "revert": ("admission", "memory_check", "before_first_step", "journal_write", "event_send", "checkpoint"),
}
# Kinds that never write the served weights, and the circuit breaker until its merge (after its evaluation).
KEEPS_WEIGHTS = {"btrm": STEPPED, "readout": STEPPED, "circuit_breaker": STEPPED[:6]}
# Raised at every phase of every kind; the trainer killed at every phase of an SFT job and before the
# first step of each other kind (its journaled job read back by the next trainer). A kill costs a
# trainer restart (12-28 s here), so the whole square would take a quarter of an hour.
CASES = ([(kind, phase, "raise") for kind, phases in PHASES.items() for phase in phases]
         + [("sft", phase, "kill") for phase in PHASES["sft"]]
         + [(kind, "before_first_step", "kill") for kind in PHASES if kind != "sft"])
TRAINER_UP_S = 240
answered: dict[str, str] = {}  # every job a case created -> its final state


class Fixture:
    def __init__(self, served, fault_file: Path, stories: Path, cb_samples: list[dict]):
        self.served, self.fault_file, self.stories, self.cb_samples = served, fault_file, stories, cb_samples

    @property
    def http(self):
        return self.served.http

    def body(self, kind: str) -> tuple[str, dict]:
        """(route, body) of a small job of ``kind`` that waits for its end."""
        return {
            "sft": ("/train", {"samples": [SAMPLE, {**SAMPLE, "continuation_ids": [12, 13]}], "steps": 3, "lr": 1e-3}),
            "preference": ("/train", {"mode": "preference", "samples": [PAIR], "steps": 3, "lr": 1e-4}),
            "btrm": ("/train", {"mode": "btrm", "config": {"heads": [{"name": "h", "positive_sources": [{"path": "unused"}]}],
                                                          "epochs": 3, "held_out_fraction": 0.25},
                                "samples": [{"ids": [5, 6, 7 + i], "labels": {"h": "positive" if i % 2 else "soft_neg"}}
                                            for i in range(8)]}),
            "circuit_breaker": ("/train", {"mode": "circuit_breaker", "samples": self.cb_samples,
                                           "config": {"lr": 5e-4, "steps": 3}}),
            "readout": ("/readout/train", {"stories": str(self.stories), "layers": [1], "out": str(self.served.state_dir / "rd")}),
            "revert": ("/train/revert", {}),
        }[kind]

    def submit(self, kind: str, timeout: float = 180):  # a hung `wait` fails the case here, not at pytest's timeout
        route, body = self.body(kind)
        return self.http.post(route, json={**body, "wait": True}, timeout=timeout)

    def ready(self) -> dict:
        """The trainer's status once it is up, ready and idle (after a kill: the new one)."""
        deadline = time.monotonic() + TRAINER_UP_S
        while time.monotonic() < deadline:
            r = self.http.get("/train/status")
            if r.status_code == 200 and r.json()["state"] == "ready" and r.json()["running"] is None and not r.json()["queue"]:
                return r.json()
            time.sleep(0.2)
        raise AssertionError(f"the trainer was not ready and idle within {TRAINER_UP_S} s: {r.status_code} {r.text[:500]}")

    def arm(self, phase: str, kind: str | None, action: str) -> None:
        self.fired().unlink(missing_ok=True)
        self.fault_file.write_text(json.dumps({"phase": phase, "mode": kind, "action": action}))

    def fired(self) -> Path:
        return self.fault_file.with_name(self.fault_file.name + ".fired")

    def model_files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.served.model_dir.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def fx(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fault-matrix")
    fault_file, stories = tmp / "fault.json", tmp / "stories"
    stories.mkdir()
    for concept, word in (("joy", "glad"), ("fear", "afraid")):
        (stories / f"{concept}.txt").write_text("\n\n".join(f"I was {word} on day {i}, so {word}." for i in range(5)))
    env = {"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS, "HOGWILD_TEST_FAULTS": str(fault_file),
           "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0",
           "HOGWILD_PATH_ROOTS": ":".join(str(tmp / p) for p in ("faults-model", "faults-state", "stories"))}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cb = [s.model_dump(exclude_none=True) for s in synthetic_samples(tokenizer, 4, 4)]
    with serving(tiny_model_dir, tmp, "faults", dtype="float32", env=env) as served:
        yield Fixture(served, fault_file, stories, cb)


def merged_adapter(fx: Fixture) -> None:
    """What a revert case needs: a circuit-breaker adapter merged just now."""
    r = fx.submit("circuit_breaker")
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    answered[r.json()["job_id"]] = "succeeded"


def expected_error(phase: str, action: str) -> str:
    if action == "kill":
        return "killed by SIGKILL while this job was running"
    if phase == "journal_write":
        return "its end could not be journaled (InjectedFault: injected fault at journal_write)"
    return f"InjectedFault: injected fault at {phase}"


@pytest.mark.parametrize("kind,phase,action", CASES, ids=[f"{k}-{p}-{a}" for k, p, a in CASES])
def test_a_fault_ends_the_job_with_its_reason_and_loses_nothing(fx, kind, phase, action):
    fx.ready()
    if kind == "revert":
        merged_adapter(fx)
    if phase == "checkpoint":
        return checkpoint_case(fx, kind, action)
    digest = fx.served.arena_digest()
    fx.arm(phase, kind, action)
    r = fx.submit(kind)
    assert fx.fired().exists(), f"the fault at {phase} did not fire for {kind}"
    if phase == "admission":  # refused before it was queued: no job exists
        assert r.status_code == (500 if action == "raise" else 503), r.text
        assert ("injected fault at admission" if action == "raise" else "ended before answering") in r.json()["error"]["message"]
        status = fx.ready()
        assert not status["queue"] and status["running"] is None
    else:
        assert r.status_code == 200, r.text
        job = r.json()
        if phase == "event_send":  # the job itself ended well; its caller heard of it without the event
            assert job["state"] == "succeeded", job
        else:
            assert job["state"] == "failed" and expected_error(phase, action) in job["error"], job
        answered[job["job_id"]] = job["state"]
        fx.ready()
        again = fx.http.get(f"/train/{job['job_id']}")
        assert again.status_code == 200 and again.json()["state"] == job["state"]  # journaled: answerable after a restart too
    if phase in BEFORE_ANY_WRITE or phase in KEEPS_WEIGHTS.get(kind, ()):
        assert fx.served.arena_digest() == digest, "the served weights changed"
    assert fx.served.complete([5, 6, 7], 4)  # still serving


def checkpoint_case(fx: Fixture, kind: str, action: str) -> None:
    r = fx.submit(kind)
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    job_id = r.json()["job_id"]
    answered[job_id] = "succeeded"
    fx.ready()
    files = fx.model_files()
    fx.arm("checkpoint", None, action)
    r = fx.http.post("/checkpoint", json={}, timeout=180)
    assert fx.fired().exists()
    assert r.status_code == (500 if action == "raise" else 503), r.text
    assert fx.model_files() == files  # the served directory is untouched
    fx.ready()
    assert fx.http.get(f"/train/{job_id}").json()["state"] == "succeeded"
    assert fx.served.complete([5, 6, 7], 4)


def test_no_job_was_lost(fx):
    """Every job the cases created is answerable with the state its caller was told."""
    assert len(answered) >= len(CASES) // 2
    for job_id, state in answered.items():
        r = fx.http.get(f"/train/{job_id}")
        assert r.status_code == 200 and r.json()["state"] == state, (job_id, r.text)


def test_an_unreadable_journal_record_is_kept_aside_and_reported(fx, capsys):
    """A record written by another contracts version: the next trainer sets it aside with
    its reason, and status, /metrics and `hogwild status` name it; the other jobs stay."""
    import signal

    from hogwild.cli import main as cli
    from tests.e2e.test_llama_compiled import hogwild_metrics

    status = fx.ready()
    jobs = fx.served.state_dir / "jobs"
    (jobs / "job-from-the-future.json").write_text('{"job_id": "job-from-the-future", "state": "teleported"}')
    before = hogwild_metrics(fx.served.server.url, fx.served.server.headers()).get("hogwild_journal_unreadable_total", 0.0)
    os.kill(status["pid"], signal.SIGKILL)
    status = wait_new_trainer(fx.served, status["trainer_id"])
    (record,) = status["journal"]["unreadable"]
    assert record["file"] == "job-from-the-future.json" and "ValidationError" in record["reason"]
    assert (jobs / "unreadable" / "job-from-the-future.json").exists() and not (jobs / "job-from-the-future.json").exists()
    wait_until(lambda: hogwild_metrics(fx.served.server.url, fx.served.server.headers())
               .get("hogwild_journal_unreadable_total", 0.0) == before + 1, 30, "the metric counting it")
    cli(["status", fx.served.server.url, "--api-key", fx.served.server.api_key])
    printed = capsys.readouterr().out
    assert "unreadable journal records" in printed and "job-from-the-future.json" in printed and "ValidationError" in printed
    for job_id, state in answered.items():  # the readable records are all still there
        assert fx.http.get(f"/train/{job_id}").json()["state"] == state

"""kill -9 the training process in the middle of a job, again and again."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest

from ..waiting import wait_idle, wait_until

pytestmark = pytest.mark.server

SAMPLE = {"context_ids": [5, 6, 7, 8], "continuation_ids": [9, 10, 11]}
TERMINAL = ("succeeded", "failed", "cancelled")


def test_killing_the_trainer_mid_job_loses_no_job_and_fails_no_completion(served):
    wait_idle(served)  # the running job below is this test's, not one an earlier test left
    stop, failures, completions = threading.Event(), [], []

    def user() -> None:  # a user of the model, all along
        with httpx.Client(base_url=served.server.url, headers=served.server.headers(), timeout=120) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/completions", json={"model": str(served.model_dir), "prompt": [5, 6, 7], "max_tokens": 4})
                    (completions if r.status_code == 200 else failures).append(r.status_code)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    users = [threading.Thread(target=user) for _ in range(2)]
    for t in users:
        t.start()

    submitted: list[str] = []
    waited: dict = {}

    def submit(body: dict) -> dict:
        r = served.http.post("/train", json=body)
        assert r.status_code == 200, r.text
        submitted.append(r.json()["job_id"])
        return r.json()

    def answer(job_id: str) -> dict | None:
        r = served.http.get(f"/train/{job_id}")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 503 and r.headers["Retry-After"], r.text  # while the trainer restarts
        assert "killed by SIGKILL" in r.json()["error"]["message"]  # it says why
        return None

    def ended(job_id: str) -> dict:
        return wait_until(lambda: (a := answer(job_id)) and a["state"] in TERMINAL and a, what=f"{job_id} ending")

    answers_while_down = []
    try:
        for round_ in range(3):
            long = {"samples": [SAMPLE], "lr": 1e-6, "steps": 4000}
            if round_ == 0:  # a caller blocked in `wait` must hear how its job ended
                waiter = threading.Thread(target=lambda: waited.update(served.http.post("/train", json={**long, "wait": True}).json()))
                waiter.start()
                running = wait_until(lambda: served.http.get("/train/status").json().get("running"), what="the job running")
                submitted.append(running["job_id"])
            else:
                running = submit(long)
            queued = submit({"samples": [SAMPLE], "lr": 1e-6, "steps": 3})
            wait_until(lambda: (a := answer(running["job_id"])) and a["step"] >= 1, what="its first step")

            before = served.http.get("/train/status").json()
            os.kill(before["pid"], signal.SIGKILL)

            def ready() -> bool:  # 503 with Retry-After until a new trainer answers; it says when it is ready
                r = served.http.get("/train/status")
                if r.status_code != 200:
                    answers_while_down.append((r.status_code, r.headers.get("Retry-After")))
                    return False
                assert r.json()["trainer_id"] != before["trainer_id"]
                if r.json()["state"] == "ready":
                    return True
                assert r.json()["state"] in ("starting", "verifying")  # verifying: the parity gate
                t = served.http.post("/train", json={"samples": [SAMPLE], "wait": True})
                if t.status_code == 200:  # it became ready in between
                    submitted.append(t.json()["job_id"])
                else:
                    message = t.json()["error"]["message"]
                    assert t.status_code == 503 and t.headers["Retry-After"] and ("starting" in message or "parity gate" in message)
                return False

            wait_until(ready, 180, "a new trainer becoming ready")
            dead = ended(running["job_id"])
            assert dead["state"] == "failed", dead
            assert "killed by SIGKILL" in dead["error"] and "steps had been applied" in dead["error"], dead["error"]
            requeued = ended(queued["job_id"])
            assert requeued["state"] == "succeeded", requeued  # it had not started: it ran on the new trainer
            if round_ == 0:
                waiter.join(120)
                assert not waiter.is_alive(), "the caller in `wait` was never answered"
                assert waited["job_id"] == running["job_id"] and waited["state"] == "failed"
    finally:
        stop.set()
        for t in users:
            t.join(60)

    assert answers_while_down and all(code == 503 and retry for code, retry in answers_while_down), answers_while_down
    assert not failures, f"completions failed while the trainer was killed: {failures[:5]}"
    assert len(completions) > 10
    finals = [answer(job_id)["state"] for job_id in submitted]
    assert all(s in TERMINAL for s in finals), finals
    # The next job works.
    r = served.http.post("/train", json={"samples": [SAMPLE], "lr": 1e-6, "steps": 2, "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "succeeded"

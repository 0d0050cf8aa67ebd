"""Who may call each route, the per-request limits, cancellation, file modes."""

from __future__ import annotations

import stat
import time

import httpx
import pytest

from ..conftest import ADMIN_KEY, API_KEY
from ..waiting import wait_idle, wait_job

pytestmark = pytest.mark.server

SAMPLE = {"context_ids": [5, 6, 7], "continuation_ids": [8, 9]}
SCORE = {"prompt": [5, 6, 7], "score_ranges": [[0, 3]]}

# (method, path, body, who may call it)
ROUTES = [
    ("POST", "/train", {"samples": [SAMPLE], "lr": 1e-6, "steps": 1, "wait": True}, "admin"),
    ("POST", "/v1/train", {"samples": [SAMPLE], "lr": 1e-6, "steps": 1, "wait": True}, "admin"),
    ("POST", "/checkpoint", {}, "admin"),
    ("POST", "/v1/checkpoint", {}, "admin"),
    ("DELETE", "/train/job-000000000000", None, "admin"),
    ("DELETE", "/v1/train/job-000000000000", None, "admin"),
    ("DELETE", "/adapters/unknown", None, "admin"),
    ("DELETE", "/v1/adapters/unknown", None, "admin"),
    ("GET", "/train/status", None, "reader"),
    ("GET", "/v1/train/status", None, "reader"),
    ("GET", "/train/job-000000000000", None, "reader"),
    ("GET", "/v1/train/job-000000000000", None, "reader"),
    ("POST", "/score", SCORE, "reader"),
    ("POST", "/v1/score", SCORE, "reader"),
]


def call(served, method, path, body, headers):
    return httpx.request(method, served.server.url + path, json=body, headers=headers, timeout=300)


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_each_route_wants_its_key(served, route):
    method, path, body, who = route
    digest = served.arena_digest()
    bearer = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
    assert call(served, method, path, body, {}).status_code == 401
    assert call(served, method, path, body, bearer("wrong")).status_code == 401
    if who == "admin":
        # The API key is not enough where an admin key is set...
        assert call(served, method, path, body, bearer(API_KEY)).status_code == 401
        assert served.arena_digest() == digest
        # ...the admin key is: as the bearer on bare paths, in its own header under /v1
        # (where vLLM's middleware wants the API key as the bearer).
        ok = {**bearer(API_KEY), "X-Hogwild-Admin-Key": ADMIN_KEY} if path.startswith("/v1") else bearer(ADMIN_KEY)
        assert call(served, method, path, body, ok).status_code in (200, 404)
    else:
        assert call(served, method, path, body, bearer(API_KEY)).status_code in (200, 404)


def test_per_request_limits_answer_413_and_change_nothing(served):
    digest = served.arena_digest()
    cases = {
        "samples": {"samples": [SAMPLE] * 257},
        "tokens": {"samples": [{"context_ids": [5] * 300, "continuation_ids": [6] * 30}] * 200},
        "steps": {"samples": [SAMPLE], "steps": 5001},
        "epochs x batches": {"samples": [SAMPLE] * 10, "batch_size": 1, "epochs": 501},
    }
    for name, body in cases.items():
        r = served.http.post("/train", json={**body, "wait": True})
        assert r.status_code == 413, (name, r.text)
        assert "limit" in r.json()["error"]["message"]
    # A body over HOGWILD_MAX_BODY_BYTES, declared...
    big = b'{"samples": [{"context_ids": [' + b"5, " * (2 << 20) + b'5], "continuation_ids": [6]}]}'
    r = served.http.post("/train", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    # ...or streamed without a length.
    r = served.http.post("/train", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert served.arena_digest() == digest
    assert len(served.complete([5, 6, 7], 3)) == 3


def test_a_job_that_cannot_fit_in_memory_is_refused_before_it_starts(served):
    digest = served.arena_digest()
    # 190 x 330 tokens in one forward pass: the logits alone need ~2 GiB; the
    # test server gives the trainer 1 GiB (HOGWILD_TRAINER_MEMORY_LIMIT).
    body = {"samples": [{"context_ids": [5] * 300, "continuation_ids": [6] * 30}] * 190, "micro_batch_size": 190, "wait": True}
    r = served.http.post("/train", json=body)
    if r.status_code == 200:
        pytest.fail(f"a job needing ~2 GiB of logits was accepted under a 1 GiB limit: {r.json()}")
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "needs about" in message and "logits" in message and "available to the trainer" in message
    assert served.arena_digest() == digest


def test_queue_limit_then_cancellation(served):
    wait_idle(served)  # the queue below is this test's alone
    long = {"samples": [SAMPLE], "lr": 1e-6, "steps": 5000}
    running = served.http.post("/train", json=long).json()
    wait_job(served, running["job_id"], ("running",))
    queued = [served.http.post("/train", json=long).json() for _ in range(4)]
    assert all(q["state"] == "queued" for q in queued)
    r = served.http.post("/train", json=long)
    assert r.status_code == 429 and r.headers["Retry-After"] and "limit is 4" in r.json()["error"]["message"]

    # A queued job is cancelled at once; the running one after its current step.
    for q in queued:
        r = served.http.delete(f"/train/{q['job_id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = served.http.delete(f"/v1/train/{running['job_id']}")
    assert r.status_code == 200
    done = wait_job(served, running["job_id"], ("cancelled",))
    assert 0 < done["result"]["steps"] < 5000 and done["result"]["stopped_early"]
    # Ended jobs cannot be cancelled; unknown ones do not exist.
    assert served.http.delete(f"/train/{running['job_id']}").status_code == 409
    assert served.http.delete("/train/job-ffffffffffff").status_code == 404


def test_shared_files_and_the_socket_are_owner_only(served):
    r = served.http.post("/train", json={"samples": [{**SAMPLE, "id": f"mode-{time.time()}"}], "lr": 1e-6, "steps": 1, "wait": True})
    assert r.status_code == 200

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(served.session) == 0o700
    for name in ("weights.bin", "manifest.json", "trainer.sock", "trainer.lock"):
        assert mode(served.session / name) == 0o600, name
    assert stat.S_ISSOCK((served.session / "trainer.sock").stat().st_mode)
    assert mode(served.state_dir) == 0o700 and mode(served.state_dir / "jobs") == 0o700
    assert mode(served.state_dir / "ledger.jsonl") == 0o600
    journal = list((served.state_dir / "jobs").glob("job-*.json"))
    assert journal and all(mode(p) == 0o600 for p in journal)

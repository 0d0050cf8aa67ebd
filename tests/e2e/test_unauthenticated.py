"""A server with no key at all, listening beyond loopback."""

from __future__ import annotations

import pytest

from ..conftest import serving

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def open_server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("open")
    with serving(tiny_model_dir, tmp, "open", dtype="float32", api_key=None, host="0.0.0.0") as handle:
        yield handle


def test_training_is_refused_without_a_key_beyond_loopback_and_says_so(open_server):
    digest = open_server.arena_digest()
    for path in ("/train", "/v1/train"):
        r = open_server.http.post(path, json={"samples": [{"context_ids": [5], "continuation_ids": [6]}], "wait": True})
        assert r.status_code == 403
        assert "listens on 0.0.0.0 with no key" in r.json()["error"]["message"]
    assert open_server.http.delete("/train/job-000000000000").status_code == 403
    assert open_server.arena_digest() == digest
    # Reading stays open, as it is for the rest of vLLM without a key; the status says why training is off.
    status = open_server.http.get("/train/status").json()
    assert "HOGWILD_ALLOW_UNAUTHENTICATED_TRAINING=1" in status["server"]["training_routes_refused"]
    assert open_server.http.post("/v1/score", json={"prompt": [5, 6], "score_ranges": [[0, 2]]}).status_code == 200
    # And the start-up log said so.
    log = open_server.server.log_path.read_text()
    assert "the routes that change the model are off" in log

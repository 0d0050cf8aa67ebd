"""Every bad input gets a clear 4xx, changes nothing, and the server keeps serving."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.server

VOCAB = 2000  # the tiny model's vocabulary (config.vocab_size)
MAX_LEN = 512  # --max-model-len of the test server
GOOD = {"context_ids": [5, 6, 7], "continuation_ids": [8, 9]}


def sample(**changes):
    return {**GOOD, **changes}


TRAIN_CASES = {
    "token id past the vocabulary": ({"samples": [sample(continuation_ids=[8, VOCAB])]}, "outside the vocabulary"),
    "token id in context past the vocabulary": ({"samples": [sample(context_ids=[VOCAB + 5])]}, "outside the vocabulary"),
    "negative token id": ({"samples": [sample(context_ids=[5, -1])]}, "greater than or equal to 0"),
    "empty continuation": ({"samples": [sample(continuation_ids=[])]}, "continuation_ids"),
    "empty context": ({"samples": [sample(context_ids=[])]}, "context_ids"),
    "longer than max length": ({"samples": [sample(context_ids=[5] * MAX_LEN)]}, "longer than the model's max length"),
    "string token ids": ({"samples": [sample(context_ids="5 6 7")]}, "context_ids"),
    "float token id": ({"samples": [sample(continuation_ids=[8.5])]}, "continuation_ids"),
    "bool token id": ({"samples": [sample(continuation_ids=[True])]}, "continuation_ids"),
    "samples not a list": ({"samples": GOOD}, "samples"),
    "no samples": ({"samples": []}, "samples"),
    "missing samples": ({"lr": 1e-3}, "samples"),
    "unknown top-level field": ({"samples": [GOOD], "learning_rate": 1e-3}, "learning_rate"),
    "unknown sample field": ({"samples": [sample(labels=[1])]}, "labels"),
    "negative lr": ({"samples": [GOOD], "lr": -1e-3}, "lr"),
    "zero lr": ({"samples": [GOOD], "lr": 0}, "lr"),
    "string lr": ({"samples": [GOOD], "lr": "1e-3"}, "lr"),
    "negative weight": ({"samples": [sample(weight=-1.0)]}, "weight"),
    "beta out of range": ({"samples": [GOOD], "betas": [0.9, 1.0]}, "betas"),
    "zero steps": ({"samples": [GOOD], "steps": 0}, "steps"),
    "unknown projection": ({"samples": [GOOD], "proj": "magic"}, "proj"),
    "unsupported norm-growth limit": ({"samples": [GOOD], "norm_growth_limit": 1.5}, "norm_growth_limit"),
    "id too long": ({"samples": [sample(id="x" * 300)]}, "id"),
}

# JSON that json.dumps refuses to write: sent as raw text.
RAW_TRAIN_CASES = {
    "NaN lr": ('{"samples": [{"context_ids": [5], "continuation_ids": [6]}], "lr": NaN}', "lr"),
    "infinite lr": ('{"samples": [{"context_ids": [5], "continuation_ids": [6]}], "lr": Infinity}', "lr"),
    "NaN weight": ('{"samples": [{"context_ids": [5], "continuation_ids": [6], "weight": NaN}]}', "weight"),
    "not JSON": ('{"samples": [', "JSON"),
}

SCORE_CASES = {
    "missing score_ranges": ({"prompt": [5, 6, 7]}, "score_ranges"),
    "empty score_ranges": ({"prompt": [5, 6, 7], "score_ranges": []}, "score_ranges"),
    "range past the end": ({"prompt": [5, 6, 7], "score_ranges": [[0, 4]]}, "score_ranges.0"),
    "reversed range": ({"prompt": [5, 6, 7], "score_ranges": [[2, 1]]}, "score_ranges.0"),
    "empty range": ({"prompt": [5, 6, 7], "score_ranges": [[1, 1]]}, "score_ranges.0"),
    "negative start": ({"prompt": [5, 6, 7], "score_ranges": [[-1, 2]]}, "score_ranges.0"),
    "range of three numbers": ({"prompt": [5, 6, 7], "score_ranges": [[0, 1, 2]]}, "score_ranges"),
    "token past the vocabulary": ({"prompt": [5, VOCAB], "score_ranges": [[0, 2]]}, "outside the vocabulary"),
    "empty prompt": ({"prompt": [], "score_ranges": [[0, 1]]}, "prompt"),
    "string prompt": ({"prompt": "hello", "score_ranges": [[0, 1]]}, "prompt"),
    "prompt at max length": ({"prompt": [5] * MAX_LEN, "score_ranges": [[0, 2]]}, "max length"),
    "unknown field": ({"prompt": [5, 6], "score_ranges": [[0, 2]], "temperature": 0}, "temperature"),
}


def check_rejected(served, response, status: int, needle: str, digest: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert needle.lower() in message.lower(), message
    assert served.arena_digest() == digest, "a rejected request changed the weights"
    assert len(served.complete([5, 6, 7], 3)) == 3, "the server stopped serving"


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_bad_train_request(served, case):
    body, needle = TRAIN_CASES[case]
    digest = served.arena_digest()
    for path in ("/train", "/v1/train"):
        check_rejected(served, served.http.post(path, json={**body, "wait": True}), 422, needle, digest)


@pytest.mark.parametrize("case", RAW_TRAIN_CASES, ids=list(RAW_TRAIN_CASES))
def test_bad_train_request_raw(served, case):
    text, needle = RAW_TRAIN_CASES[case]
    digest = served.arena_digest()
    r = served.http.post("/train", content=text, headers={"Content-Type": "application/json"})
    check_rejected(served, r, 422, needle, digest)


@pytest.mark.parametrize("case", SCORE_CASES, ids=list(SCORE_CASES))
def test_bad_score_request(served, case):
    body, needle = SCORE_CASES[case]
    digest = served.arena_digest()
    for path in ("/score", "/v1/score"):
        check_rejected(served, served.http.post(path, json=body), 422, needle, digest)


def test_unknown_model_name_is_404(served):
    r = served.http.post("/v1/score", json={"model": "no-such-model", "prompt": [5, 6], "score_ranges": [[0, 2]]})
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]


def test_an_adapter_job_without_enable_lora_is_501_naming_the_flag(served):
    # This server runs without --enable-lora: vLLM could not serve the adapter, so nothing is trained.
    digest = served.arena_digest()
    r = served.http.post("/v1/train", json={"samples": [GOOD], "adapter": "a", "steps": 1, "wait": True})
    check_rejected(served, r, 501, "--enable-lora", digest)
    assert served.http.get("/train/status").json()["served_adapters"] == []


def test_error_bodies_are_json_in_the_openai_shape(served):
    r = served.http.post("/train", json=json.loads('{"samples": []}'))
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 422 and error["param"] == "samples"

"""The spine on real `vllm serve`: train in place, serve the trained model at once."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild.client import HogwildClient
from hogwild.contracts.manifest import read_manifest
from hogwild.contracts.protocol import TokenLogprobsOp
from hogwild.worker.views import map_tensors, served_views

from ..conftest import ADMIN_KEY, API_KEY
from ..waiting import wait_job, wait_new_trainer

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tok(served):
    return AutoTokenizer.from_pretrained(served.model_dir)


def train(served, samples, **options) -> dict:
    r = served.http.post("/train", json={"samples": samples, "wait": True, **options})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded", job
    return job


def vllm_position_logprobs(served, prompt: list[int]) -> list[float]:
    ranges = [[p, p + 1] for p in range(1, len(prompt))]
    r = served.http.post("/v1/score", json={"prompt": prompt, "score_ranges": ranges})
    assert r.status_code == 200, r.text
    return [s["total_logprob"] for s in r.json()["scores"]]


def hf_model_with_served_weights(served):
    """An ordinary HF model loaded from disk, then given a copy of the weights the
    server holds now: an independent reference for vLLM's numbers."""
    model = AutoModelForCausalLM.from_pretrained(served.model_dir, dtype=torch.float32)
    manifest = read_manifest(served.session)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in served_views(map_tensors(manifest), manifest.views).items():
            params[name].copy_(value)
    return model.eval()


def test_training_changes_the_very_next_completion(served, tok):
    ctx = tok.encode("Once upon a time the server")
    target = tok.encode(" learned a new sentence today.")
    assert served.complete(ctx, len(target)) != target
    job = train(served, [{"context_ids": ctx, "continuation_ids": target}], lr=1e-2, steps=80)
    assert job["result"]["steps"] == 80
    assert job["result"]["loss_after"] < 0.1 < job["result"]["loss_before"]
    assert served.complete(ctx, len(target)) == target


def test_trainer_views_and_vllm_agree_before_and_after_a_step(served, tok):
    prompt = tok.encode("Parity between the trainer and vLLM, position by position.")

    def trainer_logprobs():
        return served.trainer_call(TokenLogprobsOp(token_ids=prompt))["logprobs"]

    before_vllm, before_trainer = vllm_position_logprobs(served, prompt), trainer_logprobs()
    assert max(abs(a - b) for a, b in zip(before_vllm, before_trainer)) < 1e-4

    train(served, [{"context_ids": prompt[:5], "continuation_ids": prompt[5:]}], lr=1e-3, steps=1)
    after_vllm, after_trainer = vllm_position_logprobs(served, prompt), trainer_logprobs()
    assert max(abs(a - b) for a, b in zip(after_vllm, before_vllm)) > 1e-3, "the step changed nothing vLLM computes"
    assert max(abs(a - b) for a, b in zip(after_vllm, after_trainer)) < 1e-4


def test_score_totals_match_an_independent_hf_computation(served, tok):
    prompt = tok.encode("Scoring reads the log-likelihood of each range of the prompt, summed over its tokens.")
    ranges = [[0, 4], [3, 9], [len(prompt) - 5, len(prompt)], [1, len(prompt)]]
    r = served.http.post("/v1/score", json={"model": str(served.model_dir), "prompt": prompt, "score_ranges": ranges, "logprobs": 1})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert [s["range_index"] for s in scores] == list(range(len(ranges)))

    model = hf_model_with_served_weights(served)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    for (start, end), s in zip(ranges, scores):
        positions = range(max(start, 1), end)
        expected = sum(float(logprobs[p - 1, prompt[p]]) for p in positions)
        assert s["n_tokens"] == len(positions)
        assert abs(s["total_logprob"] - expected) < 1e-3, (start, end, s, expected)
    # The bare path answers the same.
    assert served.http.post("/score", json={"prompt": prompt, "score_ranges": ranges}).json()["scores"] == scores


def test_the_trainer_holds_no_second_copy_of_the_weights(served):
    memory = served.http.get("/train/status").json()["memory"]
    # Every parameter of the trainer's model lives in the memory vLLM computes with...
    assert memory["param_bytes"] > 0
    assert memory["shared_param_bytes"] == memory["param_bytes"]
    # ...and building it cost (almost) no private memory: a copy would cost param_bytes.
    assert memory["binding_private_bytes"] < 0.1 * memory["param_bytes"], memory


def test_a_job_without_wait_returns_its_id_at_once_and_reports_progress(served, tok):
    ctx, cont = tok.encode("Jobs run in the background"), tok.encode(" and report progress.")
    r = served.http.post("/v1/train", json={"samples": [{"context_ids": ctx, "continuation_ids": cont}], "lr": 1e-4, "steps": 20})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["job_id"].startswith("job-")
    job = wait_job(served, job["job_id"])
    assert job["state"] == "succeeded" and job["step"] == job["total_steps"] == 20
    status = served.http.get("/v1/train/status").json()
    recent = {j["job_id"]: j for j in status["recent"]}
    assert recent[job["job_id"]]["result"]["loss_before"] is not None
    assert status["optimizer"]["hyper"]["lr"] == 1e-4
    assert status["optimizer"]["step"] >= 20
    assert served.http.get("/train/job-doesnotexist").status_code == 404


def test_inference_keeps_running_while_a_job_trains(served, tok):
    ctx, cont = tok.encode("HOGWILD means nobody waits"), tok.encode(" for anybody else.")
    r = served.http.post("/train", json={"samples": [{"context_ids": ctx, "continuation_ids": cont}], "lr": 1e-5, "steps": 600})
    job_id = r.json()["job_id"]
    # An op that needs the model waits for the job; nothing else may wait with it.
    model_op = threading.Thread(target=served.trainer_call, args=(TokenLogprobsOp(token_ids=ctx),))
    completions_during, status_while_model_op_waits = 0, 0
    deadline = time.monotonic() + 300
    while (state := served.http.get(f"/train/{job_id}").json()["state"]) in ("queued", "running"):
        assert time.monotonic() < deadline, f"the job is still {state}"
        if state == "running":
            if not model_op.is_alive() and completions_during == 0:
                model_op.start()
            served.complete(tok.encode("Meanwhile a user asks"), 8)
            running = served.http.get(f"/train/{job_id}").json()["state"] == "running"
            completions_during += running
            status_while_model_op_waits += running and model_op.is_alive() and served.http.get("/train/status").status_code == 200
    model_op.join(120)
    assert state == "succeeded"
    assert completions_during >= 3, "no completion finished while the job was running"
    assert status_while_model_op_waits >= 1, "status waited for the model"


def test_no_stale_prefix_cache_answers_after_an_update(served, tok):
    # Longer than two KV blocks (128 tokens on CPU), so full blocks get cached.
    prompt = (tok.encode("A long shared prefix that the engine caches block by block. ") * 40)[:300]
    target = tok.encode(" Fresh weights, fresh cache.")
    first = served.complete(prompt, len(target))
    assert served.complete(prompt, len(target)) == first  # served from the prefix cache
    # Earlier tests leave the shared weights in a state that depends on timing (HOGWILD, a
    # cancelled job), so how many steps the target takes varies: train until it is learnt.
    for _ in range(4):
        job = train(served, [{"context_ids": prompt, "continuation_ids": target}], lr=1e-2, steps=120)
        if job["result"]["loss_after"] < 0.05:
            break
    assert job["result"]["loss_after"] < 0.05, job  # the updated model predicts the target...
    assert served.complete(prompt, len(target)) == target  # ...and no block cached before the update hides it


def test_a_sample_id_is_trained_once_and_the_ledger_survives_a_trainer_restart(served, tok):
    sample = {"context_ids": tok.encode("Deduplicate me"), "continuation_ids": tok.encode(" once."), "id": f"s-{uuid.uuid4().hex}"}
    first = train(served, [sample], lr=1e-4, steps=2)
    assert first["skipped_ids"] == [] and first["result"]["steps"] == 2
    digest = served.arena_digest()
    again = train(served, [sample], lr=1e-4, steps=2)
    assert again["skipped_ids"] == [sample["id"]] and again["result"]["steps"] == 0
    assert served.arena_digest() == digest

    old = served.http.get("/train/status").json()
    os.kill(old["pid"], signal.SIGKILL)
    status = wait_new_trainer(served, old["trainer_id"])
    assert status["state"] == "ready", status
    assert status["server"]["trainer_restarts"] >= 1
    assert train(served, [sample], lr=1e-4, steps=2)["skipped_ids"] == [sample["id"]]
    assert served.arena_digest() == digest


class AnswerLosingProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream``; the answer to the first POST to a ``/train``
    path is lost: the server got the request and answered, and the client sees its connection
    close without an answer (a dropped connection, a balancer's restart)."""

    def __init__(self, upstream: str):
        self.upstream = httpx.Client(base_url=upstream, timeout=300)
        self.train_posts = 0
        super().__init__(("127.0.0.1", 0), ForwardingHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ForwardingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    HOP_BY_HOP = ("host", "content-length", "connection", "transfer-encoding", "content-encoding")

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP_BY_HOP}
        r = self.server.upstream.request(self.command, self.path, content=body, headers=headers)
        if self.command == "POST" and self.path.endswith("/train"):
            self.server.train_posts += 1
            if self.server.train_posts == 1:
                self.close_connection = True  # closed without a byte of the answer
                return
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in self.HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_DELETE = forward

    def log_message(self, *args):
        pass


def test_a_train_request_whose_answer_was_lost_is_sent_again_and_trained_once(served, tok):
    proxy = AnswerLosingProxy(served.server.url)
    try:
        client = HogwildClient(proxy.url, api_key=API_KEY, admin_key=ADMIN_KEY)
        sample = {"context_ids": tok.encode("Sent twice,"), "continuation_ids": tok.encode(" trained once.")}
        before = served.http.get("/train/status").json()["weights_version"]
        job = client.train([sample], lr=1e-4, steps=2, wait=True)
        assert proxy.train_posts == 2, "the client did not send the request again"
        assert job["state"] == "succeeded" and job["idempotency_key"], job
        assert served.http.get("/train/status").json()["weights_version"] == before + 2  # two steps: one job, not two
        recent = served.http.get("/train/status").json()["recent"]
        assert [j["job_id"] for j in recent if j["idempotency_key"] == job["idempotency_key"]] == [job["job_id"]]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_the_same_idempotency_key_with_another_request_is_refused(served, tok):
    sample = {"context_ids": tok.encode("One key,"), "continuation_ids": tok.encode(" one request.")}
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = served.http.post("/v1/train", json={"samples": [sample], "lr": 1e-4, "wait": True}, headers=key)
    assert first.status_code == 200 and first.json()["state"] == "succeeded", first.text
    digest = served.arena_digest()
    again = served.http.post("/train", json={"samples": [sample], "lr": 1e-4, "wait": True}, headers=key)
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"], again.text
    other = served.http.post("/train", json={"samples": [sample], "lr": 2e-4, "wait": True}, headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]["message"], other.text
    too_long = served.http.post("/train", json={"samples": [sample], "lr": 1e-4}, headers={"Idempotency-Key": "k" * 300})
    assert too_long.status_code == 422 and "Idempotency-Key" in too_long.json()["error"]["message"], too_long.text
    assert served.arena_digest() == digest

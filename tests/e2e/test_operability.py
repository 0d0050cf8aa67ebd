"""What the existing client sends to ``/v1/score`` besides ranges (a priority, images), and
what an operator sees on ``/metrics``: on real `vllm serve`."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import pytest
from PIL import Image

from hogwild.cli import main as cli

from ..waiting import wait_idle, wait_until
from .test_bad_input import check_rejected
from .test_llama_compiled import hogwild_metrics

pytestmark = pytest.mark.server


def _image_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_score_with_a_priority_answers_the_same_totals(served):
    body = {"prompt": [5, 17, 300, 42, 7, 8, 9], "score_ranges": [[0, 7], [3, 5]]}
    plain = served.http.post("/v1/score", json=body)
    urgent, background = (served.http.post("/v1/score", json={**body, "priority": p}) for p in (-5, 10))
    assert plain.status_code == urgent.status_code == background.status_code == 200, (urgent.text, background.text)
    assert urgent.json() == plain.json() == background.json()


def _scores_sent_to_the_engine(served) -> int:
    """Score requests vLLM has handed to its engine (its log, from --enable-log-requests)."""
    return served.server.log_path.read_text(errors="replace").count("Added request hogwild-score-")


def test_a_score_priority_orders_the_engine_queue(served):
    """The server runs `--scheduling-policy priority`. With the engine paused (vLLM's dev-mode
    /pause: requests queue, none runs), two dozen background scores reach the engine, then one
    urgent score; on /resume the scheduler admits by priority, about four 480-token prompts per
    step (2048 tokens). The urgent one is answered among the first; were its priority dropped,
    it would be admitted last, first come first served."""
    n_background, length = 24, 480
    answered: list[tuple[str, int]] = []
    lock = threading.Lock()

    def score(label: str, first_token: int, priority: int) -> None:
        prompt = [5 + (first_token + i) % 200 for i in range(length)]  # distinct prompts
        with httpx.Client(base_url=served.server.url, headers=served.server.headers(), timeout=300) as http:
            r = http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[1, length]], "priority": priority})
        with lock:
            answered.append((label, r.status_code))

    sent = _scores_sent_to_the_engine(served)
    r = served.http.post("/pause", params={"mode": "keep", "clear_cache": "false"})
    assert r.status_code == 200, r.text
    threads = [threading.Thread(target=score, args=(f"background-{i}", i, 10)) for i in range(n_background)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: _scores_sent_to_the_engine(served) >= sent + n_background, 60,
                   "the background scores reaching the engine")
        threads.append(threading.Thread(target=score, args=("urgent", n_background, -5)))
        threads[-1].start()
        wait_until(lambda: _scores_sent_to_the_engine(served) >= sent + n_background + 1, 60,
                   "the urgent score reaching the engine")
        assert not answered  # paused: none ran
    finally:  # /resume reaches the engine after every request above (one channel, in order)
        assert served.http.post("/resume").status_code == 200
        for t in threads:
            t.join(300)
    assert sorted(code for _, code in answered) == [200] * (n_background + 1), answered
    order = [label for label, _ in answered]
    # Admitted in the first step, with at most ~4 background ones; last, were priority ignored.
    assert order.index("urgent") <= n_background // 3, f"the urgent score was answered after {order.index('urgent')}: {order}"


SCORE = {"prompt": [5, 6, 7], "score_ranges": [[0, 3]]}
BAD = {
    "priority as a string": ({**SCORE, "priority": "1"}, "priority"),
    "priority as a float": ({**SCORE, "priority": 1.5}, "priority"),
    "image not a data URI": ({**SCORE, "multi_modal_data": {"image": ["https://example.com/cat.png"]}},
                             "multi_modal_data.image.0: not a data URI"),
    "image not base64": ({**SCORE, "multi_modal_data": {"image": "data:image/png;base64,@@"}}, "not a readable image"),
    "image not an image": ({**SCORE, "multi_modal_data": {"image": ["data:image/png;base64,aGVsbG8="]}}, "not a readable image"),
    "unknown modality": ({**SCORE, "multi_modal_data": {"audio": ["data:audio/wav;base64,aGk="]}}, "audio"),
    "images to a text-only model": ({**SCORE, "multi_modal_data": {"image": [_image_uri()]}}, "the served model takes no images"),
    "one image to a text-only model": ({**SCORE, "multi_modal_data": {"image": _image_uri()}}, "the served model takes no images"),
    "an empty list of images": ({**SCORE, "multi_modal_data": {"image": []}}, "multi_modal_data.image"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_score_input_is_refused_and_changes_nothing(served, case):
    body, needle = BAD[case]
    check_rejected(served, served.http.post("/v1/score", json=body), 422, needle, served.arena_digest())


def test_metrics_show_a_job_the_tokens_and_the_new_weights(served, capsys):
    wait_idle(served)  # no job of an earlier test changes the counters meanwhile
    headers = served.server.headers()
    before = hogwild_metrics(served.server.url, headers)
    status_before = served.http.get("/train/status").json()
    assert before["hogwild_trainer_up"] == 1.0
    r = served.http.post("/train", json={"samples": [{"context_ids": [5, 6, 7], "continuation_ids": [8, 9, 10]}],
                                         "lr": 1e-4, "steps": 2, "wait": True})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    after = hogwild_metrics(served.server.url, headers)  # published before the `wait` caller was answered
    assert after['hogwild_jobs_submitted_total{mode="sft"}'] == before.get('hogwild_jobs_submitted_total{mode="sft"}', 0) + 1
    assert after['hogwild_jobs_finished_total{mode="sft",state="succeeded"}'] == \
        before.get('hogwild_jobs_finished_total{mode="sft",state="succeeded"}', 0) + 1
    assert after["hogwild_tokens_trained_total"] == before.get("hogwild_tokens_trained_total", 0) + 2 * 3
    assert after["hogwild_optimizer_steps_total"] == before.get("hogwild_optimizer_steps_total", 0) + 2
    assert after["hogwild_weights_version"] == before["hogwild_weights_version"] + 2
    assert after["hogwild_seconds_since_last_step"] < 60
    # /train/status counts the same job. Its totals are this trainer process's own, while the
    # counters also keep what earlier trainer processes of this server did, so the two agree on
    # what changed, and on the whole only while no trainer has been restarted.
    status = served.http.get("/train/status").json()
    totals = status["totals"]
    assert totals["optimizer_steps"] == status_before["totals"]["optimizer_steps"] + 2
    assert totals["tokens_trained"] == status_before["totals"]["tokens_trained"] + 2 * 3
    assert totals["optimizer_steps"] <= after["hogwild_optimizer_steps_total"]
    cli(["status", served.server.url, "--api-key", served.server.api_key])
    printed = capsys.readouterr().out
    assert "optimizer steps" in printed and str(totals["optimizer_steps"]) in printed

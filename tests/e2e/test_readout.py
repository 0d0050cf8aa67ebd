"""Readout on real `vllm serve`: per-token concept values checked against a
Hugging Face forward pass on the same weights, the manifest route, hot reload,
online training, and bad vector files refused."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from hogwild.readout.vectors import load_vector_set, save_vector_set, unit_vector_set

from ..conftest import REPO, start_served
from ..waiting import wait_idle  # readouts are compared with a copy of the weights: no job may change them meanwhile
from .test_spine import hf_model_with_served_weights

pytestmark = pytest.mark.server
TOLERANCE = 1e-3


def hf_readout(model, vector_set, ids: list[int]) -> torch.Tensor:
    """(len(ids), n_layers, n_concepts): each position's residual stream after each
    hooked layer (before the final norm), dotted with the concept vectors."""
    captured = {}
    hooks = [model.model.layers[layer].register_forward_hook(
        lambda m, a, out, layer=layer: captured.__setitem__(layer, (out[0] if isinstance(out, tuple) else out)[0]))
        for layer in vector_set.layers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([captured[layer].float() @ vector_set.vectors[layer].T for layer in vector_set.layers], dim=1)


def current_set(handle):
    manifest = handle.http.get("/v1/readout/manifest").json()
    copy = handle.session / "readout" / manifest["version"]
    if copy.with_suffix(".json").exists():
        return manifest, load_vector_set(copy.with_suffix(".safetensors"), copy.with_suffix(".json"))
    return manifest, load_vector_set(handle.server.env["VLLM_READOUT_VECTORS"])


def sse_chunks(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]


def ask(handle, kind: str, prompt, stream: bool, **extra) -> list[dict]:
    """One request; per choice: prompt ids, generated ids, readouts (and prompt readouts)."""
    body = {"model": str(handle.model_dir), "max_tokens": 12, "temperature": 0, "return_token_ids": True, "stream": stream,
            **extra}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    with httpx.Client(base_url=handle.server.url, headers=handle.http.headers, timeout=120) as client:
        r = client.post(f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        out = r.json()
        return [{"prompt": c.get("prompt_token_ids") or out.get("prompt_token_ids"), "ids": c["token_ids"],
                 "readout": c["readout"], "prompt_readout": c.get("prompt_readout")} for c in out["choices"]]
    choices: dict[int, dict] = {}
    for chunk in sse_chunks(r.text):
        for c in chunk["choices"]:
            got = choices.setdefault(c["index"], {"prompt": None, "ids": [], "readout": [], "prompt_readout": None})
            got["prompt"] = got["prompt"] or c.get("prompt_token_ids") or chunk.get("prompt_token_ids")
            got["prompt_readout"] = got["prompt_readout"] or c.get("prompt_readout")
            if c.get("token_ids"):
                assert len(c["token_ids"]) == 1 and "readout" in c  # one token, one [n_layers][n_concepts]
                got["ids"] += c["token_ids"]
                got["readout"].append(c["readout"])
            else:
                assert "readout" not in c
    return [choices[i] for i in sorted(choices)]


def check(model, vector_set, choice) -> float:
    """Largest difference from the HF reference; also checks the shapes."""
    prompt, ids = choice["prompt"], choice["ids"]
    reference = hf_readout(model, vector_set, prompt + ids)
    got = torch.tensor(choice["readout"])
    assert got.shape == (len(ids), len(vector_set.layers), len(vector_set.concepts))
    worst = (got - reference[len(prompt) - 1: len(prompt) - 1 + len(ids)]).abs().max().item()
    if choice["prompt_readout"] is not None:
        assert len(choice["prompt_readout"]) == len(prompt)
        worst = max(worst, (torch.tensor(choice["prompt_readout"]) - reference[: len(prompt)]).abs().max().item())
    return worst


def concurrent_mix(handle, tok) -> list[tuple[str, dict]]:
    """16 requests at once: completions and chat, streamed and not, some with prompt
    readouts, prompts of very different lengths (long ones are chunked where the
    server's token budget is small), one with two prompts and n=2."""
    words = " ".join(p.read_text() for p in sorted((REPO / "stories").glob("*.txt"))).split()

    def job(i):
        text = " ".join(words[i * 7: i * 7 + 4 + (i * 37) % 180])
        kind, stream = ("chat", "completions")[i % 2], (i // 2) % 2 == 1
        extra = {"readout_prompt": True} if i % 5 == 0 else {}
        if i == 3:
            return [(f"#{i}", c) for c in ask(handle, "completions", [tok.encode(text), tok.encode(text[::2])], False,
                                                 n=2, temperature=1.0)]
        prompt = text if kind == "chat" else tok.encode(text)
        return [(f"#{i} {kind} stream={stream} {extra}", c) for c in ask(handle, kind, prompt, stream, **extra)]

    with ThreadPoolExecutor(16) as pool:
        return [c for choices in pool.map(job, range(16)) for c in choices]


@pytest.fixture(scope="module")
def tok(served):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served.model_dir)


def test_manifest_route_describes_the_served_set(served):
    manifest = served.http.get("/v1/readout/manifest").json()
    on_disk = json.loads((Path(served.server.env["VLLM_READOUT_VECTORS"]).parent / "readout.json").read_text())
    assert {k: manifest[k] for k in on_disk} == on_disk
    assert len(manifest["concepts"]) >= 24 and manifest["layers"] == [0, 1] and manifest["hidden_size"] == 64


def test_sixteen_concurrent_requests_agree_with_hf(served, tok):
    wait_idle(served)
    _, vector_set = current_set(served)
    results = concurrent_mix(served, tok)
    assert len(results) == 15 + 4
    model = hf_model_with_served_weights(served)
    for name, choice in results:
        assert check(model, vector_set, choice) < TOLERANCE, name
    assert any(c["prompt_readout"] for _, c in results)


def test_token_ids_stay_out_of_answers_that_did_not_ask(served, tok):
    r = served.http.post("/v1/completions", json={"model": str(served.model_dir), "prompt": tok.encode("Plain request"),
                                                  "max_tokens": 5, "temperature": 0})
    choice = r.json()["choices"][0]
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None
    assert len(choice["readout"]) == r.json()["usage"]["completion_tokens"]
    bad = served.http.post("/v1/completions", json={"model": str(served.model_dir), "prompt": "x", "readout_prompt": "yes"})
    assert bad.status_code == 400 and "readout_prompt" in bad.json()["error"]["message"]


def test_bad_vector_files_are_refused_while_serving(served, tok, tmp_path):
    before = served.http.get("/v1/readout/manifest").json()
    wrong = served.state_dir / "wrong-hidden"
    save_vector_set(unit_vector_set(["a", "b"], {1: torch.randn(2, 32)}), wrong)
    r = served.http.post("/readout/load", json={"vectors": str(wrong / "readout.safetensors")})
    assert r.status_code == 422 and "hidden_size 32 does not match the served model's 64" in r.json()["error"]["message"]
    out_of_range = served.state_dir / "layer-9"
    save_vector_set(unit_vector_set(["a", "b"], {9: torch.randn(2, 64)}), out_of_range)
    r = served.http.post("/readout/load", json={"vectors": str(out_of_range / "readout.safetensors")})
    assert r.status_code == 422 and "layer 9 is out of range" in r.json()["error"]["message"]
    outside = tmp_path / "elsewhere"
    save_vector_set(unit_vector_set(["a", "b"], {1: torch.randn(2, 64)}), outside)
    r = served.http.post("/readout/load", json={"vectors": str(outside / "readout.safetensors")})
    assert r.status_code == 403
    no_key = served.http.post("/readout/load", json={"vectors": str(wrong / "readout.safetensors")},
                              headers={"X-Hogwild-Admin-Key": "wrong"})
    assert no_key.status_code in (401, 403)
    assert served.http.get("/v1/readout/manifest").json() == before
    assert len(served.complete(tok.encode("still serving"), 3)) == 3


def test_hot_reload_never_mixes_two_sets_in_one_request(served, tok):
    wait_idle(served)
    old_manifest, old_set = current_set(served)
    new_dir = served.state_dir / "reload"
    save_vector_set(unit_vector_set(["north", "south", "east"], {1: torch.randn(3, 64)}), new_dir)
    prompt = tok.encode("A long answer that is still streaming when the vectors change")
    body = {"model": str(served.model_dir), "prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True,
            "return_token_ids": True, "ignore_eos": True}
    chunks, started = [], threading.Event()

    def stream():
        with httpx.Client(base_url=served.server.url, headers=served.http.headers, timeout=120) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    r = served.http.post("/readout/load", json={"vectors": str(new_dir / "readout.safetensors")})
    assert r.status_code == 200, r.text
    reader.join(120)
    assert r.json()["concepts"] == ["north", "south", "east"] and r.json()["version"] != old_manifest["version"]
    assert served.http.get("/v1/readout/manifest").json()["concepts"] == ["north", "south", "east"]
    # The running request kept the set it started with, for every one of its tokens.
    ids = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]
    rows = [ch["readout"] for c in chunks for ch in c["choices"] if ch.get("token_ids")]
    assert len(ids) == 60
    model = hf_model_with_served_weights(served)
    assert check(model, old_set, {"prompt": prompt, "ids": ids, "readout": rows, "prompt_readout": None}) < TOLERANCE
    # The next request reads out with the new one.
    (after,) = ask(served, "completions", prompt, False)
    _, new_set = current_set(served)
    assert check(model, new_set, after) < TOLERANCE


def test_online_training_writes_and_hot_loads_new_vectors(served, tok):
    stories = served.state_dir / "stories"
    shutil.copytree(REPO / "stories", stories, dirs_exist_ok=True)
    few = served.state_dir / "too-few"
    (few / "joy.txt").parent.mkdir(exist_ok=True)
    (few / "joy.txt").write_text("one\n\ntwo\n")
    (few / "fear.txt").write_text("a\n\nb\n\nc\n\nd\n")
    r = served.http.post("/readout/train", json={"stories": str(few), "layers": [1], "out": str(served.state_dir / "x")})
    assert r.status_code == 422 and "fewer than 4 stories for: joy (2)" in r.json()["error"]["message"]
    r = served.http.post("/readout/train", json={"stories": str(stories), "layers": [1], "aggregator": "pca",
                                                 "out": str(served.state_dir / "online"), "wait": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded", job
    manifest = served.http.get("/v1/readout/manifest").json()
    assert manifest["version"] == job["result"]["loaded_version"] and manifest["layers"] == [1]
    for name in ("readout.safetensors", "readout.json", "quality.json", "quality.png"):
        assert (served.state_dir / "online" / name).stat().st_size > 0
    wait_idle(served)
    trained = load_vector_set(served.state_dir / "online" / "readout.safetensors")
    (choice,) = ask(served, "chat", "How does the evening feel?", False)
    assert check(hf_model_with_served_weights(served), trained, choice) < TOLERANCE


def test_a_bad_startup_set_stops_the_server_naming_the_problem(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    save_vector_set(unit_vector_set(["a", "b"], {5: torch.randn(2, 64)}), bad)
    with pytest.raises(RuntimeError) as err:
        start_served(tiny_model_dir, tmp_path, "bad-readout", dtype="float32", copy_model=False, wait_trainer=False,
                     env={"VLLM_READOUT_VECTORS": str(bad / "readout.safetensors")})
    assert "layer 5 is out of range (the served model has layers 0..1)" in str(err.value) + (
        tmp_path / "bad-readout-vllm.log").read_text()

"""``python -m bench adapters``: adapters trained in place on one served base and served by
vLLM's multi-LoRA (``--enable-lora --max-loras 8``), on the ~24M-parameter bench model (fp32;
vLLM runs LoRA eagerly on CPU), each figure against a baseline measured in the same run.

- adapter_update_visible_after_requests: after an adapter job answered ``wait``, the index of
  the first ``/v1/score`` request under the adapter that scores what the trainer measured after
  its last step (1 = the next request).
- adapter_train_tokens_per_s_ratio_vs_full: tokens/s of an adapter job / a full-weight job on
  the same samples and steps, on the same server (submit to answer, over HTTP).
- serving_tokens_per_s_ratio_with_8_adapters_vs_base: generated tokens/s of 16 concurrent greedy
  streams spread over 8 adapters / the same streams on the base, same server.
- update_seconds_to_served: from an adapter job's end to vLLM serving its new factors: the
  job's last step is in the adapter's live file when the job ends, and vLLM's model worker copies
  it from there into its loaded adapter before the next forward pass that uses the adapter; this
  is that update, as the worker measures it (``contracts/live_adapter.read_served``), checked to be the job's
  version. ``first_request_extra_seconds``: the same cost seen from a client, the first scoring
  request after the job minus the second. Against ``save_and_load_seconds``: the same factors
  saved as a PEFT directory on disk and loaded through vLLM's ``/v1/load_lora_adapter``, as a
  client of a separate trainer would (the ratio's goal is 0.1). ``job_end_to_answer_seconds``:
  the job's end to its ``wait`` answer (the event, the status read, the prefix-cache reset);
  ``last_step_to_served_seconds`` adds what the job does after its last step (the adapter's
  durable copy, detaching it).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import httpx

from hogwild.contracts.live_adapter import read_served
from hogwild.launch import VllmServer

from .common import CACHE, generation_throughput, machine, model_dir
from .spine import training_samples

ADAPTERS = 8
RANK = 16


def run(quick: bool = False, log=print) -> dict:
    from transformers import AutoTokenizer

    preset = "tiny" if quick else "bench"
    path = model_dir(preset)
    tok = AutoTokenizer.from_pretrained(path)
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    out: dict = {"benchmark": "adapters", "machine": machine(), "model": {"preset": preset, "dtype": "float32"},
                 "mode": "eager", "max_loras": ADAPTERS, "adapter_rank": RANK}
    with tempfile.TemporaryDirectory() as state:
        server = VllmServer(path, log_path=CACHE / "bench" / "adapters-vllm.log", dtype="float32", max_model_len=1024,
                            extra_args=["--enable-lora", "--max-loras", str(ADAPTERS), "--max-cpu-loras", str(ADAPTERS + 2),
                                        "--max-lora-rank", str(RANK)],
                            env={"HOGWILD_STATE_DIR": state, "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0",
                                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})  # the baseline's /v1/load_lora_adapter
        server.start(timeout=900)
        try:
            measure(server, path, tok, quick, out, log)
        finally:
            server.stop()
    return out


def measure(server: VllmServer, path: Path, tok, quick: bool, out: dict, log) -> None:
    server.wait_trainer(timeout=600)
    http = httpx.Client(base_url=server.url, headers=server.headers(), timeout=3600)

    def train(samples, **fields):
        r = http.post("/train", json={"samples": samples, "wait": True, **fields})
        r.raise_for_status()
        return r.json(), time.time()

    def score(model: str, ids: list[int], start: int) -> float:
        r = http.post("/v1/score", json={"model": model, "prompt": ids, "score_ranges": [[start, len(ids)]]})
        r.raise_for_status()
        return r.json()["scores"][0]["total_logprob"]

    # 1. The first request after the answer: does it score what the trainer measured?
    log("phase 1: an adapter job, then the requests until one scores the trained adapter")
    ctx, target = tok.encode("The benchmark asks the served model"), tok.encode(" and the adapter answers.")
    sample = [{"context_ids": ctx, "continuation_ids": target}]
    train(sample, adapter="bench-0", adapter_rank=RANK, lr=1e-3, steps=1)
    job, _ = train(sample, adapter="bench-0", lr=1e-3, steps=1)
    trained = -job["result"]["loss_after"] * len(target)
    out["adapter_update_visible_after_requests"] = next(
        (i for i in range(1, 11) if abs(score("bench-0", ctx + target, len(ctx)) - trained) < 1e-3), None)

    # 2. Training throughput: an adapter against the full weights, same samples and steps.
    log("phase 2: training throughput, adapter vs full weights")
    samples = training_samples(tok, n=8, ctx_len=64, cont_len=64)
    options = {"lr": 1e-5, "steps": 2 if quick else 4, "shuffle": False, "eval_tokens": 0}
    for fields in ({"adapter": "bench-0"}, {}):  # warm-up: the first job of each kind
        train(samples, **fields, **{**options, "steps": 1})
    rates = {}
    for name, fields in (("adapter", {"adapter": "bench-0"}), ("full", {})):
        started = time.perf_counter()
        job, _ = train(samples, **fields, **options)
        rates[name] = job["result"]["tokens"] / (time.perf_counter() - started)
    out["adapter_train_tokens_per_s"], out["full_train_tokens_per_s"] = rates["adapter"], rates["full"]
    out["adapter_train_tokens_per_s_ratio_vs_full"] = rates["adapter"] / rates["full"]

    # 3. Serving: 8 adapters side by side against the base.
    log(f"phase 3: generation with {ADAPTERS} adapters vs the base")
    names = [f"bench-{i}" for i in range(ADAPTERS)]
    for name in names[1:]:
        train(sample, adapter=name, adapter_rank=RANK, lr=1e-3, steps=1)
    base = str(path)
    generation_throughput(server.url, base, server.headers(), rounds=1)  # warm-up
    generation_throughput(server.url, names, server.headers(), rounds=1)
    out["inference_tokens_per_s_base"] = generation_throughput(server.url, base, server.headers(), rounds=3)
    out[f"inference_tokens_per_s_{ADAPTERS}_adapters"] = generation_throughput(server.url, names, server.headers(), rounds=3)
    out[f"serving_tokens_per_s_ratio_with_{ADAPTERS}_adapters_vs_base"] = (
        out[f"inference_tokens_per_s_{ADAPTERS}_adapters"] / out["inference_tokens_per_s_base"])

    # 4. From a job's end to the new factors served, against saving them and loading them anew.
    log("phase 4: update to served, vs save and /v1/load_lora_adapter")
    live = Path(http.get("/train/status").json()["served_adapters"][0]["path"]).parent / "bench-0"
    ids = ctx + target
    runs, extra, answers, whole, in_place = [], [], [], [], []
    for _ in range(3):
        job, answered = train(sample, adapter="bench-0", lr=1e-3, steps=1, eval_tokens=0)
        version = next(a["version"] for a in http.get("/train/status").json()["served_adapters"] if a["name"] == "bench-0")
        latency = []
        for _ in range(2):  # the first request finds the update and takes it; the second finds nothing to do
            started = time.perf_counter()
            score("bench-0", ids, len(ctx))
            latency.append(time.perf_counter() - started)
        served = read_served(live)
        if served is None or served[0][0] != version:
            raise RuntimeError(f"vLLM's worker serves {served}, not version {version} of the adapter")
        runs.append(served[1])
        in_place.append(served[2])
        extra.append(latency[0] - latency[1])
        answers.append(answered - job["finished_at"])
        whole.append(answered - job["result"]["last_step_at"])
    out["update_seconds_to_served_runs"] = runs
    out["update_seconds_to_served"] = sorted(runs)[1]
    out["updates_copied_in_place"] = sum(in_place)
    out["first_request_extra_seconds"] = sorted(extra)[1]
    out["job_end_to_answer_seconds"] = sorted(answers)[1]
    out["last_step_to_served_seconds"] = sorted(whole)[1]
    baseline = []
    with tempfile.TemporaryDirectory(dir=CACHE / "bench") as disk:
        for i in range(3):
            started = time.perf_counter()
            saved = Path(disk) / f"saved-{i}"
            save_peft_dir(live, saved)
            r = http.post("/v1/load_lora_adapter", json={"lora_name": f"saved-{i}", "lora_path": str(saved)})
            r.raise_for_status()
            baseline.append(time.perf_counter() - started)
    out["save_and_load_seconds_runs"] = baseline
    out["save_and_load_seconds"] = sorted(baseline)[1]
    out["update_seconds_ratio_vs_save_and_load"] = out["update_seconds_to_served"] / out["save_and_load_seconds"]


def save_peft_dir(live: Path, target: Path) -> None:
    """What a separate trainer does to hand an adapter over: its PEFT files written to disk
    (the factors re-serialized from tensors, as ``save_pretrained`` does) and made durable."""
    import os

    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    shutil.copy(live / "adapter_config.json", target / "adapter_config.json")
    save_file(load_file(live / "adapter_model.safetensors"), target / "adapter_model.safetensors")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(target / name, "rb") as f:
            os.fsync(f.fileno())

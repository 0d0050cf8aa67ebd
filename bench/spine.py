"""``python -m bench spine``: the spine's four numbers, each against a baseline
measured in the same run, on the ~24M-parameter bench model (fp32, vLLM's
default compiled mode).

- first_reflecting_request_after_train: after ``/train`` with ``wait``, the index
  of the first completion that shows the trained behaviour (1 = the next one).
- trainer_weight_copy_ratio: private memory the trainer spent binding the served
  weights / the weights' size (a copy would be 1.0).
- train_tokens_per_s_ratio: tokens/s of a ``/train`` job (submit to done, over
  HTTP) / the same trainer and optimizer on the same model and samples in a
  plain single process with the same thread count.
- job_overhead_ratio: a 16-step job's time outside its optimizer steps (journal, bounded
  evaluation, ledger) / the time of its steps.
- wait_answer_latency_ms: from a job's last optimizer step to the ``wait`` caller's answer,
  for jobs whose last step is their last work (``eval_tokens: 0``; the median of three).
  wait_answer_latency_ms_with_evaluation: the same for the 16-step job, which measures
  ``loss_after`` after its last step as the default does, split into
  last_step_to_job_end_ms (that evaluation) and job_end_to_answer_ms (the answer's delivery).
- inference_tokens_per_s_ratio_during_training: generated tokens/s of 16
  concurrent greedy streams while a training job runs / idle.
- inference_tokens_per_s_ratio_vs_plain_vllm: the same streams with the plugin
  (idle) / on plain ``vllm serve`` without it; ``..._bf16``: the same in bf16;
  ``moe_...``: the same on the MoE family's model (``qwen3_moe``, fp32).
- linear_kernel_us: microseconds per call of each of the model's linear shapes at 1, 16 and
  256 tokens: the plugin's (``live_kernels.linear_for``), ``F.linear`` on the same weight, vLLM's oneDNN
  matmul on its packed copy; fp32 and bf16.
"""

from __future__ import annotations

import math
import tempfile
import time

import httpx
import torch

from hogwild.launch import VllmServer

from .common import CACHE, generation_throughput, machine, model_dir


def training_samples(tok, n: int, ctx_len: int, cont_len: int) -> list[dict]:
    """Deterministic samples cut from the story corpus (the tiny tokenizer's own text)."""
    from hogwild.tiny_model import corpus_files

    ids = []
    for f in corpus_files():
        ids += tok.encode(f.read_text(errors="replace"))
        if len(ids) > n * (ctx_len + cont_len):
            break
    width = ctx_len + cont_len
    return [{"context_ids": ids[i * width : i * width + ctx_len], "continuation_ids": ids[i * width + ctx_len : (i + 1) * width]}
            for i in range(n)]


def baseline_tokens_per_s(model_path, samples: list[dict], options: dict, threads: int, dtype: str = "float32") -> float:
    """The same trainer and optimizer on an ordinary HF model, in this process."""
    from transformers import AutoModelForCausalLM

    from hogwild.contracts.sft_config import SFTOptions
    from hogwild.training.batches import Sample
    from hogwild.training.hf_model import attention_for, training_config
    from hogwild.training.sft import SFTTrainer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                 **attention_for(training_config(model_path))).eval()
    trainer = SFTTrainer(model)
    batch = [Sample(tuple(s["context_ids"]), tuple(s["continuation_ids"])) for s in samples]
    trainer.run(batch, SFTOptions(**{**options, "steps": 1}))  # warm-up, as the served trainer is warm
    started = time.perf_counter()
    result = trainer.run(batch, SFTOptions(**options))
    return result.tokens / (time.perf_counter() - started)


def run(quick: bool = False, log=print) -> dict:
    from transformers import AutoTokenizer

    preset = "tiny" if quick else "bench"
    path = model_dir(preset)
    tok = AutoTokenizer.from_pretrained(path)
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    threads = 1
    out: dict = {"benchmark": "spine", "machine": machine(), "model": {"preset": preset, "dtype": "float32"}, "mode": "compiled"}
    # 0. Where the serving speed comes from: each linear of the bench model, per kernel, here.
    log("phase 0: the linear kernels on the bench model's shapes")
    out["linear_kernel_us"] = linear_kernel_us(path)
    with tempfile.TemporaryDirectory() as state:
        server = VllmServer(path, log_path=CACHE / "bench" / "spine-vllm.log", dtype="float32", eager=False, max_model_len=1024,
                            env={"HOGWILD_STATE_DIR": state, "HOGWILD_TRAINER_THREADS": str(threads),
                                 "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0"})  # never write into the cached model
        server.start(timeout=900)
        try:
            measure(server, path, tok, threads, quick, out, log)
        finally:
            server.stop()
    # 5. What the plugin costs inference when nothing trains (on CPU: the live weights computed
    # with ``live_kernels`` instead of vLLM's oneDNN-packed copies; nothing changes on GPU).
    log("phase 5: the same load on plain vLLM, without the plugin")
    out["inference_tokens_per_s_plain_vllm"] = plain_throughput(path, "float32")
    out["inference_tokens_per_s_ratio_vs_plain_vllm"] = (out["inference_tokens_per_s_idle"]
                                                         / out["inference_tokens_per_s_plain_vllm"])
    # 6. The same comparison in bf16, the dtype people serve in, and on a MoE model (fp32).
    log("phase 6: plugin vs plain vLLM in bf16, and on the MoE family")
    out["inference_tokens_per_s_idle_bf16"] = plugin_throughput(path, "bfloat16")
    out["inference_tokens_per_s_plain_vllm_bf16"] = plain_throughput(path, "bfloat16")
    out["inference_tokens_per_s_ratio_vs_plain_vllm_bf16"] = (out["inference_tokens_per_s_idle_bf16"]
                                                              / out["inference_tokens_per_s_plain_vllm_bf16"])
    moe = moe_model_dir(preset)
    out["moe_inference_tokens_per_s_idle"] = plugin_throughput(moe, "float32")
    out["moe_inference_tokens_per_s_plain_vllm"] = plain_throughput(moe, "float32")
    out["moe_inference_tokens_per_s_ratio_vs_plain_vllm"] = (out["moe_inference_tokens_per_s_idle"]
                                                             / out["moe_inference_tokens_per_s_plain_vllm"])
    return out


def moe_model_dir(preset: str):
    """The MoE family's model (``qwen3_moe``: 4 experts, 2 per token) at the bench's size, cached."""
    from hogwild import tiny_model

    out = CACHE / "models" / f"{preset}-qwen3_moe-float32"
    if not (out / "config.json").exists():
        tiny_model.build(out, arch="qwen3_moe", preset=preset)
    return out


def plugin_throughput(path, dtype: str) -> float:
    """The 16 streams' tokens/s with the plugin, idle (its trainer up, nothing training)."""
    with tempfile.TemporaryDirectory() as state:
        server = VllmServer(path, log_path=CACHE / "bench" / f"spine-{path.name}-{dtype}-vllm.log", dtype=dtype, eager=False,
                            max_model_len=1024, env={"HOGWILD_STATE_DIR": state, "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0"})
        server.start(timeout=900)
        try:
            server.wait_trainer(timeout=600)
            generation_throughput(server.url, str(path), server.headers(), rounds=1)  # warm-up
            return generation_throughput(server.url, str(path), server.headers(), rounds=3)
        finally:
            server.stop()


def plain_throughput(path, dtype: str) -> float:
    """The 16 streams' tokens/s on plain ``vllm serve`` (no plugin), after a warm-up round."""
    plain = VllmServer(path, log_path=CACHE / "bench" / f"spine-plain-{path.name}-{dtype}-vllm.log", dtype=dtype, eager=False,
                       max_model_len=1024, env={"VLLM_PLUGINS": ""})
    plain.start(timeout=900)
    try:
        generation_throughput(plain.url, str(path), {}, rounds=1)  # warm-up
        return generation_throughput(plain.url, str(path), {}, rounds=3)
    finally:
        plain.stop()


def linear_kernel_us(path, rows=(1, 16, 256), threads: int = 2) -> dict:
    """Microseconds per call of each linear shape of the model (q/k/v packed, o, gate/up packed,
    down, lm_head) at ``rows`` tokens: ``linear_for`` the weight (what the plugin serves with), ``F.linear``
    on the same weight (what it served with before), vLLM's oneDNN matmul on its packed copy
    (plain vLLM), in fp32 and bf16, on vLLM's engine's thread count."""
    import json

    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    from hogwild.plugin.model_runner.live_kernels import linear_for

    c = json.loads((path / "config.json").read_text())
    h, head = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    shapes = {"qkv": (h + 2 * c["num_key_value_heads"] * head, h), "o": (h, h), "gate_up": (2 * c["intermediate_size"], h),
              "down": (h, c["intermediate_size"]), "lm_head": (c["vocab_size"], h)}
    torch.set_num_threads(threads)

    def per_call(f, calls: int = 200) -> float:
        for _ in range(10):
            f()
        started = time.perf_counter()
        for _ in range(calls):
            f()
        return 1e6 * (time.perf_counter() - started) / calls

    table: dict = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (n, k) in shapes.items():
            weight = torch.randn(n, k, dtype=dtype) / k**0.5
            packed = ops.create_onednn_mm(weight.t(), 32)
            for m in rows:
                x = torch.randn(m, k, dtype=dtype)
                table[f"{str(dtype)[6:]} {name} {n}x{k} rows {m}"] = {
                    "plugin": per_call(lambda: linear_for(weight)(x, weight, None)),
                    "f_linear": per_call(lambda: F.linear(x, weight)),
                    "onednn_packed": per_call(lambda: ops.onednn_mm(packed, x, None))}
    return table


def measure(server: VllmServer, path, tok, threads: int, quick: bool, out: dict, log) -> dict:
    status = server.wait_trainer(timeout=600)
    http = httpx.Client(base_url=server.url, headers=server.headers(), timeout=3600)
    model_name = str(path)
    out["model"]["params"] = status["memory"]["param_bytes"] // 4

    def complete(prompt, n):
        r = http.post("/v1/completions", json={"model": model_name, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                                "return_token_ids": True})
        return r.json()["choices"][0]["token_ids"]

    def train(samples, **options):
        r = http.post("/train", json={"samples": samples, **options})
        r.raise_for_status()
        return r.json()

    # 1. Which request first answers with the trained behaviour?
    log("phase 1: train a continuation, then count requests until it shows")
    ctx, target = tok.encode("The benchmark asks the served model"), tok.encode(" and the trained model answers.")
    job = train([{"context_ids": ctx, "continuation_ids": target}], lr=3e-3, steps=60, wait=True)
    out["memorised_loss_after"] = job["result"]["loss_after"]
    out["first_reflecting_request_after_train"] = next((i for i in range(1, 11) if complete(ctx, len(target)) == target), None)

    # 2. Private memory spent on the weights.
    memory = http.get("/train/status").json()["memory"]
    out["trainer_weight_copy_ratio"] = memory["binding_private_bytes"] / memory["param_bytes"]

    # 3. Training throughput: served vs plain process.
    log("phase 3: training throughput, served vs plain process")
    samples = training_samples(tok, n=8, ctx_len=64, cont_len=64)
    options = {"lr": 1e-5, "steps": 2 if quick else 4, "shuffle": False}
    started = time.perf_counter()
    job = train(samples, wait=True, **options)
    served_seconds = time.perf_counter() - started
    out["train_tokens_per_s"] = job["result"]["tokens"] / served_seconds
    out["baseline_train_tokens_per_s"] = baseline_tokens_per_s(path, samples, options, threads)
    out["train_tokens_per_s_ratio"] = out["train_tokens_per_s"] / out["baseline_train_tokens_per_s"]
    # What a job costs beyond its optimizer steps (journal, bounded evaluation, ledger), on a
    # job of 16 steps with the default evaluation (loss before and after on its samples).
    job = train(samples, wait=True, **{**options, "steps": 4 if quick else 16})
    answered_at = time.time()
    result = job["result"]
    out["job_seconds"] = job["finished_at"] - job["started_at"]
    out["job_step_seconds"] = result["train_seconds"]
    out["job_overhead_ratio"] = (out["job_seconds"] - result["train_seconds"]) / result["train_seconds"]
    out["wait_answer_latency_ms_with_evaluation"] = 1000 * (answered_at - result["last_step_at"])
    out["last_step_to_job_end_ms"] = 1000 * (job["finished_at"] - result["last_step_at"])
    out["job_end_to_answer_ms"] = 1000 * (answered_at - job["finished_at"])
    # How soon a `wait` caller hears that a job's weights are final (its result recorded, the
    # job_finished event, the prefix-cache reset, HTTP), on jobs that end at their last step.
    runs = []
    for _ in range(3):
        job = train(samples, wait=True, **{**options, "steps": 2, "eval_tokens": 0})
        runs.append(1000 * (time.time() - job["result"]["last_step_at"]))
    out["wait_answer_latency_ms_runs"] = runs
    out["wait_answer_latency_ms"] = sorted(runs)[1]
    after = http.get("/train/status").json()["memory"]
    out["optimizer_state_bytes_ratio"] = after["optimizer_state_bytes"] / after["param_bytes"]

    # 4. Inference throughput while a job trains.
    log("phase 4: inference throughput idle, then during a training job")
    generation_throughput(server.url, model_name, server.headers(), rounds=1)  # warm-up
    started = time.perf_counter()
    idle = generation_throughput(server.url, model_name, server.headers(), rounds=3)
    load_seconds = time.perf_counter() - started
    step_seconds = served_seconds / options["steps"]
    steps = math.ceil((3 * load_seconds + 5) / step_seconds)
    job = train(samples, wait=False, **{**options, "steps": steps})
    while http.get(f"/train/{job['job_id']}").json()["state"] != "running":
        time.sleep(0.05)
    during = generation_throughput(server.url, model_name, server.headers(), rounds=3)
    out["job_running_throughout_load"] = http.get(f"/train/{job['job_id']}").json()["state"] == "running"
    while http.get(f"/train/{job['job_id']}").json()["state"] in ("queued", "running"):
        time.sleep(0.5)
    out["inference_tokens_per_s_idle"] = idle
    out["inference_tokens_per_s_during_training"] = during
    out["inference_tokens_per_s_ratio_during_training"] = during / idle
    return out

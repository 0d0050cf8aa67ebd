"""``python -m bench tensor_parallel``: training on a tensor-parallel 2 server against the same
model served with tensor parallel 1, same run, same cores.

- ``tp2_vs_tp1_train_tokens_per_s_ratio``: tokens/s of the same ``/train`` job (samples,
  options, seed) on the TP 2 server (two trainer ranks, one thread each) over the TP 1
  server (one trainer, two threads): the same two cores either way;
- ``trainer_weight_copy_ratio``: per trainer rank, the private memory it spent binding its
  shard of the served weights / that shard's bytes (a gathered copy would be >= 1; goal < 0.1);
- ``loss_curve_max_abs_diff``: the largest gap between the two servers' per-step losses
  of the first job (fp32; both start from the same checkpoint).
"""

from __future__ import annotations

import tempfile

import httpx

from .common import CACHE, machine, model_dir
from .spine import training_samples

STEPS = 8


def _serve(path, tp: int, state: str):
    from hogwild.launch import VllmServer

    env = {"HOGWILD_STATE_DIR": state, "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0",  # never write into the cached model
           "HOGWILD_TRAINER_THREADS": str(2 // tp)}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per vLLM worker
    server = VllmServer(path, log_path=CACHE / "bench" / f"tensor-parallel-{tp}-vllm.log", dtype="float32", max_model_len=1024,
                        extra_args=["--tensor-parallel-size", str(tp)], env=env)
    server.start(timeout=900)
    return server


def _train(http: httpx.Client, samples: list[dict], **options) -> dict:
    r = http.post("/train", json={"samples": samples, "wait": True, "shuffle": False, "eval_tokens": 0, **options})
    r.raise_for_status()
    job = r.json()
    if job["state"] != "succeeded":
        raise RuntimeError(f"the bench job did not succeed: {job}")
    return job["result"]


def run(quick: bool = False, log=print) -> dict:
    from transformers import AutoTokenizer

    preset = "tiny" if quick else "bench"
    path = model_dir(preset)
    tok = AutoTokenizer.from_pretrained(path)
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    samples = training_samples(tok, n=8, ctx_len=32, cont_len=96)
    steps = 2 if quick else STEPS
    options = dict(lr=1e-5, steps=steps, batch_size=len(samples), micro_batch_size=len(samples), seed=0)
    out: dict = {"benchmark": "tensor_parallel", "machine": machine(), "model": {"preset": preset, "dtype": "float32"},
                 "samples": len(samples), "steps": steps}
    curves, speed = {}, {}
    for tp in (1, 2):
        log(f"tensor parallel {tp}: starting the server")
        with tempfile.TemporaryDirectory() as state:
            server = _serve(path, tp, state)
            try:
                status = server.wait_trainer(timeout=600)
                if status["state"] != "ready":
                    raise RuntimeError(f"the TP {tp} trainer is not ready: {status}")
                http = httpx.Client(base_url=server.url, headers=server.headers(), timeout=3600)
                curves[tp] = [h["loss"] for h in _train(http, samples, **options)["history"]]  # also the warm-up
                rounds = [_train(http, samples, **options)["tokens_per_s"] for _ in range(1 if quick else 3)]
                speed[tp] = sorted(rounds)[len(rounds) // 2]
                log(f"tensor parallel {tp}: {speed[tp]:.0f} tokens/s")
                if tp > 1:
                    ranks = http.get("/train/status").json()["tensor_parallel"]["ranks"]
                    out["ranks"] = ranks
                    out["trainer_weight_copy_ratio"] = [r["binding_private_bytes"] / r["param_bytes"] for r in ranks]
                    out["rank_param_bytes_ratio"] = [r["param_bytes"] / out["tp1_param_bytes"] for r in ranks]
                else:
                    out["tp1_param_bytes"] = status["memory"]["param_bytes"]
            finally:
                server.stop()
    out["tp1_train_tokens_per_s"], out["tp2_train_tokens_per_s"] = speed[1], speed[2]
    out["tp2_vs_tp1_train_tokens_per_s_ratio"] = speed[2] / speed[1]
    out["loss_curve_max_abs_diff"] = max(abs(a - b) for a, b in zip(curves[1], curves[2]))
    out["loss_curves"] = curves
    return out

"""``python -m bench rl``: an online RL iteration here against the same iteration with the weight
sync a peer pays, on the ~28M-parameter bench model (fp32, vLLM's default compiled mode).

One iteration: 8 prompts x 8 completions of 32 tokens sampled from the server (token ids and
log-probs), rewarded (a band of the vocabulary), posted as one RL job (grpo, one step) and
waited for.

- ``rl_iteration_time_ratio_vs_sync_baseline``: the median iteration here (sampling from the
  plugin's server, the job submitted and waited for over HTTP) / the baseline iteration: the
  same sampling and the same training (the job's reference pass and steps, as the trainer
  measured them: a peer's trainer does the same work) plus the weight sync a peer does after each
  update on this platform: the new weights written as a safetensors checkpoint to /dev/shm and
  pushed into the engine through vLLM's own weight-loading path (``/collective_rpc``
  ``reload_weights``, dev mode, on plain ``vllm serve``), measured in the same run. Goal <= 1.0.
  ``sync_share_of_baseline_iteration`` and ``sync_bytes_baseline`` say what the sync costs;
  ``weight_sync_bytes`` is what an iteration here moves: 0.
- ``rl_iteration_time_ratio_vs_plain_vllm_sampling``: stricter: the baseline samples on plain
  ``vllm serve``, which on this CPU samples faster than the plugin's server (it computes with
  oneDNN-packed copies of the weights; issue 25), so this also charges that cost to RL.
- ``logprob_gap_fp32``: the largest |trainer - engine| log-prob over the sampled tokens, the
  trainer as each job started. Goal <= 1e-4.
- ``samples_per_s_during_training_ratio``: completions per second while an RL job runs / idle.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from hogwild.launch import VllmServer

from .common import CACHE, machine, model_dir

PROMPTS = [[5 + i, 17 + i, 300 + 7 * i, 42, 9] for i in range(8)]
GROUP, TOKENS = 8, 32
JOB = {"objective": "grpo", "lr": 1e-5, "steps": 1, "eval_tokens": 0}  # no loss before/after: a peer's step has none


def run(quick: bool = False, log=print) -> dict:
    from hogwild.client import HogwildClient
    from hogwild.rl_loop import TokenBandReward, rl_loop

    preset = "tiny" if quick else "bench"
    path = model_dir(preset)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    band = TokenBandReward(vocab * 2 // 5, vocab * 3 // 5)
    iterations = 3 if quick else 6
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    out: dict = {"benchmark": "rl", "machine": machine(), "model": {"preset": preset, "dtype": "float32"},
                 "mode": "compiled", "prompts": len(PROMPTS), "group_size": GROUP, "max_tokens": TOKENS, "job": JOB,
                 "iterations": iterations}
    with tempfile.TemporaryDirectory() as state:
        server = VllmServer(path, log_path=CACHE / "bench" / "rl-vllm.log", dtype="float32", eager=False, max_model_len=1024,
                            env={"HOGWILD_STATE_DIR": state, "HOGWILD_ADMIN_KEY": "bench",
                                 "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0"})  # never write into the cached model
        server.start(timeout=900)
        try:
            status = server.wait_trainer(timeout=600)
            out["model"]["bytes"] = status["memory"]["param_bytes"]
            client = HogwildClient(server.url, admin_key="bench")
            log("RL iterations on the plugin's server")
            rl_loop(client, PROMPTS, band, GROUP, 1, max_tokens=TOKENS, **JOB)  # warm-up
            history = rl_loop(client, PROMPTS, band, GROUP, iterations, max_tokens=TOKENS, **JOB,
                              on_iteration=lambda r: log(r.line(iterations)))
            jobs = [client.http.get(f"/v1/train/{h.job_id}").json()["result"] for h in history]
            out["iteration_seconds"] = statistics.median(h.sample_seconds + h.train_seconds for h in history)
            out["sample_seconds"] = statistics.median(h.sample_seconds for h in history)
            out["job_seconds_over_http"] = statistics.median(h.train_seconds for h in history)
            out["train_compute_seconds"] = statistics.median(j["train_seconds"] + j["reference_seconds"] for j in jobs)
            out["logprob_gap_fp32"] = max(h.logprob_gap_max for h in history)
            out["mean_reward"] = [round(h.mean_reward, 4) for h in history]
            out["weight_sync_bytes"] = 0  # the job's update lands in the tensors vLLM samples from
            log("completions per second, idle and while an RL job runs")
            out.update(sampling_during_training(client, band, quick))
        finally:
            server.stop()
    log("the baseline: the same sampling on plain vLLM, and the weight sync a peer does")
    plain = VllmServer(path, log_path=CACHE / "bench" / "rl-plain-vllm.log", dtype="float32", eager=False,
                       max_model_len=1024, env={"VLLM_PLUGINS": "", "VLLM_SERVER_DEV_MODE": "1"})
    plain.start(timeout=900)
    try:
        out.update(plain_iteration_parts(plain, path, iterations))
    finally:
        plain.stop()
    baseline = out["sample_seconds"] + out["train_compute_seconds"] + out["sync_seconds"]
    out["baseline_iteration_seconds"] = baseline
    out["sync_share_of_baseline_iteration"] = out["sync_seconds"] / baseline
    out["rl_iteration_time_ratio_vs_sync_baseline"] = out["iteration_seconds"] / baseline
    plain = out["plain_sample_seconds"] + out["train_compute_seconds"] + out["sync_seconds"]
    out["rl_iteration_time_ratio_vs_plain_vllm_sampling"] = out["iteration_seconds"] / plain
    return out


def sampling_during_training(client, band, quick: bool) -> dict:
    """Completions per second of the iteration's sampling request, idle and while a long RL
    job (made from one round of samples) runs."""
    from hogwild.rl_loop import rl_samples

    def rate(rounds: int) -> float:
        started, n = time.perf_counter(), 0
        for _ in range(rounds):
            n += sum(len(g) for g in client.complete(PROMPTS, n=GROUP, max_tokens=TOKENS))
        return n / (time.perf_counter() - started)

    rounds = 2 if quick else 4
    started = time.perf_counter()
    idle = rate(rounds)
    groups = client.complete(PROMPTS, n=GROUP, max_tokens=TOKENS)
    samples = rl_samples(groups, [[band(c.prompt_ids, c.completion_ids) for c in g] for g in groups],
                         [str(i) for i in range(len(groups))])
    job = client.train_rl(samples, **{**JOB, "steps": 1000, "lr": 1e-6, "eval_tokens": 0})
    while client.http.get(f"/v1/train/{job['job_id']}").json()["state"] != "running":
        time.sleep(0.05)
    during = rate(rounds)
    running = client.http.get(f"/v1/train/{job['job_id']}").json()["state"] == "running"
    client.http.delete(f"/v1/train/{job['job_id']}")
    while client.http.get(f"/v1/train/{job['job_id']}").json()["state"] in ("queued", "running"):
        time.sleep(0.2)
    return {"samples_per_s_idle": idle, "samples_per_s_during_training": during, "job_running_throughout": running,
            "samples_per_s_during_training_ratio": during / idle, "sampling_measure_seconds": time.perf_counter() - started}


def plain_iteration_parts(plain: VllmServer, path: Path, iterations: int) -> dict:
    """On plain vLLM: the iteration's sampling, and the sync: the weights written as a
    checkpoint to /dev/shm (what a trainer hands over) and loaded by the engine in place."""
    from safetensors.torch import load_file, save_file

    from hogwild.client import HogwildClient

    client = HogwildClient(plain.url)
    client.complete(PROMPTS, n=GROUP, max_tokens=TOKENS)  # warm-up
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        client.complete(PROMPTS, n=GROUP, max_tokens=TOKENS)
        samples.append(time.perf_counter() - started)
    weights = {name: t.clone() for name, t in load_file(str(path / "model.safetensors")).items()}  # the trainer's copy
    sync_dir = Path(tempfile.mkdtemp(prefix="hogwild-bench-sync-", dir="/dev/shm"))
    try:
        for f in path.glob("*.json"):
            shutil.copy(f, sync_dir / f.name)
        http = httpx.Client(base_url=plain.url, timeout=600)
        syncs, writes = [], []
        for _ in range(iterations):
            started = time.perf_counter()
            save_file(weights, str(sync_dir / "model.safetensors"))
            written = time.perf_counter()
            r = http.post("/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": str(sync_dir)}})
            r.raise_for_status()
            syncs.append(time.perf_counter() - started)
            writes.append(written - started)
        sync_bytes = (sync_dir / "model.safetensors").stat().st_size
    finally:
        shutil.rmtree(sync_dir, ignore_errors=True)
    return {"plain_sample_seconds": statistics.median(samples), "sync_seconds": statistics.median(syncs),
            "sync_write_seconds": statistics.median(writes), "sync_bytes_baseline": sync_bytes,
            "sync_path": "safetensors in /dev/shm + /collective_rpc reload_weights (vLLM's in-place weight loading)"}

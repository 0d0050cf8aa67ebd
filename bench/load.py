"""``python -m bench load``: 16 concurrent completion streams for 60 s, once idle
and once with a continuous stream of small ``/train`` jobs; completion latency
p50/p99 of both, failed requests and lost jobs (loopback only).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

import httpx

from hogwild.launch import VllmServer

from .common import CACHE, machine, model_dir

TERMINAL = ("succeeded", "failed", "cancelled")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _stream(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """One streamed completion; returns (time to first token, total latency)."""
    started = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                               "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


async def run_load(url: str, model: str, headers: dict, seconds: float, train: bool, streams: int = 16,
                   max_tokens: int = 32) -> dict:
    """Drive the server for ``seconds``; with ``train``, also submit small jobs back to back."""
    latencies, first_tokens, failures = [], [], []
    jobs: list[str] = []
    job_failures: list[str] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        async def user(i: int) -> None:
            while time.monotonic() < deadline:
                try:
                    ttft, total = await _stream(client, model, [5 + i, 17, 300 + i, 42, 7], max_tokens)
                    first_tokens.append(ttft)
                    latencies.append(total)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

        async def trainer(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                sample = {"context_ids": [5, 6, 7 + i, 8], "continuation_ids": [9, 10 + n % 50], "id": f"load-{i}-{n}-{time.time()}"}
                r = await client.post("/train", json={"samples": [sample], "lr": 1e-6, "steps": 2})
                n += 1
                if r.status_code == 200:
                    jobs.append(r.json()["job_id"])
                elif r.status_code == 429:  # the queue is full: back off as told
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                else:
                    job_failures.append(f"{r.status_code} {r.text[:200]}")
                await asyncio.sleep(0.05)

        tasks = [user(i) for i in range(streams)] + ([trainer(i) for i in range(2)] if train else [])
        await asyncio.gather(*tasks)

        # Every accepted job must end in a reported state.
        states: dict[str, str] = {}
        settle = time.monotonic() + 300
        while len(states) < len(jobs) and time.monotonic() < settle:
            for job_id in jobs:
                if job_id not in states:
                    r = await client.get(f"/train/{job_id}")
                    if r.status_code == 200 and r.json()["state"] in TERMINAL:
                        states[job_id] = r.json()["state"]
            await asyncio.sleep(0.2)
    return {
        "completions": len(latencies),
        "failed_requests": len(failures) + len(job_failures),
        "failures": (failures + job_failures)[:5],
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
        "first_token_p50_s": percentile(first_tokens, 0.5),
        "mean_latency_s": statistics.fmean(latencies) if latencies else None,
        "jobs_submitted": len(jobs),
        "jobs_succeeded": sum(s == "succeeded" for s in states.values()),
        "jobs_lost": len(jobs) - len(states),
    }


def run(quick: bool = False, log=print) -> dict:
    preset, seconds = ("tiny", 10.0) if quick else ("bench", 60.0)
    path = model_dir(preset)
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    out: dict = {"benchmark": "load", "machine": machine(), "model": {"preset": preset, "dtype": "float32"},
                 "mode": "compiled", "streams": 16, "seconds": seconds}
    with tempfile.TemporaryDirectory() as state:
        server = VllmServer(path, log_path=CACHE / "bench" / "load-vllm.log", dtype="float32", eager=False,
                            env={"HOGWILD_STATE_DIR": state, "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0"})
        server.start(timeout=900)
        try:
            server.wait_trainer(timeout=600)
            model = str(path)
            asyncio.run(run_load(server.url, model, server.headers(), 5.0, train=False))  # warm-up
            log("phase 1: completions only")
            out["idle"] = asyncio.run(run_load(server.url, model, server.headers(), seconds, train=False))
            log("phase 2: completions and a continuous stream of /train jobs")
            out["training"] = asyncio.run(run_load(server.url, model, server.headers(), seconds, train=True))
        finally:
            server.stop()
    out["failed_requests"] = out["idle"]["failed_requests"] + out["training"]["failed_requests"]
    out["jobs_lost"] = out["training"]["jobs_lost"]
    out["latency_p50_ratio_training_vs_idle"] = out["training"]["latency_p50_s"] / out["idle"]["latency_p50_s"]
    out["latency_p99_ratio_training_vs_idle"] = out["training"]["latency_p99_s"] / out["idle"]["latency_p99_s"]
    return out

"""What the benchmarks share: models, the machine, and load generation."""

from __future__ import annotations

import asyncio
import platform
import time
from datetime import date
from pathlib import Path

import httpx
import msgspec


class _Usage(msgspec.Struct):
    usage: dict

CACHE = Path(".cache")


def model_dir(preset: str, dtype: str = "float32") -> Path:
    """A built tiny-model directory, cached under .cache/models/."""
    from hogwild import tiny_model

    out = CACHE / "models" / f"{preset}-{dtype}"
    if not (out / "config.json").exists():
        tiny_model.build(out, dtype=dtype, preset=preset)
    return out


def machine() -> dict:
    import os

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"date": date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


async def _stream_load(url: str, models: list[str], headers: dict, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        async def one(i, prompt):
            r = await client.post("/v1/completions", json={"model": models[i % len(models)], "prompt": prompt, "max_tokens": max_tokens,
                                                             "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            # Only the usage: a client on the same two cores must not eat the server's CPU parsing the rest.
            return msgspec.json.decode(r.content, type=_Usage).usage["completion_tokens"]

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return sum(tokens), time.perf_counter() - started


def generation_throughput(url: str, model: str | list[str], headers: dict, streams: int = 16, max_tokens: int = 64,
                          rounds: int = 1) -> float:
    """Generated tokens per second with ``streams`` concurrent greedy completions (stream i asks
    for ``model[i % len(model)]`` when ``model`` is a list: adapters served side by side)."""
    prompts = [[5 + i, 17, 300 + i, 42, 7] for i in range(streams)]
    models = [model] if isinstance(model, str) else model
    total_tokens, total_seconds = 0, 0.0
    for _ in range(rounds):
        tokens, seconds = asyncio.run(_stream_load(url, models, headers, prompts, max_tokens))
        total_tokens += tokens
        total_seconds += seconds
    return total_tokens / total_seconds

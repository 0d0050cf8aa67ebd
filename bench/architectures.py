"""``python -m bench architectures``: every decoder family served and trained in place.

For each family of ``hogwild.tiny_model`` (the bench-sized model; the hybrid families in
bf16, which vLLM's CPU kernels for Gated DeltaNet need), a real ``vllm serve`` with the
plugin, then:
- parity_max_abs_logprob_diff: the largest |log p| gap between the trainer's view model
  and vLLM's engine on a probe prompt, before and after a training job;
- train_tokens_per_s_ratio: tokens/s of a ``/train`` job (submit to done, over HTTP) /
  the same trainer and optimizer on the same model and samples in a plain process;
- trainer_weight_copy_ratio: private memory the trainer spent binding the served weights /
  their size (a copy would be 1.0; goal < 0.1);
and ``families_supported``: the families whose trainer came up ready, passed the parity
gate, trained, and kept parity after it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from hogwild import tiny_model
from hogwild.launch import VllmServer

from .common import CACHE, machine
from .spine import baseline_tokens_per_s, training_samples

TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05}  # as the families' end-to-end test


def _trainer_logprobs(session: Path, prompt: list[int]) -> list[float]:
    from hogwild.contracts.protocol import TokenLogprobsOp
    from hogwild.plugin.api_server.trainer_client import TrainerClient

    async def go():
        client = TrainerClient(session)
        try:
            return (await client.request(TokenLogprobsOp(token_ids=prompt), timeout=600)).logprobs
        finally:
            client.close()

    return asyncio.run(go())


def _parity_gap(http: httpx.Client, session: Path, prompt: list[int]) -> float:
    r = http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[p, p + 1] for p in range(1, len(prompt))]})
    r.raise_for_status()
    served = [s["total_logprob"] for s in r.json()["scores"]]
    return max(abs(a - b) for a, b in zip(served, _trainer_logprobs(session, prompt)))


def measure_family(arch: str, preset: str, work: Path, steps: int, log) -> dict:
    from transformers import AutoTokenizer

    dtype = tiny_model.FAMILIES[arch].serve_dtype or "float32"
    path = CACHE / "models" / f"{preset}-{arch}"
    if not (path / "config.json").exists():
        tiny_model.build(path, preset=preset, arch=arch)
    served = work / arch
    shutil.copytree(path, served)
    session = Path("/dev/shm") / f"hogwild-bench-{arch}-{time.monotonic_ns()}"
    server = VllmServer(served, log_path=CACHE / "bench" / f"architectures-{arch}-vllm.log", dtype=dtype,
                        max_model_len=1024, extra_args=list(tiny_model.FAMILIES[arch].serve_args), env={"HOGWILD_SESSION_DIR": str(session), "HOGWILD_STATE_DIR": str(work / f"{arch}-state"),
                                                 "HOGWILD_TRAINER_THREADS": "1", "HOGWILD_CHECKPOINT_AFTER_MINUTES": "0"})
    out: dict = {"kind": tiny_model.FAMILIES[arch].kind, "dtype": dtype}
    server.start(timeout=900)
    try:
        status = server.wait_trainer(timeout=600)
        out.update(state=status["state"], reason=status.get("reason"), model_class=status.get("model_class"),
                   frozen=status.get("frozen"), parity_gate=status.get("parity"))
        if status["state"] != "ready":
            return out
        http = httpx.Client(base_url=server.url, timeout=3600)
        tok = AutoTokenizer.from_pretrained(served)
        prompt = tok.encode("The benchmark compares the trainer's forward with vLLM's, in every family of models.")
        before = _parity_gap(http, session, prompt)
        memory = status["memory"]
        out["trainer_weight_copy_ratio"] = memory["binding_private_bytes"] / memory["param_bytes"]
        out["params"] = memory["param_bytes"] // (2 if dtype == "bfloat16" else 4)
        samples = training_samples(tok, n=8, ctx_len=32, cont_len=32)
        options = {"lr": 1e-5, "steps": steps, "shuffle": False}
        log(f"{arch}: training over HTTP")
        started = time.perf_counter()
        r = http.post("/train", json={"samples": samples, "wait": True, **options})
        r.raise_for_status()
        job = r.json()
        seconds = time.perf_counter() - started
        out["trained"] = job["state"] == "succeeded"
        out["train_tokens_per_s"] = job["result"]["tokens"] / seconds
        log(f"{arch}: the same in a plain process")
        out["baseline_train_tokens_per_s"] = baseline_tokens_per_s(served, samples, options, 1, dtype)
        out["train_tokens_per_s_ratio"] = out["train_tokens_per_s"] / out["baseline_train_tokens_per_s"]
        out["parity_max_abs_logprob_diff"] = max(before, _parity_gap(http, session, prompt))
        out["supported"] = out["trained"] and out["parity_max_abs_logprob_diff"] < TOLERANCE[dtype]
        return out
    finally:
        server.stop()
        shutil.rmtree(session, ignore_errors=True)


def run(quick: bool = False, log=print) -> dict:
    preset = "tiny" if quick else "bench"
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    out: dict = {"benchmark": "architectures", "machine": machine(), "preset": preset, "families": {}}
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        for arch in tiny_model.FAMILIES:
            log(f"== {arch}")
            try:
                out["families"][arch] = measure_family(arch, preset, Path(work), 2 if quick else 4, log)
            except Exception as exc:  # a family that does not come up is a result too
                out["families"][arch] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
    families = out["families"].values()
    out["families_supported"] = sum(bool(f.get("supported")) for f in families)
    out["families_tried"] = len(out["families"])
    out["trainer_weight_copy_ratio_max"] = max((f["trainer_weight_copy_ratio"] for f in families if "trainer_weight_copy_ratio" in f),
                                               default=None)
    return out

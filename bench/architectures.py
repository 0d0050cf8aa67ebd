"""``python -m bench architectures``: every decoder family served and trained in place.

For each family of ``hogwild.tiny_model`` (the bench-sized model; the hybrid families in
bf16, which vLLM's CPU kernels for Gated DeltaNet need), a real ``vllm serve`` with the
plugin, then:
- parity_max_abs_logprob_diff: the largest |log p| gap between the trainer's view model
  and vLLM's engine on two prompts (a sentence, 200 tokens of a story), before and after a
  training job, and parity_positions_beyond_tolerance; for bf16 families beside it
  dtype_noise_max_abs_logprob_diff, the gap between transformers' own model in bf16 and
  in fp32 on the same prompts (what bf16 alone does);
- train_tokens_per_s_ratio: tokens/s of a ``/train`` job (submit to done, over HTTP) /
  the same trainer and optimizer on the same model and samples in a plain process;
- trainer_weight_copy_ratio: private memory the trainer spent binding the served weights /
  their size (a copy would be 1.0; goal < 0.1);
and ``families_supported``: the families whose trainer came up ready, passed the parity
gate, trained, and kept parity after it (fp32: every gap under 1e-4; bf16: the gate's
rule, 0.05 + 0.02 |log p| at 90% of positions or more).
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
            return (await client.request(TokenLogprobsOp(token_ids=prompt), timeout=600, connect_timeout=10.0)).logprobs
        finally:
            client.close()

    return asyncio.run(go())


def _parity(http: httpx.Client, session: Path, prompts: list[list[int]], dtype: str) -> dict:
    """vLLM's log-probabilities against the trainer's on each prompt: the largest gap, and
    whether each prompt passes the parity gate's rule (``worker/parity.py: compare``)."""
    from hogwild.worker.parity import compare

    gap, passed, beyond = 0.0, True, 0
    for prompt in prompts:
        r = http.post("/v1/score", json={"prompt": prompt, "score_ranges": [[p, p + 1] for p in range(1, len(prompt))]})
        r.raise_for_status()
        served = [s["total_logprob"] for s in r.json()["scores"]]
        result = compare(_trainer_logprobs(session, prompt), served, dtype)
        gap, passed, beyond = max(gap, result.max_abs_diff), passed and result.passed, max(beyond, result.beyond)
    return {"gap": gap, "passed": passed, "beyond": beyond}


def _dtype_noise(model_dir: Path, prompts: list[list[int]]) -> float:
    """The largest |log p| gap between transformers' model in bf16 and in fp32, same weights,
    same prompts: how far bf16 alone moves this model's log-probabilities."""
    import torch
    from transformers import AutoModelForCausalLM

    logprobs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        with torch.no_grad():
            logprobs[dtype] = [torch.log_softmax(model(torch.tensor([p])).logits[0, :-1].float(), -1)
                               .gather(1, torch.tensor(p[1:])[:, None])[:, 0] for p in prompts]
    return max(float((a - b).abs().max()) for a, b in zip(*logprobs.values()))


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
        prompts = [tok.encode("The benchmark compares the trainer's forward with vLLM's, in every family of models."),
                   tok.encode(tiny_model.corpus_files()[0].read_text())[:200]]
        before = _parity(http, session, prompts, dtype)
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
        after = _parity(http, session, prompts, dtype)
        out["parity_max_abs_logprob_diff"] = max(before["gap"], after["gap"])
        out["parity_positions_beyond_tolerance"] = max(before["beyond"], after["beyond"])
        if dtype == "float32":
            out["supported"] = out["trained"] and out["parity_max_abs_logprob_diff"] < TOLERANCE[dtype]
        else:  # bf16 moves log-probabilities by itself: the gate's rule, with bf16's own effect beside it
            out["dtype_noise_max_abs_logprob_diff"] = _dtype_noise(path, prompts)
            out["supported"] = out["trained"] and before["passed"] and after["passed"]
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

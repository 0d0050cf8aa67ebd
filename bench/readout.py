"""``python -m bench readout``: what per-token readouts cost inference.

On the ~24M-parameter bench model (fp32), with concept vectors trained from the
project's story corpus at every decoder layer (29 concepts x 8 layers):

- readout_throughput_ratio: generated tokens/s of 16 concurrent greedy
  completions with readout on / off, both in vLLM's default compiled mode
  (the tap is a custom op inside the compiled graph). Goal: >= 0.95.
- readout_throughput_ratio_eager: the same in eager mode (``--enforce-eager``).
- readout_vs_compiled_ratio: readout on (compiled) / the fastest mode without
  readout.

Both servers of a pair run at once and are measured in alternating rounds
(the order flips each round, with a pause between measurements so one server's
spinning threads have stopped before the other is measured), so drift of this
shared machine falls on both alike.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from hogwild.launch import VllmServer
from hogwild.readout.train import train_model_directory

from .common import CACHE, generation_throughput, machine, model_dir

ROUNDS = 20  # one round's ratio varies by +-0.05 on this shared box
PAUSE_S = 2.0


def pair(path: Path, vectors: Path, eager: bool, quick: bool, log) -> tuple[float, float]:
    """(tokens/s with readout, tokens/s without), measured in alternating rounds."""
    mode = "eager" if eager else "compiled"
    with ExitStack() as stack:
        servers = {}
        for readout in (True, False):
            env = {"VLLM_READOUT_VECTORS": str(vectors)} if readout else {}
            server = VllmServer(path, log_path=CACHE / "bench" / f"readout-{mode}-{'on' if readout else 'off'}-vllm.log",
                                dtype="float32", eager=eager, max_model_len=1024, env=env)
            stack.callback(server.stop)
            servers[readout] = server.start(timeout=900)
        tokens = {True: 0.0, False: 0.0}
        for server in servers.values():
            generation_throughput(server.url, str(path), server.headers(), rounds=1)  # warm-up
        for i in range(1 if quick else ROUNDS):
            for readout in (True, False) if i % 2 == 0 else (False, True):
                time.sleep(PAUSE_S)
                server = servers[readout]
                tokens[readout] += generation_throughput(server.url, str(path), server.headers(), rounds=1)
        on, off = (tokens[r] / (1 if quick else ROUNDS) for r in (True, False))
        log(f"{mode}: readout on {on:.0f} tok/s, off {off:.0f} tok/s")
        return on, off


def run(quick: bool = False, log=print) -> dict:
    preset = "tiny" if quick else "bench"
    path = model_dir(preset).resolve()
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log("training readout vectors from stories/ at every layer")
        vectors = train_model_directory(path, Path(__file__).resolve().parents[1] / "stories", Path(tmp))
        from hogwild.readout.vectors import load_vector_set

        vs = load_vector_set(vectors)
        compiled_on, compiled_off = pair(path, vectors, eager=False, quick=quick, log=log)
        eager_on, eager_off = pair(path, vectors, eager=True, quick=quick, log=log)
    fastest_without = max(compiled_off, eager_off)
    return {
        "benchmark": "readout", "machine": machine(), "model": {"preset": preset, "dtype": "float32"},
        "concepts": len(vs.concepts), "layers": len(vs.layers), "streams": 16, "max_tokens": 64,
        "tokens_per_s": {"compiled_readout": compiled_on, "compiled": compiled_off, "eager_readout": eager_on,
                         "eager": eager_off},
        "readout_throughput_ratio": compiled_on / compiled_off,
        "readout_throughput_ratio_eager": eager_on / eager_off,
        "readout_vs_compiled_ratio": compiled_on / fastest_without,
    }

"""Benchmarks: ``python -m bench NAME [--json]`` from the repository root.

Each benchmark measures its goals as ratios against a baseline taken in the
same run, prints one JSON object with ``--json``, and leaves a log in
``.cache/bench/``. Results worth keeping go to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = {"spine": "bench.spine", "load": "bench.load", "checkpoint": "bench.checkpoint", "btrm": "bench.btrm", "readout": "bench.readout",
              "bf16": "bench.bf16", "architectures": "bench.architectures", "preference": "bench.preference",
              "tensor_parallel": "bench.tensor_parallel", "rl": "bench.rl",
              "data_parallel": "bench.data_parallel", "adapters": "bench.adapters"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--json", action="store_true", help="print only the result object, as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller model and shorter runs (smoke test)")
    args = parser.parse_args(argv)
    result = importlib.import_module(BENCHMARKS[args.name]).run(quick=args.quick, log=(lambda *a: None) if args.json else print)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

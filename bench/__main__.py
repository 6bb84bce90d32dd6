"""`make bench`: run the project's benchmarks and write their results under bench/results/.

Each benchmark module (bench/kernels.py, bench/policy.py, bench/engines.py, bench/trainer.py) prints its own table and exposes
`run(quick: bool) -> dict`: figures measured against a baseline in the same run, reported as
ratios. This runner calls the ones asked for, prints each result, and writes one JSON file per
module (bench/results/<name>.json) with the machine it ran on.

    python -m bench                      # all of them
    python -m bench --only kernels       # one
    python -m bench --quick              # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

MODULES = ("kernels", "policy", "engines", "trainer", "ingest")
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(MODULES), help=f"comma-separated subset of {MODULES}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {MODULES}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
            result = module.run(quick=args.quick)
        except Exception as exc:  # report and go on with the others; exit non-zero at the end
            print(f"bench {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        record = {
            "benchmark": name,
            "quick": args.quick,
            "seconds": round(time.perf_counter() - start, 1),
            "machine": machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "results": result,
        }
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path} ({record['seconds']} s)")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

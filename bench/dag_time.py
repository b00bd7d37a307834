"""Time `snakemake -n` (DAG build) on a large grid of hub models (nothing is downloaded).

python bench/dag_time.py --models 4 --methods 8 --lengths 12 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def grid_config(n_models: int, n_methods: int, n_lengths: int) -> dict:
    kinds = ["pi", "ntk", "yarn", "dynamic-ntk", "llama3"]
    methods = {"rope": {}}
    i = 0
    while len(methods) < n_methods:
        kind = kinds[i % len(kinds)]
        methods[f"{kind}-{2 ** (1 + i // len(kinds))}"] = {
            "method": kind,
            "factor": 2 ** (1 + i // len(kinds)),
        }
        i += 1
    return {
        "models": {
            f"m{i}": {"hub": f"org/model-{i}", "pretrained_length": 4096} for i in range(n_models)
        },
        "methods": methods,
        "lengths": [2 ** (10 + k) for k in range(n_lengths)],
        "corpora": {"c": {"builtin": "stdlib"}},
        "ppl": {"corpus": "c"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--methods", type=int, default=8)
    p.add_argument("--lengths", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "grid.yaml"
        cfg.write_text(yaml.safe_dump(grid_config(args.models, args.methods, args.lengths)))
        cmd = [snakemake, "-s", str(REPO / "Snakefile"), "-d", tmp, "--configfile", str(cfg), "-n"]
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode:
                sys.exit(proc.stderr[-2000:])
        jobs = [ln for ln in proc.stdout.splitlines() if ln.startswith("total")]
    print(f"| grid | jobs | dry-run seconds (median of {args.repeats}) | min | max |")
    print("|---|---|---|---|---|")
    grid = f"{args.models} models × {args.methods} methods × {args.lengths} lengths"
    total = jobs[-1].split()[-1] if jobs else "?"
    med = statistics.median(times)
    print(f"| {grid} | {total} | {med:.2f} | {min(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()

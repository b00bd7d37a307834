"""Dry-run time of the paper grid (configs/paper.yaml): `snakemake -n`, nothing is downloaded.

python bench/paper_dryrun.py --repeats 5

Times the whole command (interpreter start, Snakefile parse, config checks, DAG of every cell,
printing the plan), plain and through profiles/slurm (which adds resources and group jobs).
Goal: <= 5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def time_dryrun(extra: list[str], repeats: int) -> tuple[list[float], str]:
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    times, total = [], "?"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [snakemake, "-s", str(REPO / "Snakefile"), "-d", tmp]
        cmd += ["--configfile", str(REPO / "configs/paper.yaml"), "-n", *extra]
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - t0)
            if proc.returncode:
                sys.exit(proc.stderr[-2000:])
            totals = [ln for ln in proc.stdout.splitlines() if ln.startswith("total")]
            total = totals[-1].split()[-1] if totals else "?"
    return times, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"| command | jobs | seconds (median of {args.repeats}) | min | max |")
    print("|---|---|---|---|---|")
    jobs = "?"
    for label, extra in [
        ("`snakemake -n --configfile configs/paper.yaml`", []),
        ("… `--profile profiles/slurm`", ["--profile", str(REPO / "profiles/slurm")]),
        ("… `--quiet`", ["--quiet"]),
    ]:
        times, total = time_dryrun(extra, args.repeats)
        if total == "?":  # --quiet prints no job table
            total = jobs
        jobs = total
        med = statistics.median(times)
        print(f"| {label} | {total} | {med:.2f} | {min(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()

"""Dry-run time of the paper grid (configs/paper.yaml) from a fresh clone: `snakemake -n`.

python bench/paper_dryrun.py --repeats 5              # this checkout's HEAD
python bench/paper_dryrun.py --repeats 5 --rev cfb59a4  # any commit, e.g. before a change

Each run is timed in a clone of its own, made before the timer starts (`git clone` of this
repository at ``--rev``; uncommitted changes are not in it): the command a new user types in the
clone (interpreter start, Snakefile parse with its config checks, the DAG of every cell, printing
the plan; ropelens' bytecode compiled on the first import), plain and through profiles/slurm
(resources and group jobs), and `--quiet`. Nothing is downloaded. Goal: <= 3 s.
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
COMMAND = ["-n", "--configfile", "configs/paper.yaml"]
ROWS = [
    ("`snakemake -n --configfile configs/paper.yaml`", []),
    ("… `--profile profiles/slurm`", ["--profile", "profiles/slurm"]),
    ("… `--quiet`", ["--quiet"]),
]


def clone(rev: str, dest: Path) -> str:
    """A fresh clone of this repository at ``rev`` in ``dest``; returns the commit."""
    git = ["git", "-c", "advice.detachedHead=false"]
    subprocess.run([*git, "clone", "-q", "--no-checkout", str(REPO), str(dest)], check=True)
    subprocess.run([*git, "-C", str(dest), "checkout", "-q", "--detach", rev], check=True)
    head = ["git", "-C", str(dest), "rev-parse", "--short", "HEAD"]
    return subprocess.run(head, check=True, capture_output=True, text=True).stdout.strip()


def time_dryrun(rev: str, extra: list[str], repeats: int) -> tuple[list[float], str, str]:
    """Seconds of each run (each in a new clone), the job total and the commit."""
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    times, total, commit = [], "?", "?"
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            commit = clone(rev, Path(tmp) / "ropelens")
            t0 = time.perf_counter()
            cmd, cwd = [snakemake, *COMMAND, *extra], Path(tmp) / "ropelens"
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - t0)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        totals = [ln for ln in proc.stdout.splitlines() if ln.startswith("total")]
        total = totals[-1].split()[-1] if totals else "?"
    return times, total, commit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rev", default="HEAD", help="commit to clone (default: HEAD)")
    args = p.parse_args()
    print(f"| command | jobs | seconds (median of {args.repeats}) | min | max |")
    print("|---|---|---|---|---|")
    jobs, commit = "?", "?"
    for label, extra in ROWS:
        times, total, commit = time_dryrun(args.rev, extra, args.repeats)
        jobs = jobs if total == "?" else total  # --quiet prints no job table
        med = statistics.median(times)
        print(f"| {label} | {jobs} | {med:.2f} | {min(times):.2f} | {max(times):.2f} |")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ncommit {commit}, {os.cpu_count()} CPUs, load average after: {load}")


if __name__ == "__main__":
    main()

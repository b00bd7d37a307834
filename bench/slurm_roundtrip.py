"""Slurm round trip per job: raw sbatch, and Snakemake's slurm executor (one, chain, bundle).

bash scripts/slurm-local.sh start && eval "$(bash scripts/slurm-local.sh env)"
python bench/slurm_roundtrip.py --repeats 5 --chain 4
python bench/slurm_roundtrip.py --repeats 5 --ropelens PATH   # a ropelens checkout's job start-up

Needs a running Slurm (scripts/slurm-local.sh gives a one-node one on loopback). Measures:

* sbatch -> COMPLETED: `sbatch --wrap true`, polling squeue every 50 ms (scheduler + launch).
* one job through Snakemake: wall of `snakemake --executor slurm` on a one-rule workflow minus
  the same workflow run locally (`--cores 1`): submission, the job re-running Snakemake inside
  (batch step + srun step) and status polling (`--slurm-init-seconds-before-status-checks 1`,
  squeue).
* a chain of N dependent jobs, per job; and N independent jobs bundled by --group-components
  into one Slurm job, per job.
* ``--ropelens PATH`` instead: the per-job start-up of the ropelens workflow in the checkout PATH
  (issue 27). Inside each Slurm job the plugin runs Snakemake twice (batch step, srun step), and
  each reads the Snakefile and checks the config. One job of configs/paper.yaml's plan (its
  checks, with a tiny model added: rule tiny_model, a few seconds) via slurm, minus local; and
  the job's time in Slurm, from first seen RUNNING to first seen ended (squeue every 50 ms).
  Compare checkouts (git worktrees) before and after a change on the same quiet machine.
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

# the paper grid plus a model the workflow builds itself in seconds (rule tiny_model)
PROBE = "models:\n  probe: {tiny: {hidden_size: 16, layers: 1}, pretrained_length: 4096}\n"

SNAKEFILE = """
N = {n}
rule all:
    input: [f"chain/{{i}}.txt" for i in range(N)], [f"bundle/{{i}}.txt" for i in range(N)]

rule chain:
    input: lambda wc: [f"chain/{{int(wc.i) - 1}}.txt"] if int(wc.i) > 0 else []
    output: "chain/{{i}}.txt"
    resources: mem_mb=500, runtime=5
    shell: "echo {{wildcards.i}} > {{output}}"

rule one:
    output: "one.txt"
    resources: mem_mb=500, runtime=5
    shell: "touch {{output}}"

resource_scopes:
    slot="local"

rule bundled:
    output: "bundle/{{i}}.txt"
    group: "bundle"
    resources: mem_mb=500, runtime=5, slot=1
    shell: "echo {{wildcards.i}} > {{output}}"
"""
SLURM = [
    "--executor",
    "slurm",
    "--jobs",
    "10",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--slurm-no-account",
    "--latency-wait",
    "5",
]


def sbatch_roundtrip() -> float:
    t0 = time.perf_counter()
    jobid = subprocess.run(
        ["sbatch", "--parsable", "--mem", "100", "--output", "/dev/null", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    while True:
        state = subprocess.run(
            ["squeue", "-h", "-j", jobid, "--states=all", "-o", "%T"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            return time.perf_counter() - t0
        time.sleep(0.05)


def snakemake(workdir: Path, *args) -> float:
    exe = str(Path(sys.executable).with_name("snakemake"))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [exe, "-d", str(workdir), "-s", str(workdir / "Snakefile"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return time.perf_counter() - t0


def squeue() -> dict[str, str]:
    """job id -> state of this user's jobs (finished ones too, while Slurm keeps them)."""
    cmd = ["squeue", "-h", "-u", str(os.getuid()), "--states=all", "-o", "%i %T"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def watched(cmd: list[str], env: dict) -> tuple[float, list[float]]:
    """Wall seconds of ``cmd``, and each new Slurm job's seconds from RUNNING to ended."""
    old, spans = set(squeue()), {}
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            now = time.perf_counter()
            for job, state in squeue().items():
                span = [0, 0] if job in old else spans.setdefault(job, [None, None])
                if state == "RUNNING" and span[0] is None:
                    span[0] = now
                elif state not in ("PENDING", "CONFIGURING", "RUNNING") and span[1] is None:
                    span[1] = now
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        if proc.returncode:
            log.seek(0)
            sys.exit(log.read().decode(errors="replace")[-3000:])
    return wall, [end - start for start, end in spans.values() if start and end]


def ropelens_job(checkout: Path, work: Path, *args) -> tuple[float, list[float]]:
    """Build the probe model of the paper grid once with ``checkout``'s Snakefile in ``work``."""
    work.mkdir()
    (work / "probe.yaml").write_text(PROBE)
    exe = str(Path(sys.executable).with_name("snakemake"))
    cmd = [exe, "resources/models/probe", "-s", str(checkout / "Snakefile"), "-d", str(work)]
    cmd += ["--configfile", str(checkout / "configs/paper.yaml"), str(work / "probe.yaml")]
    return watched([*cmd, *args], {**os.environ, "HF_HUB_OFFLINE": "1"})


def ropelens_rows(checkout: Path, repeats: int) -> None:
    med, minus, inside = statistics.median, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            local, _ = ropelens_job(checkout, Path(tmp) / f"l{i}", "--cores", "1")
            remote, spans = ropelens_job(checkout, Path(tmp) / f"s{i}", *SLURM)
            minus.append(remote - local)
            inside += spans
    what = "ropelens job (paper plan, rule tiny_model) via slurm, minus local"
    row(f"{what} (median of {repeats})", med(minus))
    row(f"that job in Slurm, RUNNING to ended (median of {len(inside)})", med(inside))


def fresh(tmp: Path, n: int, name: str) -> Path:
    work = tmp / name
    work.mkdir()
    (work / "Snakefile").write_text(SNAKEFILE.format(n=n))
    return work


def row(what: str, seconds: float) -> None:
    print(f"| {what} | {seconds:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chain", type=int, default=4, help="jobs in the chain and in the bundle")
    p.add_argument("--ropelens", type=Path, help="measure this ropelens checkout's job start-up")
    args = p.parse_args()
    n, med = args.chain, statistics.median
    print("| what | seconds per job |")
    print("|---|---|", flush=True)
    if args.ropelens:
        ropelens_rows(args.ropelens.resolve(), args.repeats)
        return
    raw = [sbatch_roundtrip() for _ in range(args.repeats)]
    row(f"`sbatch --wrap true` → COMPLETED (median of {args.repeats})", med(raw))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = []
        for i in range(args.repeats):
            local = snakemake(fresh(tmp, n, f"l{i}"), "--cores", "1", "one.txt")
            remote = snakemake(fresh(tmp, n, f"s{i}"), *SLURM, "one.txt")
            one.append(remote - local)
        row(f"one job via `--executor slurm`, minus local (median of {args.repeats})", med(one))
        targets = [f"chain/{i}.txt" for i in range(n)]
        local = snakemake(fresh(tmp, n, "cl"), "--cores", "1", *targets)
        remote = snakemake(fresh(tmp, n, "cs"), *SLURM, *targets)
        row(f"chain of {n} dependent jobs via slurm, minus local, per job", (remote - local) / n)
        targets = [f"bundle/{i}.txt" for i in range(n)]
        local = snakemake(fresh(tmp, n, "bl"), "--cores", "1", *targets)
        # targets first (--group-components takes several values); slot is local to a group
        # job: one at a time inside the bundle, as ropelens runs bundled cells
        bundle = [*targets, *SLURM, "--resources", "slot=1", "--group-components", f"bundle={n}"]
        remote = snakemake(fresh(tmp, n, "bs"), *bundle)
        row(
            f"{n} independent jobs bundled into 1 Slurm job, minus local, per job",
            (remote - local) / n,
        )


if __name__ == "__main__":
    main()

"""The micro workflow on a real Slurm (one node on loopback, scripts/slurm-local.sh).

Runs through profiles/slurm with `--executor slurm`: its Parquet cells must equal a local run's,
short cells are bundled into group jobs and each job's warm runner loads a (model, method) once
for all its cells, a cell killed for memory is retried with more memory and,
if it still fails, leaves no partial file; a partition the cluster does not have is one line.

Skipped with the reason when Slurm is not installed or cannot be started; CI sets
ROPELENS_REQUIRE_SLURM=1 so a missing Slurm fails instead. Every Slurm run has a hard timeout and
is killed as a process group (the executor plugin has ignored SIGTERM before).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_incremental import MICRO, cells, mtimes, write_config

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/slurm-local.sh"
# status is polled by squeue (no accounting here), early and often
FAST = [
    "--profile",
    str(REPO / "profiles/slurm"),
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--slurm-no-account",
    "--latency-wait",
    "5",
]
HARD_TIMEOUT = 480


def _script(*args, timeout=120):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def slurm():
    """A running one-node Slurm; started here (and stopped after) when it is not running."""
    required = os.environ.get("ROPELENS_REQUIRE_SLURM") == "1"
    fail = pytest.fail if required else pytest.skip
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        fail("Slurm is not installed; `bash scripts/slurm-local.sh start` installs and starts it")
    started = False
    if _script("status").returncode != 0:
        proc = _script("start")
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            fail(f"Slurm could not be started: {lines[-1]}")
        started = True
    conf = _script("env").stdout.strip().split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if started:
        _script("stop")


def run_bounded(workdir: Path, *args, timeout: int = HARD_TIMEOUT) -> subprocess.CompletedProcess:
    """snakemake in its own process group; on timeout the group is killed and its jobs cancelled."""
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True, timeout=30)
        pytest.fail(f"snakemake on Slurm ran past {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def submissions(proc) -> list[str]:
    """What was submitted: rule names for single jobs, 'group' for bundles of cells."""
    text = proc.stdout + proc.stderr
    found = re.findall(r"has been submitted .*?slurm_logs/(rule|group)_([A-Za-z0-9_]+)/", text)
    return ["group" if kind == "group" else name for kind, name in found]


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm")
    args = write_config(workdir, MICRO)
    proc = run_bounded(
        workdir, *args, *FAST, "--jobs", "4", "--group-components", "cells=4", "--retries", "0"
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return workdir, args, proc


def test_micro_on_slurm_equals_local(slurm_run, snakemake, tmp_path):
    workdir, args, proc = slurm_run
    # bundling: the 6 short ppl/attention cells went out as 2 group jobs of <= 4, not 6 jobs
    sub = submissions(proc)
    assert sub.count("group") == 2, sub
    assert "ppl" not in sub and "attention" not in sub
    assert {"tiny_model", "tokenize"} <= set(sub)
    # the warm runner: each Slurm job's Snakemake has its own, which loads a (model, method) once
    # however many of the bundle's cells use it
    loads, served = runner_counts(workdir)
    assert sum(sum(c.values()) for c in served.values()) == 8  # every cell ran warm
    for log in served:
        assert loads[log] == Counter(set(served[log])), (log, loads[log], served[log])
    assert max(n for c in served.values() for n in c.values()) >= 2, served  # reused in a bundle
    # the same cells, computed locally from the same model and tokens
    local = tmp_path / "local"
    (local / "results").mkdir(parents=True)
    shutil.copytree(workdir / "resources", local / "resources")
    shutil.copytree(workdir / "results/data", local / "results/data")
    largs = write_config(local, MICRO)
    on_slurm = cells(workdir)
    assert len(on_slurm) == 8
    profile = ["--profile", str(REPO / "profiles/local"), "--rerun-triggers", "mtime"]
    snakemake(local, *on_slurm, *largs, *profile)  # the cells only (aggregates are functions)
    assert cells(local) == on_slurm
    for path in on_slurm:
        a, b = pq.read_table(workdir / path), pq.read_table(local / path)
        assert a.equals(b), path
    assert not list(workdir.rglob("*.tmp"))


def test_memory_kill_is_retried_with_more_then_leaves_no_partial_file(slurm_run, tmp_path):
    """Two cells at too little memory: one fits on the retry (x8), the other never does."""
    workdir, _, _ = slurm_run
    fits = "results/ppl/model=micro/method=rope/length=64.parquet"
    never = "results/ppl/model=micro/method=rope/length=128.parquet"
    others = [c for c in cells(workdir) if c not in (fits, never)]
    kept = mtimes(workdir, others)
    (workdir / fits).unlink()
    (workdir / never).unlink()
    cfg = yaml_copy(MICRO)
    cfg["resources"] = {
        "cells": [{"max_length": 64, "mem_mb": 200, "runtime": 5}, {"mem_mb": 20, "runtime": 5}],
        "memory_growth": 8,
        "bundle_max_length": 0,
    }
    args = write_config(tmp_path, cfg, "lowmem.yaml")
    proc = run_bounded(workdir, *args, *FAST, "--retries", "1", "--verbose", fits, never)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    mems = re.findall(r"--comment rule_ppl_wildcards_micro_rope_(\d+) .*? --mem (\d+)", text)
    assert sorted(set(mems)) == [("128", "160"), ("128", "20"), ("64", "1600"), ("64", "200")]
    assert pq.read_table(workdir / fits).num_rows == 2  # killed at 200 MB, done at 1600 MB
    assert not (workdir / never).exists()  # killed twice: no file
    assert not list((workdir / "results").rglob("*.tmp"))  # and no partial one
    assert mtimes(workdir, others) == kept  # resources changed, nothing else recomputed


def test_partition_the_cluster_lacks_is_one_line(slurm, tmp_path):
    cfg = yaml_copy(MICRO)
    cfg["resources"] = {"cells": [{"mem_mb": 500, "runtime": 5, "partition": "nosuch"}]}
    args = write_config(tmp_path, cfg)
    proc = run_bounded(tmp_path, *args, *FAST, timeout=120)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if "ropelens:" in ln]
    assert ours == [
        "ropelens: resource error: resources.cells[0]: partition 'nosuch' does not exist on "
        "this cluster; sinfo lists: debug"
    ], proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ours[0]
    assert "Traceback" not in proc.stderr and "submitted" not in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def runner_counts(workdir: Path):
    """Per runner log (one per Snakemake process): model loads and cells, by (model, method)."""
    loads, served = {}, {}
    for log in sorted((workdir / "logs/runner").glob("*.log")):
        events = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
        pairs = {k: [(e["model"], e["method"]) for e in events if e["event"] == k] for k in KINDS}
        loads[log.name], served[log.name] = Counter(pairs["load"]), Counter(pairs["cell"])
    return loads, served


KINDS = ("load", "cell")


def yaml_copy(obj):
    import yaml

    return yaml.safe_load(yaml.safe_dump(obj))

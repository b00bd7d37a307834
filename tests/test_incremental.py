"""Incremental guarantees: a grid extended over weeks recomputes only what changed.

One micro run (through profiles/local), then: an unchanged rerun runs nothing; deleted cells rerun
alone (plus the aggregates that read them); a new length runs only its cells; changed method
parameters rerun that method only; changed cluster resources rerun nothing; a run killed mid-way
resumes with no corrupt Parquet and without recomputing finished cells.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ropelens import schemas

from .conftest import job_counts

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
LOCAL = ["--profile", str(REPO / "profiles/local")]

# A micro grid: one tiny model, two methods, two lengths, one needle depth.
MICRO = {
    "models": {
        "micro": {
            "tiny": {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1},
            "pretrained_length": 64,
        }
    },
    "methods": {"rope": {}, "pi": {"factor": 2}},
    "lengths": [64, 128],
    "depths": [0],
    "corpora": {"code": {"builtin": "stdlib", "max_documents": 12}},
    "ppl": {"corpus": "code", "max_documents": 2, "position_bins": 4},
    "attention": {"lengths": [64]},
    "needle": {"lengths": [128]},
}
CELL_DIRS = ("ppl", "attention", "needle")
MODEL_RULES = {"tiny_model"}  # rules that build models (never rerun here)
AGGREGATE_OF = {"ppl": "ppl_table", "attention": "attention_report", "needle": "needle_report"}
SCHEMAS = {"ppl": "PPL", "attention": "ATTENTION", "needle": "NEEDLE"}


def planned_cells(proc) -> set[str]:
    """Cell files a (dry-)run lists as outputs of its jobs."""
    text = proc.stdout + proc.stderr
    found = re.findall(r"^\s*output: (results/(?:ppl|attention|needle)/\S+?\.parquet)", text, re.M)
    return set(found)


def planned_computed(proc) -> set[str]:
    """Everything a (dry-)run would compute that is not an aggregate: cells, data, models."""
    text = proc.stdout + proc.stderr
    outputs = re.findall(r"^\s*output: (.+)$", text, re.M)
    found = {f for line in outputs for f in line.split(", ")}
    return {f for f in found if re.match(r"(results/(ppl|attention|needle|data)/|resources/)", f)}


def aggregates(proc) -> set[str]:
    """Rules of a (dry-)run that only read cells or tables (tables, charts, reports)."""
    return set(job_counts(proc)) - {"all", "corpus", "tokenize", *CELL_DIRS} - MODEL_RULES


def write_config(workdir: Path, cfg: dict, name: str = "micro.yaml") -> list[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text(yaml.safe_dump(cfg))
    return ["--configfile", str(workdir / name)]


def cells(workdir: Path) -> list[str]:
    return sorted(
        p.relative_to(workdir).as_posix()
        for d in CELL_DIRS
        for p in (workdir / "results" / d).rglob("*.parquet")
    )


def mtimes(workdir: Path, paths) -> dict:
    return {p: (workdir / p).stat().st_mtime_ns for p in paths}


def readable(workdir: Path, path: str) -> bool:
    kind = path.split("/")[1]
    t = pq.read_table(workdir / path)
    return t.schema.names == getattr(schemas, SCHEMAS[kind]).names and t.num_rows > 0


def changed(cfg: dict, **sections) -> dict:
    out = yaml.safe_load(yaml.safe_dump(cfg))
    out.update(sections)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, snakemake):
    workdir = tmp_path_factory.mktemp("incremental")
    args = write_config(workdir, MICRO)
    snakemake(workdir, *args, *LOCAL)
    assert len(cells(workdir)) == 4 + 2 + 2
    return workdir, args


def test_cells_record_their_library_versions(base):
    """Every cell carries the versions it was computed with (the report checks them)."""
    import json
    from importlib import metadata

    workdir, _ = base
    for path in cells(workdir):
        meta = pq.read_schema(workdir / path).metadata
        packages = json.loads(meta[b"ropelens.packages"])
        assert packages["transformers"] == metadata.version("transformers"), path
        assert packages["torch"] == metadata.version("torch"), path


def test_unchanged_rerun_runs_nothing(base, snakemake):
    workdir, args = base
    assert job_counts(snakemake(workdir, *args, "-n")) == {}
    before = mtimes(workdir, cells(workdir))
    proc = snakemake(workdir, *args, *LOCAL)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert mtimes(workdir, cells(workdir)) == before


def test_deleted_cells_rerun_alone_with_their_aggregates(base, snakemake, tmp_path):
    workdir, args = base
    gone = [
        "results/ppl/model=micro/method=rope/length=128.parquet",
        "results/attention/model=micro/method=pi/length=64.parquet",
        "results/needle/model=micro/method=rope/length=128/depth=0.parquet",
    ]
    for i, path in enumerate(gone):  # move away (keeps mtimes), restore at the end
        os.replace(workdir / path, tmp_path / str(i))
    try:
        proc = snakemake(workdir, *args, "-n")
        assert planned_computed(proc) == set(gone)  # exactly the k cells, nothing upstream
        counts = job_counts(proc)
        assert {k: counts.get(k) for k in CELL_DIRS} == {"ppl": 1, "attention": 1, "needle": 1}
        assert set(AGGREGATE_OF.values()) <= aggregates(proc)
        # one kind only: only the aggregates that read it (and what reads those) rerun
        for i, path in enumerate(gone[1:], start=1):
            os.replace(tmp_path / str(i), workdir / path)
        proc = snakemake(workdir, *args, "-n")
        assert planned_computed(proc) == {gone[0]}
        assert "ppl_table" in aggregates(proc)
        assert not aggregates(proc) & {"attention_report", "needle_report"}
    finally:
        for i, path in enumerate(gone):
            if (tmp_path / str(i)).exists():
                os.replace(tmp_path / str(i), workdir / path)
    assert job_counts(snakemake(workdir, *args, "-n")) == {}


def test_new_length_runs_only_its_cells(base, snakemake):
    workdir, _ = base
    cfg = changed(
        MICRO,
        lengths=[64, 128, 256],
        attention={"lengths": [64, 256]},
        needle={"lengths": [128, 256]},
    )
    proc = snakemake(workdir, *write_config(workdir, cfg, "longer.yaml"), "-n")
    planned = planned_computed(proc)
    assert all("length=256" in p for p in planned), sorted(planned)
    counts = job_counts(proc)
    assert {k: counts.get(k) for k in CELL_DIRS} == {"ppl": 2, "attention": 2, "needle": 2}
    assert set(AGGREGATE_OF.values()) <= aggregates(proc)


def test_new_length_after_removing_data_runs_only_its_cells(base, snakemake, tmp_path):
    """Corpora and token files are regenerated from the config: removing results/data/ (to save
    disk) and then adding a length recomputes the data and the new cells, no finished cell, and
    the regenerated (newer) token files do not make finished cells stale afterwards either."""
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(base[0], workdir, symlinks=True)  # copy2: mtimes and .snakemake metadata kept
    shutil.rmtree(workdir / "results/data")
    finished = cells(workdir)
    kept = mtimes(workdir, finished)
    cfg = changed(MICRO, lengths=[64, 128, 256], needle={"lengths": [128, 256]})
    args = write_config(workdir, cfg, "longer.yaml")
    plan = snakemake(workdir, *args, "-n")
    assert {p for p in planned_computed(plan) if "/data/" not in p} == {
        "results/ppl/model=micro/method=rope/length=256.parquet",
        "results/ppl/model=micro/method=pi/length=256.parquet",
        "results/needle/model=micro/method=rope/length=256/depth=0.parquet",
        "results/needle/model=micro/method=pi/length=256/depth=0.parquet",
    }
    snakemake(workdir, *args, *LOCAL)
    assert mtimes(workdir, finished) == kept
    assert job_counts(snakemake(workdir, *args, "-n")) == {}


def test_changed_method_params_rerun_that_method_only(base, snakemake):
    workdir, _ = base
    methods = {"rope": {}, "pi": {"factor": 3}}
    args = write_config(workdir, changed(MICRO, methods=methods), "pi3.yaml")
    proc = snakemake(workdir, *args, "-n")
    pi_cells = {c for c in cells(workdir) if "method=pi/" in c}
    assert len(pi_cells) == 4 and planned_computed(proc) == pi_cells
    counts = job_counts(proc)
    assert {k: counts.get(k) for k in CELL_DIRS} == {"ppl": 2, "attention": 1, "needle": 1}
    assert set(AGGREGATE_OF.values()) <= aggregates(proc)


def test_changed_needle_placement_reruns_the_needle_cells_only(base, snakemake):
    workdir, _ = base
    needle = dict(MICRO["needle"], placement="boundary")
    proc = snakemake(
        workdir, *write_config(workdir, changed(MICRO, needle=needle), "nb.yaml"), "-n"
    )
    needle_cells = {c for c in cells(workdir) if c.startswith("results/needle/")}
    assert len(needle_cells) == 2 and planned_computed(proc) == needle_cells
    assert aggregates(proc) & set(AGGREGATE_OF.values()) == {"needle_report"}


def test_changed_js_reference_reruns_the_attention_aggregate_only(base, snakemake):
    workdir, _ = base
    attention = dict(MICRO.get("attention", {}), reference={"length": "same"})
    args = write_config(workdir, changed(MICRO, attention=attention), "ref.yaml")
    proc = snakemake(workdir, *args, "-n")
    assert planned_computed(proc) == set()
    assert aggregates(proc) & set(AGGREGATE_OF.values()) == {"attention_report"}


def test_changed_cluster_resources_rerun_nothing(base, snakemake):
    workdir, _ = base
    res = {
        "cells": [{"max_length": 64, "mem_mb": 123, "runtime": 7}, {"mem_mb": 999, "runtime": 9}],
        "memory_growth": 3,
        "bundle_max_length": 0,
    }
    cfg = changed(MICRO, resources=res)
    proc = snakemake(workdir, *write_config(workdir, cfg, "res.yaml"), "-n")
    assert planned_computed(proc) == set()  # no cell, no data, no model
    assert not aggregates(proc) & set(AGGREGATE_OF.values())


def _wait_for_line(proc, pattern: str, timeout: float) -> str | None:
    """First output line of ``proc`` matching ``pattern`` (None if it ends or times out)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        for line in lines[seen:]:
            if re.search(pattern, line):
                return line
        seen = len(lines)
        if proc.poll() is not None and not reader.is_alive():
            return None
        time.sleep(0.1)
    return None


def test_killed_run_resumes_without_recomputing_finished_cells(base, snakemake):
    """SIGKILL the whole run (a crashed login node) once Snakemake has finished one of 4 cells."""
    workdir, args = base
    gone = [c for c in cells(workdir) if c.startswith("results/ppl/")]
    assert len(gone) == 4
    for path in gone:
        (workdir / path).unlink()
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.Popen(
        [*cmd, *LOCAL, "--cores", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        # killed right after a finished cell: the next cell's process is still starting
        assert _wait_for_line(proc, r"Finished jobid: \d+ \(Rule: ppl\)", timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # nothing half-written: no temporary files, every cell on disk is a complete Parquet file
    assert not list((workdir / "results").rglob("*.tmp"))
    for path in cells(workdir):
        assert readable(workdir, path), path
    finished = [p for p in gone if (workdir / p).exists()]
    missing = [p for p in gone if p not in finished]
    assert finished and missing, "the kill should land between cells"
    kept = mtimes(workdir, finished)

    snakemake(workdir, "--unlock", *args)  # a killed run leaves its lock behind
    plan = snakemake(workdir, *args, *LOCAL, "-n")
    assert planned_cells(plan) == set(missing)
    proc = snakemake(workdir, *args, *LOCAL)
    assert planned_computed(proc) == set(missing)
    assert job_counts(proc)["ppl"] == len(missing)
    assert "ppl_table" in aggregates(proc)
    assert not aggregates(proc) & {"attention_report", "needle_report"}
    assert mtimes(workdir, finished) == kept  # finished cells were not recomputed
    for path in gone:
        assert readable(workdir, path), path
    assert job_counts(snakemake(workdir, *args, "-n")) == {}

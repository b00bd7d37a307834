"""Profiles (profiles/local, profiles/slurm), cluster resources by length, and configs/paper.yaml.

No Slurm needed: dry runs and the pure functions behind rules/resources.smk (ropelens.resources).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from ropelens import config as rlconfig
from ropelens import resources as rlresources
from ropelens.errors import ConfigError
from tests.conftest import job_counts
from tests.test_incremental import MICRO, write_config

REPO = Path(__file__).resolve().parents[1]
PROFILES = {name: REPO / "profiles" / name for name in ("local", "slurm")}
PAPER = REPO / "configs/paper.yaml"


def jobs(proc) -> list[dict]:
    """Jobs of a dry run: rule, wildcards, resources, and whether it sits in a group job."""
    found, job = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(\s*)(?:local)?rule (\w+):$", line)
        if m:
            job = {"rule": m.group(2), "grouped": bool(m.group(1)), "wc": {}, "res": {}}
            found.append(job)
        elif job and line.strip().startswith("wildcards: "):
            job["wc"] = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split(", "))
        elif job and line.strip().startswith("resources: "):
            job["res"] = dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split(", "))
    return found


def prepared(cfg: dict) -> dict:
    return rlconfig.prepare(yaml.safe_load(yaml.safe_dump(cfg)), REPO)


# --- profiles -------------------------------------------------------------------------------------


def test_profiles_parse_and_say_what_a_cluster_run_needs():
    local = yaml.safe_load((PROFILES["local"] / "config.yaml").read_text())
    slurm = yaml.safe_load((PROFILES["slurm"] / "config.yaml").read_text())
    assert local["cores"] == "all" and local["rerun-incomplete"] is True
    assert slurm["executor"] == "slurm" and slurm["retries"] >= 1
    assert slurm["rerun-incomplete"] is True and slurm["keep-going"] is True
    groups = dict(g.split("=") for g in slurm["group-components"])
    assert int(groups[rlresources.BUNDLE_GROUP]) > 1
    for key in ("mem_mb", "runtime"):
        assert slurm["default-resources"][key] > 0


@pytest.mark.workflow
@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profiles_plan_the_micro_grid(tmp_path, snakemake, profile):
    args = write_config(tmp_path, MICRO)
    proc = snakemake(tmp_path, *args, "--profile", str(PROFILES[profile]), "-n")
    counts = job_counts(proc)
    assert {k: counts[k] for k in ("ppl", "attention", "needle")} == {
        "ppl": 4,
        "attention": 2,
        "needle": 2,
    }
    cells = [j for j in jobs(proc) if j["rule"] in ("ppl", "attention")]
    assert len(cells) == 6 and all(j["grouped"] for j in cells)  # all short: bundled


# --- resources grow with the cell's length and with each retry -----------------------------------


@pytest.mark.parametrize("source", ["default", "paper"])
def test_resources_grow_with_length_and_attempt(source):
    cfg = prepared(yaml.safe_load(PAPER.read_text()) if source == "paper" else MICRO)
    lengths = [2**k for k in range(6, 18)]  # 64 ... 128K
    for rule in ("ppl", "attention", "needle"):
        res = [rlresources.cell_resources(cfg, rule, n) for n in lengths]
        mem = [r["mem_mb"] for r in res]
        runtime = [r["runtime"] for r in res]
        assert mem == sorted(mem) and mem[-1] > mem[0], (rule, mem)
        assert runtime == sorted(runtime) and runtime[-1] > runtime[0], (rule, runtime)
        first, retry = (rlresources.cell_resources(cfg, rule, 4096, a) for a in (1, 2))
        growth = cfg["resources"]["memory_growth"]
        assert retry["mem_mb"] >= first["mem_mb"] * growth > first["mem_mb"]
        assert retry["runtime"] > first["runtime"]
    if source == "paper":
        assert all(rlresources.cell_resources(cfg, "ppl", n)["gpu"] == 1 for n in lengths)
        assert rlresources.cell_group(cfg, 8192) == rlresources.BUNDLE_GROUP
        assert rlresources.cell_group(cfg, 16384) is None


def test_fixed_resources_are_what_every_cell_gets():
    """Resources the rules declare as values (no function per job, issue 27) are those of every
    cell, at any length, attempt and rule; a tier or a rule's own setting that differs unfixes."""
    paper = prepared(yaml.safe_load(PAPER.read_text()))
    assert rlresources.fixed_resources(paper) == {"gpu": 1, "gpu_model": "", "slurm_partition": ""}
    tiers = [
        {"max_length": 64, "mem_mb": 1000, "runtime": 5, "gpus": 1},
        {"mem_mb": 2000, "runtime": 10, "gpus": 1, "gpu_model": "a100"},
    ]
    typed = prepared({**MICRO, "resources": {"cells": tiers, "bundle_max_length": 64}})
    assert rlresources.fixed_resources(typed) == {"gpu": 1, "slurm_partition": ""}
    default = [("default-resources gpu_model", "gpu_model", "a100")]
    assert rlresources.fixed_resources(paper, default)["gpu_model"] == "a100"
    own = [("set-resources needle:slurm_partition", "slurm_partition", "long")]
    assert "slurm_partition" not in rlresources.fixed_resources(paper, own)
    for cfg, given in [(paper, default), (typed, []), (paper, own)]:
        fixed = rlresources.fixed_resources(cfg, given)
        for rule, n, attempt in itertools.product(
            ("ppl", "attention", "needle", "task"), [2**k for k in range(6, 18)], (1, 2)
        ):
            cell = rlresources.cell_resources(cfg, rule, n, attempt, given)
            assert {k: cell[k] for k in fixed} == fixed, (rule, n, attempt)


@pytest.mark.workflow
def test_jobs_get_their_tier_and_only_short_cells_are_bundled(tmp_path, snakemake):
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    cfg["resources"] = {
        "bundle_max_length": 64,
        "cells": [
            {"max_length": 64, "mem_mb": 1000, "runtime": 10},
            {"mem_mb": 3000, "runtime": 30, "gpus": 1, "gpu_model": "h100", "partition": "long"},
        ],
        "attention": [{"mem_mb": 500, "runtime": 5}],  # a rule's own tiers
    }
    args = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, *args, "--profile", str(PROFILES["slurm"]), "-n")
    seen = {}
    for job in jobs(proc):
        if job["rule"] in ("ppl", "attention"):
            r = job["res"]
            seen[(job["rule"], job["wc"]["length"])] = (
                int(r["mem_mb"]),
                int(r["runtime"]),
                r.get("gpu", "0"),
                r.get("gpu_model", ""),
                r.get("slurm_partition", ""),
                job["grouped"],
            )
    assert seen == {
        ("ppl", "64"): (1000, 10, "0", "", "", True),
        ("attention", "64"): (500, 5, "0", "", "", True),
        ("ppl", "128"): (3000, 30, "1", "h100", "long", False),
    }


# --- bad input: one line naming the key and the fix -----------------------------------------------


@pytest.mark.parametrize(
    "tiers,expect",
    [
        (
            [{"mem_mb": 1000, "runtime": 5, "partition": "gpu long"}],
            "resources.cells[0].partition: 'gpu long' is malformed; a Slurm partition name",
        ),
        (
            [{"mem_mb": 1000, "runtime": 5, "gpus": 1, "gpu_model": "A100 80GB"}],
            "resources.cells[0].gpu_model: 'A100 80GB' is malformed; use the cluster's GPU type",
        ),
        (
            [{"mem_mb": 1000, "runtime": 5, "gpu_model": "a100"}],
            "resources.cells[0].gpu_model: needs gpus >= 1 in the same tier",
        ),
        (
            [{"mem_mb": 1000, "runtime": 5}, {"mem_mb": 2000, "runtime": 9}],
            "resources.cells[0].max_length: missing; only the last tier may omit it",
        ),
        (
            [
                {"max_length": 128, "mem_mb": 1, "runtime": 5},
                {"max_length": 64, "mem_mb": 2, "runtime": 5},
            ],
            "resources.cells[1].max_length: 64 is not above the previous tier's (128)",
        ),
        (
            [{"max_length": 64, "mem_mb": 1000, "runtime": 5}],
            "resources.cells: no tier covers length 128; raise the last tier's max_length",
        ),
        ([{"mem_mb": 0, "runtime": 5}], "resources.cells[0].mem_mb: 0 is out of range"),
        ([{"mem_mb": 100, "runtime": 5, "gpus": "one"}], "resources.cells[0].gpus: 'one' is not"),
        ([{"mem_mb": 100}], "resources.cells[0]: missing required key 'runtime'"),
    ],
)
def test_malformed_config_resources_are_one_line(tiers, expect):
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    cfg["resources"] = {"cells": tiers}
    with pytest.raises(ConfigError) as err:
        prepared(cfg)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_bundled_cells_must_share_partition_and_gpu_type():
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    cfg["resources"] = {
        "bundle_max_length": 128,
        "cells": [
            {"max_length": 64, "mem_mb": 1, "runtime": 1, "partition": "short"},
            {"mem_mb": 1, "runtime": 1, "partition": "long"},
        ],
    }
    with pytest.raises(ConfigError, match=r"resources.bundle_max_length: bundled cells .* mix"):
        prepared(cfg)


@pytest.mark.workflow
@pytest.mark.parametrize(
    "how,expect",
    [
        (
            ["--set-resources", "ppl:slurm_partition='gpu long'"],
            "set-resources ppl:slurm_partition: 'gpu long' is malformed; a Slurm partition name",
        ),
        (["--default-resources", "runtime=forever"], "default-resources runtime: 'forever' is not"),
        ("profile", "set-resources ppl:slurm_partition: 'gpu long' is malformed"),
    ],
)
def test_malformed_profile_resources_are_one_line(tmp_path, snakemake, how, expect):
    args = write_config(tmp_path, MICRO)
    if how == "profile":  # a copy of profiles/slurm that asks for a malformed partition
        profile = yaml.safe_load((PROFILES["slurm"] / "config.yaml").read_text())
        profile["set-resources"]["ppl"] = {"slurm_partition": "gpu long"}
        (tmp_path / "prof").mkdir()
        (tmp_path / "prof/config.yaml").write_text(yaml.safe_dump(profile))
        how = ["--profile", str(tmp_path / "prof")]
    proc = snakemake(tmp_path, *args, *how, "-n", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if "ropelens:" in ln]
    assert len(ours) == 1 and ours[0].startswith("ropelens: resource error: "), proc.stderr
    assert expect in ours[0]
    assert all(ln in ours or ln.startswith("Using profile") for ln in lines), proc.stderr
    assert not (tmp_path / "results").exists()


def test_resource_values_are_checked_literally_not_as_expressions():
    check = rlresources.check_resource_value
    for name, value in [
        ("mem_mb", "2000 * attempt"),
        ("mem_mb", 16000),
        ("mem", "16G"),
        ("runtime", "2h"),
        ("runtime", 90),
        ("gpu", 2),
        ("slurm_partition", "gpu,gpu-long"),
        ("gpu_model", "a100_80g"),
        ("slurm_account", "anything goes"),
    ]:
        check(name, value, "x")  # no error
    for name, value, expect in [
        ("gpu_model", "A100 80GB", "x: 'A100 80GB' is malformed; use the cluster's GPU type"),
        ("slurm_partition", "gpu;rm", "x: 'gpu;rm' is malformed; a Slurm partition name"),
        ("gpu", "1.5", "x: '1.5' is not a whole number >= 0; e.g. gpu=1"),
        ("gpu", "-1", "x: '-1' is not a whole number"),
        ("nodes", "two", "x: 'two' is not a whole number"),
        ("mem_mb", "lots", "x: 'lots' is not a positive number; give MB"),
        ("mem_mb", "16G", "x: '16G' is not a positive number; give MB"),
        ("mem", "lots", "x: 'lots' is not a size; give e.g. mem=16G"),
        ("runtime", "0", "x: '0' is not a positive number; give minutes"),
    ]:
        with pytest.raises(ConfigError) as err:
            check(name, value, "x")
        assert str(err.value).startswith(expect), str(err.value)


def test_cluster_offer_partition_gpus_and_gpu_type():
    sinfo = "debug|(null)\ngpu|gpu:a100:4,gpu:h100:2\ncpu|(null)\n"
    offer = rlresources.slurm_offer_errors
    assert (
        offer([("a", "gpu", 1, "a100"), ("b", "", 0, ""), ("c", "debug,cpu", 0, "")], sinfo) is None
    )
    assert "partition 'gpux' does not exist on this cluster; sinfo lists: cpu, debug, gpu" in offer(
        [("resources.cells[0]", "gpux", 0, "")], sinfo
    )
    assert "asks for 1 GPU(s) but partition(s) debug offer none" in offer(
        [("w", "debug", 1, "")], sinfo
    )
    assert "GPU type 'v100' is not offered by gpu; sinfo lists: a100, h100" in offer(
        [("w", "gpu", 1, "v100")], sinfo
    )
    assert offer([("w", "x", 1, "y")], "") is None  # no sinfo answer: nothing to say


def test_given_resources_fill_what_a_tier_leaves_open_and_are_asked_of_the_cluster():
    cfg = prepared({**MICRO, "resources": {"cells": [{"mem_mb": 1000, "runtime": 10, "gpus": 1}]}})
    given = [
        ("default-resources gpu_model", "gpu_model", "'a100'"),
        ("default-resources slurm_partition", "slurm_partition", "gpu"),
        ("set-resources ppl:slurm_partition", "slurm_partition", "long"),
        ("default-resources disk_mb", "disk_mb", None),  # computed by Snakemake: no literal
    ]
    ppl = rlresources.cell_resources(cfg, "ppl", 64, 1, given)
    attention = rlresources.cell_resources(cfg, "attention", 64, 1, given)
    assert (ppl["gpu_model"], ppl["slurm_partition"]) == ("a100", "long")
    assert (attention["gpu_model"], attention["slurm_partition"]) == ("a100", "gpu")
    assert rlresources.cell_resources(cfg, "ppl", 64)["slurm_partition"] == ""  # nothing given
    assert rlresources.cluster_requests(cfg, given) == [
        ("resources.cells[0]", "gpu", 1, ""),
        ("default-resources gpu_model", "gpu", 1, "a100"),
        ("default-resources slurm_partition", "gpu", 0, ""),
        ("set-resources ppl:slurm_partition", "long", 0, ""),
    ]
    rlresources.check_given(given)  # all well-formed
    with pytest.raises(ConfigError, match="^set-resources ppl:gpu: 'x' is not a whole number"):
        rlresources.check_given([*given, ("set-resources ppl:gpu", "gpu", "x")])


# --- configs/paper.yaml --------------------------------------------------------------------------


def test_paper_config_is_the_papers_grid():
    cfg = prepared(yaml.safe_load(PAPER.read_text()))
    assert cfg["models"]["llama2-7b"] == {
        "hub": "meta-llama/Llama-2-7b-hf",
        "pretrained_length": 4096,
    }
    assert cfg["models"]["minima-2-3b"]["hub"] == "GeneZC/MiniMA-2-3B"
    assert cfg["lengths"] == [2048 * 2**k for k in range(7)]  # 2K ... 128K
    assert cfg["depths"] == list(range(0, 101, 10))
    hubs = {
        label: entry["checkpoints"]["llama2-7b"]["hub"]
        for label, entry in cfg["methods"].items()
        if entry.get("checkpoints")
    }
    assert hubs == {
        "pi-32k": "togethercomputer/LLaMA-2-7B-32K",
        "yarn-64k": "NousResearch/Yarn-Llama-2-7b-64k",
        "yarn-128k": "NousResearch/Yarn-Llama-2-7b-128k",
    }
    assert cfg["methods"]["ntk"].get("method", "ntk") == "ntk"


@pytest.mark.workflow
def test_paper_config_plans_on_slurm_without_downloading(tmp_path, snakemake, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = snakemake(
        tmp_path, "--configfile", str(PAPER), "--profile", str(PROFILES["slurm"]), "-n"
    )
    counts = job_counts(proc)
    # llama2-7b: rope, pi-32k, yarn-64k, yarn-128k, ntk and the nine beyond the paper (ntk-by-
    # parts, abf, p-rope, pi-auto, yarn-auto, longrope, rerope, self-extend, string); minima: rope,
    # ntk, pi, yarn
    pairs = 5 + 9 + 4
    assert counts["ppl"] == pairs * 7 and counts["needle"] == pairs * 7 * 11
    assert counts["attention"] == pairs * 5
    planned = {(j["rule"], j["wc"].get("length")): j for j in jobs(proc)}
    short, long = planned[("ppl", "2048")], planned[("ppl", "131072")]
    assert short["grouped"] and not long["grouped"]
    assert int(long["res"]["mem_mb"]) > int(short["res"]["mem_mb"])
    assert int(long["res"]["runtime"]) > int(short["res"]["runtime"])
    assert long["res"]["gpu"] == "1"
    assert not (tmp_path / "results").exists()

# What a cell asks a cluster for (config `resources:`, see profiles/slurm). A cell rule uses
#
#     resources:
#         mem_mb=cell_mem_mb, runtime=cell_runtime, gpu=cell_gpu, gpu_model=cell_gpu_model,
#         slurm_partition=cell_partition, cell_slots=1,
#     group: cell_group
#
# mem_mb, runtime, GPUs, GPU type and partition come from the tier of the cell's length; each retry
# (--retries) multiplies mem_mb by resources.memory_growth and runtime by runtime_growth, so a cell
# killed for memory comes back with more. Cells up to resources.bundle_max_length join the group
# `cells`; `--group-components cells=N` (profiles/slurm) bundles N of them into one cluster job.
# `cell_slots` is local to a group job: the pool (default 1 on a cluster, --resources cell_slots=K)
# is how many bundled cells run at once inside one job; it never limits the workflow as a whole.
# Resources never rerun a cell: they are not params.

import subprocess
from functools import cache


resource_scopes:
    cell_slots="local",


# --- profile / --default-resources / --set-resources: one line for a malformed value ------------
def _raw(value):
    """The text a resource was given as (None for a computed one we cannot show)."""
    return getattr(value, "raw", value)  # None for a computed default (e.g. disk_mb)


def _given_resources():
    """(where, name, raw value) of every resource the profile or the command line gives."""
    rs = workflow.resource_settings
    given = []
    for name, value in (rs.default_resources or {}).items():
        given.append((f"default-resources {name}", name, _raw(value)))
    for rule, res in (rs.overwrite_resources or {}).items():
        for name, value in res.items():
            given.append((f"set-resources {rule}:{name}", name, _raw(value)))
    return given


def _check_given_resources():
    for where, name, value in _given_resources():
        if value is None:
            continue
        try:
            rlconfig.check_resource_value(name, value, where)
        except ConfigError as e:
            sys.exit(f"ropelens: resource error: {e}")


_check_given_resources()


def _given(name, rule=None):
    """A literal resource from the profile / command line: set-resources of rule, else default."""
    default = None
    for where, key, value in _given_resources():
        if key != name:
            continue
        text = str(value).strip().strip("'\"")
        if where.startswith(f"set-resources {rule}:"):
            return text
        if where.startswith("default-resources"):
            default = text
    return default


# --- against the cluster: partitions and GPUs that exist (once, when submitting to Slurm) -------
@cache
def _on_cluster():
    """Runs once at DAG-build time: checks requests against `sinfo`, sets the bundle pool."""
    plugin = workflow.executor_plugin
    if plugin is None or workflow.local_exec:
        return
    if "cell_slots" not in workflow.global_resources:
        workflow.register_resource("cell_slots", 1)
    if plugin.name != "slurm":
        return
    try:
        sinfo = subprocess.run(
            ["sinfo", "-h", "-o", "%R|%G"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    requests = []
    res = config["resources"]
    for key in ("cells", *rlconfig.CELL_RULES):
        for i, tier in enumerate(res.get(key) or []):
            requests.append(
                (
                    f"resources.{key}[{i}]",
                    tier.get("partition") or _given("slurm_partition") or "",
                    tier.get("gpus", 0),
                    tier.get("gpu_model", ""),
                )
            )
    for where, name, value in _given_resources():
        text = str(value).strip().strip("'\"")
        if name == "slurm_partition":
            requests.append((where, text, 0, ""))
        elif name == "gpu_model":
            requests.append((where, _given("slurm_partition") or "", 1, text))
    problem = rlconfig.slurm_offer_errors(requests, sinfo)
    if problem:
        sys.exit(f"ropelens: resource error: {problem}")


def _cell(wildcards, attempt, rulename):
    _on_cluster()
    return rlconfig.cell_resources(
        config, rulename or "cells", wildcards.length, attempt
    )


def cell_mem_mb(wildcards, attempt, rulename=None):
    return _cell(wildcards, attempt, rulename)["mem_mb"]


def cell_runtime(wildcards, attempt, rulename=None):
    return _cell(wildcards, attempt, rulename)["runtime"]


def cell_gpu(wildcards, attempt, rulename=None):
    return _cell(wildcards, attempt, rulename)["gpu"]


def cell_gpu_model(wildcards, attempt, rulename=None):
    return (
        _cell(wildcards, attempt, rulename)["gpu_model"]
        or _given("gpu_model", rulename)
        or ""
    )


def cell_partition(wildcards, attempt, rulename=None):
    tier = _cell(wildcards, attempt, rulename)["slurm_partition"]
    return tier or _given("slurm_partition", rulename) or ""


def cell_group(wildcards):
    _on_cluster()  # evaluated while the DAG is built, before any job is submitted
    return rlconfig.cell_group(config, wildcards.length)


# Light rules run in the Snakemake process itself (on a login node): the aggregates read cells and
# draw charts; `corpus` may download a dataset, which compute nodes often cannot.
localrules:
    all,
    corpus,
    ppl_table,
    attention_report,
    needle_report,

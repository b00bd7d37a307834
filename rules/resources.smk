# What a cell asks a cluster for: the Snakemake glue over ropelens.resources (tiers by length,
# growth on retry, the bundle group, checks of given values and of sinfo). A cell rule uses
#
#     resources:
#         **CELL_RESOURCES,
#     group: cell_group
#
# mem_mb, runtime, GPUs, GPU type and partition come from the tier of the cell's length; each retry
# (--retries) multiplies mem_mb by resources.memory_growth and runtime by runtime_growth, so a cell
# killed for memory comes back with more. Cells up to resources.bundle_max_length join the group
# `cells`; `--group-components cells=N` (profiles/slurm) bundles N of them into one cluster job.
# `cell_slots` is local to a group job: the pool (default 1 on a cluster, --resources cell_slots=K)
# is how many bundled cells run at once inside one job; it never limits the workflow as a whole.
# Resources never rerun a cell: they are not params.

from functools import cache

from ropelens import resources as rlresources


resource_scopes:
    cell_slots="local",


# --- profile / --default-resources / --set-resources: one line for a malformed value ------------
def _given_resources():
    """(where, name, raw value) of every resource the profile or the command line gives (the raw
    value is None for a computed default, e.g. disk_mb)."""
    rs = workflow.resource_settings
    given = []
    for name, value in (rs.default_resources or {}).items():
        given.append((f"default-resources {name}", name, getattr(value, "raw", value)))
    for rule, res in (rs.overwrite_resources or {}).items():
        for name, value in res.items():
            given.append(
                (f"set-resources {rule}:{name}", name, getattr(value, "raw", value))
            )
    return given


GIVEN_RESOURCES = _given_resources()
try:
    rlresources.check_given(GIVEN_RESOURCES)
except ConfigError as e:
    sys.exit(f"ropelens: resource error: {e}")


# --- against the cluster: partitions and GPUs that exist (once, when submitting to Slurm) -------
@cache
def _on_cluster():
    """Runs once at DAG-build time: checks requests against `sinfo`, sets the bundle pool."""
    plugin = workflow.executor_plugin
    if plugin is None or workflow.local_exec:
        return
    if "cell_slots" not in workflow.global_resources:
        workflow.register_resource("cell_slots", 1)
    if plugin.name == "slurm":
        problem = rlresources.cluster_problem(config, GIVEN_RESOURCES)
        if problem:
            sys.exit(f"ropelens: resource error: {problem}")


def _cell(name):
    """Input function of one resource of a cell, from the tier of its length and its attempt."""

    @signed
    def resource(wildcards, attempt, rulename=None):
        _on_cluster()
        return _cell_resources(rulename, wildcards.length, attempt)[name]

    return resource


@cache
def _cell_resources(rulename, length, attempt):
    """All resources of the cells of ``rulename`` at ``length``, ``attempt`` (once each)."""
    return rlresources.cell_resources(
        config, rulename or "cells", length, attempt, GIVEN_RESOURCES
    )


# a resource with one value for every cell (e.g. no tier names a GPU type) is that value
FIXED_RESOURCES = rlresources.fixed_resources(config, GIVEN_RESOURCES)
CELL_RESOURCES = {
    name: FIXED_RESOURCES.get(name, _cell(name))
    for name in ("mem_mb", "runtime", "gpu", "gpu_model", "slurm_partition")
}
CELL_RESOURCES["cell_slots"] = 1


@signed
def cell_group(wildcards):
    _on_cluster()  # evaluated while the DAG is built, before any job is submitted
    return rlresources.cell_group(config, wildcards.length)


# Light rules run in the Snakemake process itself (on a login node): the aggregates read cells and
# draw charts; `corpus` may download a dataset, which compute nodes often cannot.
localrules:
    all,
    corpus,
    ppl_table,
    attention_report,
    needle_report,

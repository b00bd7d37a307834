"""Cluster resources of a cell (config ``resources:``, issue 6), without Snakemake.

What one ppl, attention or needle cell asks a cluster for depends on its context length: a cell
takes the first tier whose ``max_length`` covers it; each retry multiplies memory and wall time by
``memory_growth`` / ``runtime_growth``; cells up to ``bundle_max_length`` join :data:`BUNDLE_GROUP`
so that ``--group-components cells=N`` bundles them into one cluster job.

``rules/resources.smk`` is the thin Snakemake glue: it collects the resources a profile,
``--default-resources`` or ``--set-resources`` gives as ``(where, name, value)`` triples (here
called *given*), checks them with :func:`check_given`, asks :func:`cluster_problem` once when it
submits to Slurm, and turns :func:`cell_resources` into rule resources.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess

from ropelens.errors import ConfigError

CELL_RULES = ("ppl", "attention", "needle")
DEFAULT_TIERS = [
    {"max_length": 4096, "mem_mb": 2000, "runtime": 15},
    {"max_length": 32768, "mem_mb": 8000, "runtime": 60},
    {"mem_mb": 32000, "runtime": 240},
]
BUNDLE_GROUP = "cells"
_PARTITION_RE = r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"  # sbatch -p takes a comma-separated list
_GPU_MODEL_RE = r"[A-Za-z0-9_.]+"  # what snakemake-executor-plugin-slurm accepts
_FIXES = {
    "partition": "a Slurm partition name has letters, digits, '_', '-' or '.' (see sinfo -s)",
    "gpu_model": "use the cluster's GPU type, e.g. a100 (letters, digits, '_' or '.'; sinfo -o %G)",
}


# --- the config's tiers --------------------------------------------------------------------------


def prepare(cfg: dict) -> None:
    """Fill the default tiers of ``cfg["resources"]`` (its scalar defaults come from the schema,
    :func:`ropelens.config.validate`) and check them (one-line ConfigError)."""
    res = cfg["resources"]
    res.setdefault("cells", copy.deepcopy(DEFAULT_TIERS))
    longest = max(cfg["lengths"])
    for key in ("cells", *CELL_RULES):
        _check_tiers(f"resources.{key}", res.get(key) or [], longest)
    bundled = [n for n in cfg["lengths"] if n <= res["bundle_max_length"]]
    kinds = {
        (t.get("partition", ""), t.get("gpu_model", ""))
        for rule in CELL_RULES
        for t in (cell_tier(cfg, rule, n) for n in bundled)
    }
    if len(kinds) > 1:
        shown = ", ".join(sorted(f"{p or '-'}/{g or '-'}" for p, g in kinds))
        raise ConfigError(
            f"resources.bundle_max_length: bundled cells (<= {res['bundle_max_length']} tokens) "
            f"mix partitions/GPU types ({shown}); give their tiers one partition and gpu_model "
            "or lower bundle_max_length"
        )


def _check_tiers(key: str, tiers: list[dict], longest: int) -> None:
    for i, tier in enumerate(tiers):
        where = f"{key}[{i}]"
        if "max_length" not in tier and i != len(tiers) - 1:
            raise ConfigError(
                f"{where}.max_length: missing; only the last tier may omit it (any longer cell)"
            )
        if i and tier.get("max_length", float("inf")) <= tiers[i - 1]["max_length"]:
            raise ConfigError(
                f"{where}.max_length: {tier['max_length']} is not above the previous tier's "
                f"({tiers[i - 1]['max_length']}); list tiers from short to long"
            )
        for field in ("partition", "gpu_model"):
            value = tier.get(field)
            pattern = _PARTITION_RE if field == "partition" else _GPU_MODEL_RE
            if value is not None and not re.fullmatch(pattern, value):
                raise ConfigError(f"{where}.{field}: {value!r} is malformed; {_FIXES[field]}")
        if "gpu_model" in tier and tier.get("gpus", 0) < 1:
            raise ConfigError(f"{where}.gpu_model: needs gpus >= 1 in the same tier")
    if tiers and tiers[-1].get("max_length", longest) < longest:
        raise ConfigError(
            f"{key}: no tier covers length {longest}; "
            "raise the last tier's max_length or omit it (any longer cell)"
        )


def cell_tier(cfg: dict, rule: str, length: int) -> dict:
    res = cfg["resources"]
    tiers = res.get(rule) or res["cells"]
    return next(t for t in tiers if length <= t.get("max_length", length))


def cell_resources(cfg: dict, rule: str, length: int, attempt: int = 1, given=()) -> dict:
    """Slurm resources of one cell: mem_mb and runtime (minutes) grow with the retry attempt.
    A tier without a GPU type or partition takes the one ``given`` for ``rule`` (or as default):
    a rule's own (empty) value would otherwise hide a profile's ``--default-resources``."""
    res = cfg["resources"]
    tier = cell_tier(cfg, rule, int(length))
    retry = max(0, int(attempt) - 1)
    return {
        "mem_mb": math.ceil(tier["mem_mb"] * res["memory_growth"] ** retry),
        "runtime": math.ceil(tier["runtime"] * res["runtime_growth"] ** retry),
        **_placement(tier, given, rule),
    }


def _placement(tier: dict, given, rule: str | None) -> dict:
    """What a tier asks for whatever the attempt: GPUs, their type and the partition."""
    return {
        "gpu": tier.get("gpus", 0),
        "gpu_model": tier.get("gpu_model") or given_value(given, "gpu_model", rule) or "",
        "slurm_partition": (
            tier.get("partition") or given_value(given, "slurm_partition", rule) or ""
        ),
    }


def fixed_resources(cfg: dict, given=()) -> dict:
    """The resources of :func:`cell_resources` that are the same for every cell of every rule
    (name -> value): a rule may declare them as values, so Snakemake calls no function for them
    per job. A name that ``given`` sets for some rule (``set-resources``) is never fixed."""
    res = cfg["resources"]
    tiers = [t for key in ("cells", *CELL_RULES) for t in res.get(key) or []]
    per_rule = {k for w, k, _ in given if w.startswith("set-resources ")}
    fixed = {}
    for name in ("gpu", "gpu_model", "slurm_partition"):
        values = {_placement(t, given, None)[name] for t in tiers}
        if len(values) == 1 and name not in per_rule:
            fixed[name] = values.pop()
    return fixed


def cell_group(cfg: dict, length: int) -> str | None:
    """Group of a cell: short cells join BUNDLE_GROUP (bundled by --group-components)."""
    return BUNDLE_GROUP if int(length) <= cfg["resources"]["bundle_max_length"] else None


# --- resources a profile or the command line gives ------------------------------------------------


def _text(value) -> str:
    return str(value).strip().strip("'\"")


def given_value(given, name: str, rule: str | None = None) -> str | None:
    """The literal ``name`` from ``given``: ``set-resources`` of ``rule``, else the default."""
    default = None
    for where, key, value in given:
        if key != name or value is None:
            continue
        if where.startswith(f"set-resources {rule}:"):
            return _text(value)
        if where.startswith("default-resources"):
            default = _text(value)
    return default


def check_given(given) -> None:
    """The first malformed literal of ``given`` as a one-line ConfigError."""
    for where, name, value in given:
        if value is not None:
            check_resource_value(name, value, where)


def check_resource_value(name: str, value, where: str) -> None:
    """Check a resource a profile, --default-resources or --set-resources gives (one line).

    Expressions (e.g. ``2000 * attempt``) are left to Snakemake; literals are checked here.
    """
    text = _text(value)
    if _is_expression(text):
        return
    if name in ("slurm_partition", "gpu_model"):
        field = "partition" if name == "slurm_partition" else "gpu_model"
        pattern = _PARTITION_RE if field == "partition" else _GPU_MODEL_RE
        if text and not re.fullmatch(pattern, text):
            raise ConfigError(f"{where}: {text!r} is malformed; {_FIXES[field]}")
    elif name in ("gpu", "gpus", "cpus_per_task", "cpus_per_gpu", "nodes", "tasks"):
        if not re.fullmatch(r"\d+", text):
            raise ConfigError(f"{where}: {text!r} is not a whole number >= 0; e.g. {name}=1")
    elif name in ("mem_mb", "disk_mb", "runtime"):
        unit = "minutes, e.g. runtime=120 or runtime=2h" if name == "runtime" else "MB, e.g. 16000"
        ok = r"\d+(\.\d+)?" + (r"(\s*[a-zA-Z]+)?" if name == "runtime" else "")
        if not re.fullmatch(ok, text) or not float(re.match(r"\d+(\.\d+)?", text)[0]) > 0:
            raise ConfigError(f"{where}: {text!r} is not a positive number; give {unit}")
    elif name in ("mem", "disk") and not re.fullmatch(r"\d+(\.\d+)?\s*[kKmMgGtT]?i?[bB]?", text):
        raise ConfigError(f"{where}: {text!r} is not a size; give e.g. {name}=16G")


def _is_expression(text: str) -> bool:
    return bool(re.search(r"\b(attempt|input|threads|wildcards)\b|[*+/()]", text))


# --- against the cluster: partitions and GPUs that exist (sinfo) ----------------------------------


def cluster_requests(cfg: dict, given) -> list[tuple[str, str, int, str]]:
    """(where, partition, gpus, gpu_model) of every tier of the config and every partition or
    GPU type ``given``: what the cluster must offer."""
    default_partition = given_value(given, "slurm_partition") or ""
    requests = []
    for key in ("cells", *CELL_RULES):
        for i, tier in enumerate(cfg["resources"].get(key) or []):
            requests.append(
                (
                    f"resources.{key}[{i}]",
                    tier.get("partition") or default_partition,
                    tier.get("gpus", 0),
                    tier.get("gpu_model", ""),
                )
            )
    for where, name, value in given:
        if name == "slurm_partition":
            requests.append((where, _text(value), 0, ""))
        elif name == "gpu_model":
            requests.append((where, default_partition, 1, _text(value)))
    return requests


def sinfo() -> str:
    """``sinfo -h -o '%R|%G'`` (partition | generic resources); empty when it cannot run."""
    try:
        return subprocess.run(
            ["sinfo", "-h", "-o", "%R|%G"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cluster_problem(cfg: dict, given) -> str | None:
    """The first request of the config or ``given`` that this Slurm cluster cannot serve."""
    return slurm_offer_errors(cluster_requests(cfg, given), sinfo())


def slurm_offer_errors(requests: list[tuple[str, str, int, str]], sinfo: str) -> str | None:
    """First problem of ``requests`` (where, partition, gpus, gpu_model) against a cluster.

    ``sinfo`` is the output of ``sinfo -h -o '%R|%G'`` (partition | generic resources).
    """
    offer: dict[str, set[str]] = {}
    for line in sinfo.splitlines():
        if "|" in line:
            part, gres = line.strip().split("|", 1)
            offer.setdefault(part, set()).update(g for g in gres.split(",") if g != "(null)")
    if not offer:
        return None
    default_parts = list(offer)
    for where, partition, gpus, gpu_model in requests:
        parts = [p for p in partition.split(",") if p] if partition else default_parts
        for p in parts:
            if p not in offer:
                return (
                    f"{where}: partition '{p}' does not exist on this cluster; "
                    f"sinfo lists: {', '.join(sorted(offer))}"
                )
        gres = {g for p in parts for g in offer[p]}
        gpu_gres = [g for g in gres if g.split(":")[0] == "gpu"]
        if gpus and not gpu_gres:
            return (
                f"{where}: asks for {gpus} GPU(s) but partition(s) {', '.join(parts)} offer none "
                "(sinfo -o %G); set gpus: 0 or pick a GPU partition"
            )
        types = {g.split(":")[1] for g in gpu_gres if g.count(":") >= 2}
        if gpu_model and types and gpu_model not in types:
            return (
                f"{where}: GPU type '{gpu_model}' is not offered by {', '.join(parts)}; "
                f"sinfo lists: {', '.join(sorted(types))}"
            )
    return None

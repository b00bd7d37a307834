"""Provenance of a run: config hash, package versions, hardware, the git commit of the checkout,
and wall time per stage (summed from cell metadata ``ropelens.load_seconds`` /
``compute_seconds`` and toy training summaries ``ropelens_train.json``).

Plain data (dicts and lists); :mod:`ropelens.report` renders it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

from ropelens import __version__

PACKAGES = (
    "ropelens",
    "torch",
    "transformers",
    "snakemake",
    "pyarrow",
    "pandas",
    "numpy",
    "numba",
    "altair",
    "vl-convert-python",
    "datasets",
    "tqdm",
)


def config_hash(config) -> str:
    """SHA-256 of the resolved config as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions(names=PACKAGES) -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["ropelens"] = out.get("ropelens") or __version__
    return out


#: the platform envs/ropelens.yaml pins for (packaging's marker variables): Linux, CPython 3.11
LINUX_311 = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def locked_versions(lock: str | os.PathLike, environment: dict | None = None) -> dict[str, str]:
    """Package -> version pinned by a requirements lock (``requirements/lock.txt``: ``name==v``
    lines, with an environment marker where the pin holds only on some platforms or Pythons),
    for ``environment`` (packaging's marker variables; default: this interpreter's)."""
    import re

    from packaging.markers import Marker
    from packaging.utils import canonicalize_name

    pins = {}
    for line in Path(lock).read_text(encoding="utf-8").splitlines():
        m = re.match(r"([A-Za-z0-9._-]+)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if m and (m[3] is None or Marker(m[3]).evaluate(environment)):
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def lock_check(lock: str | os.PathLike | None, versions: dict[str, str], cells: dict) -> list:
    """(package, locked, this machine, cells, verdict) per package of ``versions`` (this
    machine's) and ``cells`` (package -> versions the cells recorded), against the lock."""
    from packaging.utils import canonicalize_name

    pins = locked_versions(lock) if lock and Path(lock).is_file() else None
    rows = []
    for name in sorted(set(versions) | set(cells)):
        here, used = versions.get(name, "—"), sorted(cells.get(name, ()))
        pin = (pins or {}).get(canonicalize_name(name))
        seen = {here} | set(used) if here != "—" else set(used)
        if pins is None or pin is None:
            verdict = "not in the lock" if pins is not None else "no lock"
        else:
            verdict = "matches" if seen <= {pin} else "differs"
        rows.append((name, pin or "—", here, ", ".join(used) or "—", verdict))
    return rows


def hardware() -> dict[str, str]:
    """CPU model, logical cores, memory and GPUs of the machine that builds the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical cores": str(os.cpu_count()),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    gpus = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpus = ", ".join(
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            )
    except Exception:  # no torch, or a broken driver: the report still builds
        gpus = "unknown"
    info["gpus"] = gpus
    return info


def git_commit(folder: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(folder), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


_SKIP_DIRS = {"tables", "figures", "data"}


def stage_times(results: Path | None, models: Path | None = None) -> list[dict]:
    """Wall time per stage: cells per top-level folder of ``results`` (from their Parquet metadata)
    and toy training runs under ``models`` (from ``ropelens_train.json``)."""
    rows: list[dict] = []
    if models is not None and Path(models).is_dir():
        runs = sorted(Path(models).rglob("ropelens_train.json"))
        seconds, devices = 0.0, set()
        for p in runs:
            try:
                s = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            seconds += float(s.get("seconds") or 0.0)
            if s.get("device"):
                devices.add(str(s["device"]))
        if runs:
            rows.append(
                dict(
                    stage="toy training",
                    items=len(runs),
                    load_s=None,
                    compute_s=seconds,
                    total_s=seconds,
                    devices=", ".join(sorted(devices)) or "—",
                )
            )
    for folder, metas in _cell_metadata(results):
        n, load, compute, devices = 0, 0.0, 0.0, {}
        for meta in metas:
            n += 1
            load += float(meta.get("ropelens.load_seconds", 0) or 0)
            compute += float(meta["ropelens.compute_seconds"] or 0)
            dev = meta.get("ropelens.device", "?")
            devices[dev] = devices.get(dev, 0) + 1
        if n:
            rows.append(
                dict(
                    stage=f"{folder.name} cells",
                    items=n,
                    load_s=load,
                    compute_s=compute,
                    total_s=load + compute,
                    devices=", ".join(f"{d} ×{c}" for d, c in sorted(devices.items())),
                )
            )
    return rows


def _cell_metadata(results: Path | None):
    """(stage folder, [metadata of each cell in it]) under ``results``: the Parquet files whose
    metadata a cell command wrote (``ropelens.compute_seconds``)."""
    import pyarrow.parquet as pq

    if results is None or not Path(results).is_dir():
        return
    for folder in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        if folder.name in _SKIP_DIRS:
            continue
        metas = []
        for cell in sorted(folder.rglob("*.parquet")):
            try:
                meta = pq.read_schema(cell).metadata or {}
            except Exception:
                continue
            meta = {k.decode(): v.decode() for k, v in meta.items()}
            if "ropelens.compute_seconds" in meta:
                metas.append(meta)
        yield folder, metas


def cell_packages(results: Path | None) -> dict[str, set[str]]:
    """Package -> the versions the cells under ``results`` recorded (``ropelens.packages``)."""
    found: dict[str, set[str]] = {}
    for _, metas in _cell_metadata(results):
        for meta in metas:
            for name, version in json.loads(meta.get("ropelens.packages", "{}")).items():
                found.setdefault(name, set()).add(version)
    return found


def gguf_sources(models: Path | None) -> list[tuple]:
    """(model, GGUF file, package, sha256, seconds) of every model converted from a GGUF file
    (``ropelens_gguf.json`` under ``models``)."""
    from ropelens.gguf import PROVENANCE

    found = sorted(Path(models).rglob(PROVENANCE)) if models and Path(models).is_dir() else []
    rows = []
    for p in found:
        try:
            g = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        package = f"{g.get('distribution')} {g.get('package_version')}" if "package" in g else "—"
        rows.append((p.parent.name, g.get("file"), package, g.get("sha256"), g.get("seconds")))
    return rows

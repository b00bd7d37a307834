"""Workflow configuration: schema validation and semantic checks.

The Snakefile calls :func:`prepare` once at DAG-build time. Every problem becomes a
:class:`~ropelens.errors.ConfigError` whose one-line message names the config key and the fix.
The cell grid of a prepared config is :mod:`ropelens.grid`; its names are re-exported here
(``config.cell_spec``, ``config.model_method_pairs``, ...) for the callers that read them so.
"""

from __future__ import annotations

import copy
import json
import math
import os
from functools import cache
from pathlib import Path

import yaml

from ropelens import methods as registry
from ropelens import zoo
from ropelens.errors import ConfigError
from ropelens.grid import (  # noqa: F401  (re-exported: the grid as config.<name>)
    GRID_KEYS,
    RESERVED_METHOD_KEYS,
    TASK_GRID_KEYS,
    attention_cells,
    built_inputs,
    cell_settings,
    cell_spec,
    checkpoint_dir,
    enabled_tasks,
    method_params,
    model_dir,
    model_method_pairs,
    needle_cells,
    task_cells,
    task_entry,
    task_settings,
)

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
WORKFLOW_DIR = Path(__file__).resolve().parents[2]  # the checkout: Snakefile, configs/


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
    if v == "pattern" and "\\{" in err.validator_value:  # a template that must hold a field
        field = err.validator_value.replace("\\", "")
        return f"{key}: {err.instance!r} must contain {field}; add it where the value goes"
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
    for key in ("depths", "runtime", "attention", "needle", "resources"):
        cfg.setdefault(key, copy.deepcopy(schema()["properties"][key]["default"]))
    for section in ("ppl", "runtime", "attention", "needle", "resources"):
        for key, sub in schema()["properties"][section]["properties"].items():
            if "default" in sub:
                cfg[section].setdefault(key, sub["default"])
    cfg["attention"].setdefault("corpus", cfg["ppl"]["corpus"])
    cfg["attention"].setdefault("lengths", list(cfg["lengths"]))
    prose = [k for k, c in cfg["corpora"].items() if c.get("builtin") == "pydoc"]
    cfg["needle"].setdefault("haystack", prose[0] if prose else cfg["ppl"]["corpus"])
    cfg["needle"].setdefault("lengths", list(cfg["lengths"]))
    if "tasks" in cfg:
        _task_defaults(cfg)
    for corpus in cfg["corpora"].values():
        corpus.setdefault("split", "test")
        corpus.setdefault("column", "text")
    return cfg


def check(cfg: dict, base_dir: str | os.PathLike = ".") -> None:
    """Semantic checks the schema cannot express. ``base_dir`` resolves relative paths."""
    base = Path(base_dir)
    _check_models(cfg, base)
    _check_methods(cfg, base)
    _check_sections(cfg, base)
    check_prompt_lengths(cfg)
    from ropelens import architectures  # what each model's own config allows (issue 12)

    architectures.check(cfg, base)


def _check_models(cfg: dict, base: Path) -> None:
    for name, model in cfg["models"].items():
        if "path" in model and not (base / model["path"]).expanduser().is_dir():
            raise ConfigError(
                f"models.{name}.path: directory '{model['path']}' does not exist; "
                "give a local Hugging Face model directory or use 'hub: <org/name>'"
                + zoo.missing_hint(model["path"])
            )
        if "train" in model:
            _check_pretrain(cfg, name)
        if "gguf" in model:
            from ropelens import gguf

            gguf.check(model["gguf"], f"models.{name}.gguf", base)
        tiny = model.get("tiny") or {}
        heads, kv = tiny.get("heads", 4), tiny.get("kv_heads", tiny.get("heads", 4))
        if heads % kv:
            raise ConfigError(f"models.{name}.tiny.kv_heads: {kv} must divide heads ({heads})")


def _check_methods(cfg: dict, base: Path) -> None:
    models = cfg["models"]
    for label, entry in cfg["methods"].items():
        where = f"methods.{label}"
        name = entry.get("method", label)
        if name not in registry.REGISTRY:
            raise ConfigError(
                f"{where}.method: unknown method '{name}'; "
                f"known methods: {', '.join(registry.known())}"
            )
        if registry.uses_length(method_params(entry)) and entry.get("checkpoints"):
            raise ConfigError(
                f"{where}.factor: auto scales each cell by its length, but a checkpoint was "
                "trained with one factor; give that number (e.g. cpt_length / pretrained_length)"
            )
        _inline_factor_files(entry, where, base)
        # a nominal base is enough to check the parameters (the models' own configs: below)
        nominal = registry.BaseRope(10000.0, 128, 4096, nominal=True)
        registry.resolve(name, method_params(entry), nominal, where=where)
        for model in list(entry.get("checkpoints", {})) + list(entry.get("models", [])):
            if model not in models:
                raise ConfigError(
                    f"{where}: model '{model}' is not in models; known: {', '.join(models)}"
                )
        for model, ckpt in entry.get("checkpoints", {}).items():
            if "train" in ckpt and registry.get(name).side == "attention":
                raise ConfigError(
                    f"{where}.checkpoints.{model}.train: '{name}' changes positions inside "
                    "ropelens' attention, which is inference-only; run it training-free"
                )
            if "train" in ckpt:
                where_ckpt = f"{where}.checkpoints.{model}.train"
                _check_continual(cfg, label, model)
                if "hub" in models[model]:
                    raise ConfigError(
                        f"{where_ckpt}: continual pretraining needs a local base model; "
                        f"models.{model} is a hub id — download it and use 'path:'"
                    )
            if "path" in ckpt and not (base / ckpt["path"]).expanduser().is_dir():
                raise ConfigError(
                    f"{where}.checkpoints.{model}.path: directory '{ckpt['path']}' does not exist"
                    + zoo.missing_hint(ckpt["path"])
                )
        if entry.get("checkpoints") and "cpt_length" not in entry:
            raise ConfigError(
                f"{where}.cpt_length: required with checkpoints; "
                "set it to the continual-pretraining length"
            )


def _check_sections(cfg: dict, base: Path) -> None:
    """lengths, depths, the ppl / attention / needle / tasks sections and their corpora."""
    lengths = cfg["lengths"]
    dupes = sorted({x for x in lengths if lengths.count(x) > 1})
    if dupes:
        raise ConfigError(f"lengths: {dupes[0]} is listed twice; list each length once")
    if cfg["ppl"]["corpus"] not in cfg["corpora"]:
        raise ConfigError(
            f"ppl.corpus: '{cfg['ppl']['corpus']}' is not in corpora; "
            f"known: {', '.join(cfg['corpora'])}"
        )
    att = cfg["attention"]
    if att["corpus"] not in cfg["corpora"]:
        raise ConfigError(
            f"attention.corpus: '{att['corpus']}' is not in corpora; "
            f"known: {', '.join(cfg['corpora'])}"
        )
    for key in ("lengths", "plot_lengths"):
        extra = [x for x in att.get(key, []) if x not in lengths]
        if extra:
            raise ConfigError(f"attention.{key}: {extra[0]} is not in lengths; add it there first")
    needle = cfg["needle"]
    if needle["haystack"] not in cfg["corpora"]:
        raise ConfigError(
            f"needle.haystack: '{needle['haystack']}' is not in corpora; "
            f"known: {', '.join(cfg['corpora'])}"
        )
    extra = [x for x in needle["lengths"] if x not in lengths]
    if extra:
        raise ConfigError(f"needle.lengths: {extra[0]} is not in lengths; add it there first")
    depths = cfg["depths"]
    if len(set(map(float, depths))) != len(depths):
        raise ConfigError("depths: a depth is listed twice; list each depth once")
    if "tasks" in cfg:
        check_tasks(cfg)
    _check_references(cfg)
    from ropelens import corpora

    for name, corpus in cfg["corpora"].items():
        if "path" in corpus:
            corpora.check_local(base / corpus["path"], corpus, min(lengths), f"corpora.{name}.path")


def _check_references(cfg: dict) -> None:
    """Plan-time check of ``attention.reference``: each names a configured model and a method
    that runs on it, and a length of ``lengths`` if it gives one (one-line ConfigError)."""
    from ropelens.distributions import references

    pairs = set(model_method_pairs(cfg))
    for ref in references(cfg["attention"]["reference"]):
        if ref["method"] not in cfg["methods"]:
            raise ConfigError(
                f"attention.reference: method '{ref['method']}' is not in methods; "
                "add it (e.g. rope: {}) or name another method label"
            )
        if ref["model"] is not None and ref["model"] not in cfg["models"]:
            raise ConfigError(
                f"attention.reference.model: '{ref['model']}' is not in models; "
                f"known: {', '.join(cfg['models'])}"
            )
        for model in cfg["models"]:
            ref_model = ref["model"] or model
            if (ref_model, ref["method"]) not in pairs:
                raise ConfigError(
                    f"attention.reference: method '{ref['method']}' does not run on model "
                    f"'{ref_model}'; name a method that runs on it (e.g. rope)"
                )
            if isinstance(ref["length"], int) and ref["length"] not in cfg["lengths"]:
                n = ref["length"]
                raise ConfigError(
                    f"attention.reference.length: {n} is not in lengths; add it there first"
                )


def _inline_factor_files(entry: dict, where: str, base: Path) -> None:
    """A LongRoPE ``factors_file`` becomes the inline factors it holds, so that cells use the
    factors of the plan (and rerun when they change). A relative path is read from the working
    directory, else from the workflow's own folder (its shipped ``configs/longrope/`` files), as
    config.yaml is found."""
    path = entry.get("factors_file")
    if not isinstance(path, str) or "short_factor" in entry or "long_factor" in entry:
        return  # not a file, or both given: the registry says what is wrong
    here = (base / path).expanduser()
    shipped = WORKFLOW_DIR / path
    if not here.exists() and not Path(path).is_absolute() and shipped.is_file():
        here = shipped
    try:
        factors = registry.read_factors(here)
    except registry.ParameterError as e:
        raise ConfigError(f"{where}.{e.key}: {e.text}") from None
    del entry["factors_file"]
    entry.update(factors)


def prepare(cfg: dict, base_dir: str | os.PathLike = ".") -> dict:
    from ropelens import preflight, resources

    cfg = validate(cfg)
    check(cfg, base_dir)
    preflight.check(cfg, base_dir)  # what the config points at: models, labels (plan time)
    resources.prepare(cfg)  # cluster resources (issue 6): tiers by length
    return cfg


# --- the toy zoo's train blocks (schema: definitions.train_pretrain / train_continual) -----------

TRAIN_CORPUS_KEYS = ("corpus", "haystack")  # settings that name a corpus of ``corpora``
_TRAIN_TYPES = {"integer": "an integer", "number": "a number", "string": "a corpus name"}


def train_properties(role: str) -> dict:
    """Setting -> its schema for a ``train:`` block of ``role`` ('pretrain' or 'continual'), in
    the schema's order (a pretrain block's architecture first)."""
    defs = schema()["definitions"]
    return {**defs[f"train_{role}"].get("properties", {}), **defs["train_common"]["properties"]}


def train_defaults(settings: dict, role: str) -> dict:
    """``settings`` with every default of ``role`` filled in (warmup: 5 % of steps)."""
    props = train_properties(role)
    out = {k: copy.deepcopy(p["default"]) for k, p in props.items() if "default" in p}
    out.update(settings)
    if out.get("warmup") is None:
        out["warmup"] = max(1, out["steps"] // 20)
    return out


def check_train(settings, where: str, role: str, corpora: dict | None = None) -> dict:
    """Check keys, types and ranges of a ``train:`` block against its schema; returns it with
    defaults filled in. ``corpora`` (the config's) also checks corpus names. The first problem in
    the schema's order of settings is one line naming the key and the fix."""
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: must be a mapping of training settings")
    props = train_properties(role)
    for key in settings:
        if key in props:
            continue
        if key in train_properties("pretrain"):
            raise ConfigError(
                f"{where}.{key}: only for pretraining; a continual run keeps the base model's "
                "architecture — remove it"
            )
        raise ConfigError(f"{where}.{key}: unknown setting; allowed: {', '.join(props)}")
    problems = _train_problems(settings, role, corpora)
    if problems:
        key = min(problems, key=list(props).index)
        raise ConfigError(f"{where}.{key}: {problems[key]}")
    s = train_defaults(settings, role)
    if s["needle_fraction"] > 0 and not s.get("haystack"):
        raise ConfigError(
            f"{where}.haystack: needle_fraction > 0 needs a haystack corpus; "
            "add one (e.g. haystack: pydoc-train) or set needle_fraction: 0"
        )
    if role == "pretrain":
        heads, kv = s["heads"], s.get("kv_heads") or s["heads"]
        if s["hidden_size"] % heads or (s["hidden_size"] // heads) % 2:
            raise ConfigError(
                f"{where}.heads: hidden_size ({s['hidden_size']}) / heads ({heads}) must be an "
                "even integer (the RoPE head dimension); change one of them"
            )
        if heads % kv:
            raise ConfigError(f"{where}.kv_heads: {kv} must divide heads ({heads})")
    return s


def _train_problems(settings: dict, role: str, corpora: dict | None) -> dict:
    """Setting -> what is wrong with it and the fix: the schema's verdict (integers strictly, not
    3.0), numbers that are not finite, corpus names that are not in ``corpora``."""
    import jsonschema

    props = train_properties(role)
    base = jsonschema.Draft202012Validator
    strict = base.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool)
    )
    root = {"definitions": schema()["definitions"], "$ref": f"#/definitions/train_{role}"}
    out = {}
    for err in jsonschema.validators.extend(base, type_checker=strict)(root).iter_errors(settings):
        if err.validator == "required":
            key = err.message.split("'")[1]
            out.setdefault(key, f"required; add it (e.g. {key}: {props[key]['examples'][0]})")
        elif err.path and err.path[0] == "task_mix":
            out.setdefault("task_mix", _mix_problem(err))
        elif err.path:
            out.setdefault(
                err.path[0], _setting_problem(err.validator, err.instance, props[err.path[0]])
            )
    # past the schema, task_mix is absent or a mapping of numbers >= 0
    weights = [] if "task_mix" in out else list(settings.get("task_mix", {}).values())
    if weights and not (any(w > 0 for w in weights) and all(map(math.isfinite, weights))):
        out["task_mix"] = "needs a finite weight > 0 for at least one task (e.g. needle: 1)"
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = _setting_problem("type", value, props[key])
        elif key in TRAIN_CORPUS_KEYS and isinstance(value, str) and not _known(value, corpora):
            out.setdefault(
                key,
                f"'{value}' is not in corpora; add it under corpora "
                f"(e.g. {value}: {{builtin: stdlib, split: train}}) or use one of "
                f"{', '.join(corpora)}",
            )
    return out


def _known(name: str, corpora: dict | None) -> bool:
    return corpora is None or name in corpora


def _mix_problem(err) -> str:
    """What is wrong with ``task_mix`` (a mapping task -> weight) and the fix."""
    tasks = ", ".join(err.schema["enum"]) if err.validator == "enum" else ""
    if err.validator == "enum":
        return f"{err.instance!r} is not a task; use {tasks}"
    if len(err.path) > 1:
        return f"{err.path[1]}: {err.instance!r} is not a weight >= 0; fix its value"
    if err.validator == "minProperties":
        return "is empty; give at least one task and its weight (e.g. needle: 1)"
    return f"{err.instance!r} is not a mapping of task -> weight (e.g. {{needle: 1, passkey: 1}})"


def _setting_problem(validator: str, value, prop: dict) -> str:
    """What is wrong with one setting (a jsonschema validator's verdict) and the fix."""
    fraction = prop.get("minimum") == 0 and prop.get("maximum") == 1
    if validator == "type":
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        kind = [t for t in types if t != "null"][0]
        want = "a number in 0..1" if fraction else _TRAIN_TYPES.get(kind, "true or false")
        return f"{value!r} is not {want}; fix its value"
    if fraction:
        return f"{value!r} is out of range; use a value in 0..1"
    bound = {"minimum": ">=", "exclusiveMinimum": ">"}[validator]
    return f"{value!r} is out of range; use a value {bound} {prop[validator]}"


def _check_pretrain(cfg: dict, name: str) -> None:
    """A toy base model's train block (``models.<name>.train``), at its pretrained length."""
    where = f"models.{name}.train"
    s = check_train(cfg["models"][name]["train"], where, "pretrain", cfg["corpora"])
    _check_needle_room(s, where, cfg["models"][name]["pretrained_length"])


def _check_continual(cfg: dict, label: str, model: str) -> None:
    """A trained checkpoint's train block (``methods.<label>.checkpoints.<model>.train``)."""
    entry = cfg["methods"][label]
    where = f"methods.{label}.checkpoints.{model}.train"
    s = check_train(entry["checkpoints"][model]["train"], where, "continual", cfg["corpora"])
    if entry.get("cpt_length") is None:
        raise ConfigError(
            f"methods.{label}.cpt_length: required with a trained checkpoint; "
            "set the continual-pretraining length (e.g. cpt_length: 1024)"
        )
    _check_apply(label, entry)
    _check_needle_room(s, where, entry["cpt_length"])


def _check_needle_room(s: dict, where: str, length: int) -> None:
    """Needle rows need a training length that holds a needle prompt (the zoo's byte tokenizer:
    the default template's sentence, question and answer, in bytes)."""
    from ropelens.needle import DEFAULT_TEMPLATE as t

    text = " " + t.needle.format(answer="9" * t.digits) + "\n" + t.question
    need = len(text.encode()) + len((t.answer_prefix + "9" * t.digits).encode()) + 8
    if s["needle_fraction"] > 0 and length < need:
        raise ConfigError(
            f"{where}.needle_fraction: training length {length} is too short for needle prompts "
            f"(>= {need} tokens); set needle_fraction: 0 or train longer"
        )
    trained = s["task_mix"] if s["needle_fraction"] > 0 else {}
    for task in [name for name, w in trained.items() if name != "needle" and w > 0]:
        need = _byte_task_length(task) + 8
        if length < need:
            raise ConfigError(
                f"{where}.task_mix.{task}: training length {length} is too short for its prompts "
                f"(>= {need} tokens with the fewest planted sentences); remove it or train longer"
            )


@cache
def _byte_task_length(task: str) -> int:
    """The longest shortest prompt of ``task`` over its keys (32 seeds), in the zoo's byte
    tokens, with the fewest planted sentences the zoo's training draws."""
    from ropelens import tasks
    from ropelens.toydata import FEWEST

    return max(tasks.min_length(_byte_tokens, task, seed, counts=FEWEST) for seed in range(32))


def _byte_tokens(text: str, add_special_tokens: bool = False) -> dict:
    """The zoo's byte tokenizer (:mod:`ropelens.tokenizer`) without building it: one token per
    UTF-8 byte and no special tokens, so prompt lengths are known at plan time."""
    return {"input_ids": list(text.encode())}


# --- prompts that fit their cells (issue 27): needle.lengths and tasks.lengths ----------------


def check_prompt_lengths(cfg: dict) -> None:
    """A needle or task length too short for its prompt would only write ``prompt_error`` cells:
    refuse it for the models whose tokenizer is known at plan time (the zoo's byte tokenizer:
    ``tiny`` and ``train`` models, without a checkpoint of their own). Other models' tokenizers
    are not loaded here; their cells record ``prompt_error`` and the report says so."""
    models = list(dict.fromkeys(m for m, x in model_method_pairs(cfg) if _byte_cells(cfg, m, x)))
    if not models:
        return
    who = f"model '{models[0]}' (byte tokenizer)"
    needle = cfg["needle"]
    if needle["format"] != "chat":  # plain: a byte tokenizer has no chat template
        shortest = _byte_needle_length(json.dumps(needle.get("template") or {}, sort_keys=True))
        for n in needle["lengths"]:
            if n < shortest:
                raise ConfigError(
                    f"needle.lengths: {n} tokens is too short for the needle prompt of {who}; "
                    f"the shortest that fits is {shortest}: use needle lengths >= {shortest} "
                    "(needle.lengths defaults to lengths)"
                )
    if "tasks" in cfg and cfg["tasks"]["format"] != "chat":
        for task in enabled_tasks(cfg):
            _check_task_lengths(cfg, task, who)


def _byte_cells(cfg: dict, model: str, method: str) -> bool:
    """The (model, method) cells run with the byte tokenizer (a model the workflow builds)."""
    ckpt = (cfg["methods"][method].get("checkpoints") or {}).get(model)
    built = "tiny" in cfg["models"][model] or "train" in cfg["models"][model]
    return built and (ckpt is None or "train" in ckpt)


@cache
def _byte_needle_length(template_json: str) -> int:
    from ropelens import needle

    template = needle.Template(**json.loads(template_json))
    return needle.min_length(_byte_tokens, template, "plain")


def _check_task_lengths(cfg: dict, task: str, who: str) -> None:
    """Every cell of ``task`` (its seed is drawn per length and depth) holds its prompt."""
    from ropelens import tasks

    settings = task_settings(cfg, task)
    counts, overrides = tasks.cell_options(settings)
    depths = task_entry(cfg, task)["depths"]

    def need(n: int) -> int:  # the longest shortest prompt over the depths at length n
        seeds = {tasks.cell_seed(task, n, d, settings.get("seed", 0)) for d in depths}
        return max(
            (tasks.min_length(_byte_tokens, task, s, "plain", counts, overrides) for s in seeds),
            default=0,
        )

    for n in cfg["tasks"]["lengths"]:
        if n < need(n):
            fits = n + 1
            while fits < need(fits):
                fits += 1
            raise ConfigError(
                f"tasks.lengths: {n} tokens is too short for the {task} prompts of {who}, "
                f"which take up to {need(n)} there; the shortest that fits every depth is "
                f"{fits}: remove {n} from tasks.lengths (it defaults to needle.lengths)"
            )


def _check_apply(label: str, entry: dict) -> None:
    """A trained checkpoint saves the method's RoPE; re-applying it must change nothing."""
    name = entry.get("method", label)
    if entry.get("apply", True) and not idempotent(name, method_params(entry), f"methods.{label}"):
        raise ConfigError(
            f"methods.{label}.apply: a continually-pretrained '{name}' checkpoint already carries "
            f"its scaled RoPE and applying '{name}' again at evaluation would scale it twice; "
            "set apply: false"
        )


def idempotent(name: str, params: dict, where: str = "method") -> bool:
    """True if applying method ``name`` to a model that already has it changes nothing.

    A continually-pretrained checkpoint is saved with the method's RoPE; evaluation re-applies the
    method on top, reading theta from the saved config. PI, YaRN, dynamic NTK and Llama 3 keep
    theta and are idempotent; NTK-aware scales theta and is not.
    """
    base = registry.BaseRope(theta=10000.0, head_dim=64, pretrained_length=4096)
    once = registry.resolve(name, params, base, where=where)
    theta = once.rope_parameters.get("rope_theta", base.theta)
    again = registry.resolve(
        name, params, registry.BaseRope(theta, base.head_dim, base.pretrained_length), where=where
    )
    return once == again


# --- synthetic tasks (issue 18): ``tasks:`` -------------------------------------------------------

TASK_COUNTS = {"multi_key": "distractors", "multi_value": "values", "variable_tracking": "hops"}


def _task_defaults(cfg: dict) -> None:
    tasks = cfg["tasks"]
    for key, sub in schema()["properties"]["tasks"]["properties"].items():
        if "default" in sub:
            tasks.setdefault(key, sub["default"])
    tasks.setdefault("haystack", cfg["needle"]["haystack"])
    tasks.setdefault("lengths", list(cfg["needle"]["lengths"]))
    tasks.setdefault("depths", list(cfg["depths"]))


def check_tasks(cfg: dict) -> None:
    """The ``tasks`` block beyond the schema: corpora, lengths, counts that belong to the task,
    templates that format."""
    from ropelens.tasks import FILLER, TEMPLATES

    tasks = cfg["tasks"]
    if not enabled_tasks(cfg):
        raise ConfigError(
            "tasks: no task enabled; add one of passkey, multi_key, multi_value, "
            "variable_tracking (e.g. passkey: {}) or remove tasks"
        )
    extra = [x for x in tasks["lengths"] if x not in cfg["lengths"]]
    if extra:
        raise ConfigError(f"tasks.lengths: {extra[0]} is not in lengths; add it there first")
    for task in enabled_tasks(cfg):
        where, entry = f"tasks.{task}", task_entry(cfg, task)
        hay = entry["haystack"]
        if hay != FILLER and hay not in cfg["corpora"]:
            key = f"{where}.haystack" if "haystack" in (tasks[task] or {}) else "tasks.haystack"
            raise ConfigError(
                f"{key}: '{hay}' is not in corpora; known: {', '.join(cfg['corpora'])} "
                f"(or {FILLER}, the passkey filler)"
            )
        for count in TASK_COUNTS.values():
            if count in entry and TASK_COUNTS.get(task) != count:
                owner = next(t for t, c in TASK_COUNTS.items() if c == count)
                raise ConfigError(
                    f"{where}.{count}: {task} has no {count}; it belongs to {owner}, remove it here"
                )
        labels = [f"{float(d):g}" for d in entry["depths"]]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where}.depths: a depth is listed twice; list each depth once")
        tpl = TEMPLATES[task]
        for field, text in (entry.get("template") or {}).items():
            try:
                text.format(key="k", value="1")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(
                    f"{where}.template.{field}: cannot be filled ({type(e).__name__}: {e}); "
                    "use only {key} and {value} (double braces for literal ones)"
                ) from None
        if task == "variable_tracking" and tpl.chain and "template" in entry:
            chain = entry["template"].get("chain", tpl.chain)
            if "{value}" not in chain or "{key}" not in chain:
                raise ConfigError(
                    f"{where}.template.chain: must contain {{key}} and {{value}} "
                    "(the new variable and the one it copies)"
                )


def load_yaml(path: str | os.PathLike) -> dict:
    """A config file as a dict; a missing, unreadable, empty or malformed file is one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"config file '{path}': cannot be read ({why})") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(f"config file '{path}'{where}: {problem}; fix the YAML there") from None
    if cfg is None:
        raise ConfigError(
            f"config file '{path}' is empty; give models, methods, lengths, corpora and ppl "
            "(see the README), or restore it with `git checkout config.yaml`"
        )
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"config file '{path}': the top level is a {type(cfg).__name__}, not a mapping of keys"
        )
    return cfg


def typed_overrides(overrides) -> dict:
    """``--config key=value`` values with YAML types inside lists and mappings too (Snakemake
    types only the top level: ``--config depths=[0,50]`` would give the strings '0' and '50')."""

    def typed(value):
        if isinstance(value, str):
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError:
                return value
        if isinstance(value, dict):
            return {k: typed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [typed(v) for v in value]
        return value

    return {k: typed(v) if isinstance(v, (dict, list)) else v for k, v in dict(overrides).items()}


def default_config_path(workdir: Path, basedir: Path) -> Path:
    """The config used without ``--configfile``: the working directory's config.yaml, else the
    shipped default next to the Snakefile."""
    here = Path(workdir) / "config.yaml"
    return here if here.exists() else Path(basedir) / "config.yaml"


def export_job_environment(src_dir, python: str | None) -> None:
    """Let jobs run ``python -m ropelens`` from ``src_dir`` (``python``'s folder first on PATH)."""
    paths = [str(src_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if python:
        bins = [str(Path(python).parent)] + os.environ.get("PATH", "").split(os.pathsep)
        os.environ["PATH"] = os.pathsep.join(dict.fromkeys(bins))

"""The cell grid of a prepared config: which cells exist, where their models come from, and what
each cell is handed.

Pure functions of a validated config (:func:`ropelens.config.prepare`); nothing here checks or
fills defaults. ``config`` (and the plan-time checks it calls: ``architectures``, ``preflight``)
import this module; it imports none of them, so the grid has no import cycle.
"""

from __future__ import annotations

ZOO = "resources/zoo"  # where the workflow trains models (rules pretrain / continual)
RESERVED_METHOD_KEYS = ("method", "checkpoints", "cpt_length", "apply", "models", "layer_types")

# Grid-level keys of a cell section: which cells exist and how aggregates draw them, not how a cell
# is computed. Leave them out of a cell rule's params (``settings=q(cell_settings(config, ...))``)
# so that extending the grid (a new length) does not rerun finished cells via the params trigger.
GRID_KEYS = {"attention": ("lengths", "plot_lengths", "reference"), "needle": ("lengths",)}
TASK_GRID_KEYS = ("lengths", "depths", "haystack")  # which cells / which corpus, not how


def method_params(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in RESERVED_METHOD_KEYS}


def model_method_pairs(cfg: dict) -> list[tuple[str, str]]:
    """Every (model, method) pair that has cells."""
    pairs = []
    for label, entry in cfg["methods"].items():
        ckpts = entry.get("checkpoints")
        allowed = list(ckpts) if ckpts else entry.get("models", list(cfg["models"]))
        pairs += [(m, label) for m in cfg["models"] if m in allowed]
    return pairs


def attention_cells(cfg: dict) -> list[tuple[str, str, int]]:
    """(model, method, length) attention cells: every pair at ``attention.lengths``, plus the
    cells the JS references read (``attention.reference``, by default rope at the pretrained
    length)."""
    from ropelens.distributions import reference_cells

    att = cfg["attention"]
    cells = [(m, x, n) for m, x in model_method_pairs(cfg) for n in att["lengths"]]
    return cells + [c for c in reference_cells(cfg) if c not in cells]


def needle_cells(cfg: dict) -> list[tuple[str, str, int, str]]:
    """(model, method, length, depth label) needle cells."""
    labels = [f"{float(d):g}" for d in cfg["depths"]]
    return [
        (m, x, n, d)
        for m, x in model_method_pairs(cfg)
        for n in cfg["needle"]["lengths"]
        for d in labels
    ]


def task_cells(cfg: dict) -> list[tuple[str, str, str, int, str]]:
    """(task, model, method, length, depth label) task cells (none without ``tasks:``)."""
    out = []
    for task in enabled_tasks(cfg):
        labels = [f"{float(d):g}" for d in task_entry(cfg, task)["depths"]]
        for m, x in model_method_pairs(cfg):
            out += [(task, m, x, n, d) for n in cfg["tasks"]["lengths"] for d in labels]
    return out


def enabled_tasks(cfg: dict) -> list[str]:
    from ropelens.tasks import TASKS

    return [t for t in TASKS if t in cfg.get("tasks", {})]


def task_entry(cfg: dict, task: str) -> dict:
    """A task's parameters with the shared ones filled in (haystack, depths)."""
    from ropelens.tasks import FILLER

    shared = cfg["tasks"]
    entry = dict(shared[task] or {})
    entry.setdefault("haystack", FILLER if task == "passkey" else shared["haystack"])
    entry.setdefault("depths", shared["depths"])
    return entry


def task_settings(cfg: dict, task: str) -> dict:
    """What one cell of ``task`` needs (a rule param: without :data:`TASK_GRID_KEYS`)."""
    from ropelens.tasks import TASKS

    shared = {k: v for k, v in cfg["tasks"].items() if k not in TASKS and k not in TASK_GRID_KEYS}
    own = {k: v for k, v in task_entry(cfg, task).items() if k not in TASK_GRID_KEYS}
    return shared | own


def cell_settings(cfg: dict, section: str) -> dict:
    """The ``section`` settings as one cell sees them (without :data:`GRID_KEYS`)."""
    drop = GRID_KEYS.get(section, ())
    return {k: v for k, v in cfg[section].items() if k not in drop}


def model_dir(cfg: dict, model: str) -> str | None:
    """Local directory of a base model the workflow builds itself (None for path/hub models)."""
    if "tiny" in cfg["models"][model]:
        return f"resources/models/{model}"
    if "train" in cfg["models"][model]:
        return f"{ZOO}/{model}/base"
    if "gguf" in cfg["models"][model]:
        return f"resources/gguf/{model}"
    return None


def checkpoint_dir(cfg: dict, model: str, method: str) -> str | None:
    """Local directory of a checkpoint the workflow trains itself (continual pretraining)."""
    ckpt = (cfg["methods"][method].get("checkpoints") or {}).get(model)
    if ckpt is not None and "train" in ckpt:
        return f"{ZOO}/{model}/cpt/{method}"
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
        "layer_types": entry.get("layer_types"),
        "runtime": {k: cfg["runtime"][k] for k in ("device", "dtype")},
    }

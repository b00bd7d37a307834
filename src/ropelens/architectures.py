"""What a model's architecture lets ropelens study, read from its config file alone (plan time).

A model is studied through transformers' ``rope_parameters``: ropelens rewrites them and the
model's own rotary code runs. So the checks are about the config: it has RoPE parameters (GPT-2,
GPT-J and other configs without them are refused), which layer types carry RoPE and with what
rotary dimension, whether ``pretrained_length`` agrees with the config's own lengths, and whether
every method of the grid can be applied (transformers validates the result; Phi-3 gets LongRoPE
factors). Nothing is downloaded: a hub model that is not in the local cache is skipped (the
userpaths checks report missing cache entries). Models the workflow builds (``tiny``, ``train``)
are LLaMA and have no config yet: they are skipped too.

    >>> from transformers import GPTNeoXConfig
    >>> describe(GPTNeoXConfig(hidden_size=64, num_attention_heads=4)).rotary_dims
    {'full_attention': 4}
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

from ropelens import methods
from ropelens.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """What the config says: RoPE layer types with their theta and rotary dimension."""

    model_type: str
    config_class: str
    rope: bool
    reason: str = ""  # why it cannot be studied (rope False)
    nested: bool = False  # per-layer-type RoPE
    thetas: dict = field(default_factory=dict)
    rotary_dims: dict = field(default_factory=dict)
    head_dim: int = 0
    max_positions: int | None = None
    original_positions: int | None = None


def describe(model_config) -> Architecture:
    """The :class:`Architecture` of a transformers config."""
    name = type(model_config).__name__
    kind = getattr(model_config, "model_type", "?")
    layers = methods.rope_layers(model_config)
    reason = _no_rope(model_config, layers)
    if reason:
        return Architecture(kind, name, False, reason)
    thetas, dims = {}, {}
    for layer_type in layers:
        base = methods.base_rope(model_config, 1, layer_type)
        thetas[layer_type], dims[layer_type] = base.theta, base.rotary_dim
    # the pretraining length before the config's own RoPE scaling: in the rope dicts, or (Phi-3)
    # an attribute that transformers reads only for a scaled rope type
    originals = [v.get("original_max_position_embeddings") for v in layers.values()]
    scaled = any(v.get("rope_type", "default") != "default" for v in layers.values())
    original = next((x for x in originals if x), None) or (
        getattr(model_config, "original_max_position_embeddings", None) if scaled else None
    )
    return Architecture(
        kind,
        name,
        True,
        nested=methods.is_nested(model_config),
        thetas=thetas,
        rotary_dims=dims,
        head_dim=methods.head_dim(model_config),
        max_positions=getattr(model_config, "max_position_embeddings", None),
        original_positions=original,
    )


#: model_type -> why its attention cannot be recorded as what the model computes; refused at plan
#: time (tests/test_conformance.py checks each reason against the tiny model)
UNSTUDIED = {
    "gpt_oss": "its attention adds learned sink logits (s_aux) to every softmax, which the "
    "statistics do not model",
    "diffllama": "its attention subtracts two softmaxes per layer (differential attention), "
    "not one distribution per head",
    "minimax": "its linear-attention layers decode differently from its own uncached forward, so "
    "its needle statistics cannot be checked against eager attention",
}


def _no_rope(model_config, layers: dict) -> str:
    """Why the config has no RoPE ropelens can rescale, or cannot be studied ('' when fine)."""
    name = type(model_config).__name__
    why = UNSTUDIED.get(getattr(model_config, "model_type", None))
    if why:
        return f"{name} cannot be studied: {why}"
    if not layers:
        return methods.no_rope_reason(model_config)
    if getattr(model_config, "alibi", False):
        return f"{name} is configured with ALiBi (alibi: true) instead of rotary embeddings"
    kind = getattr(model_config, "position_embedding_type", "rope")
    if kind not in ("rope", "rotary"):
        return f"{name} has position_embedding_type {kind!r}, not rotary embeddings"
    return ""


def check_model(label: str, model_config, pretrained_length: int) -> Architecture:
    """One-line refusals for a model: no RoPE, or ``pretrained_length`` against the config."""
    arch = describe(model_config)
    where = f"models.{label}"
    if not arch.rope:
        advice = "" if arch.model_type in UNSTUDIED else "ropelens studies RoPE models — "
        raise ConfigError(f"{where}: {arch.reason}; {advice}remove it from models")
    if arch.original_positions and pretrained_length != arch.original_positions:
        raise ConfigError(
            f"{where}.pretrained_length: {pretrained_length}, but its config's "
            f"original_max_position_embeddings is {arch.original_positions} (the length it was "
            f"pretrained at before its own RoPE scaling); set pretrained_length: "
            f"{arch.original_positions}"
        )
    longest = None if arch.original_positions else arch.max_positions
    if longest and pretrained_length > longest:
        raise ConfigError(
            f"{where}.pretrained_length: {pretrained_length} exceeds its config's "
            f"max_position_embeddings {longest}; set pretrained_length to the length "
            f"the model was pretrained at (at most {longest})"
        )
    return arch


def check_method(
    label: str, model_config, pretrained_length: int, method: str, entry: dict, lengths=()
):
    """Apply method ``method`` (entry ``entry``) to a copy of the config: one line if it cannot.
    A method that depends on the cell's length (``factor: auto``) is applied at the shortest and
    the longest of ``lengths`` (the factor's two ends)."""
    from ropelens.grid import method_params

    params = method_params(entry)
    at = [min(lengths), max(lengths)] if methods.uses_length(params) and lengths else [None]
    for length in at:
        applied = methods.apply_method(
            copy.deepcopy(model_config),
            entry.get("method", method),
            params,
            pretrained_length,
            layer_types=entry.get("layer_types"),
            where=f"methods.{method}",
            model=f"model '{label}' ({type(model_config).__name__})",
            length=length if length is not None else pretrained_length,
        )
    return applied


def local_config(model: dict, base_dir: str | os.PathLike = "."):
    """The config of a ``path`` or ``hub`` model from disk or the local hub cache; None when it
    cannot be had without a download, a directory has no config.json (``ropelens.preflight``
    names that), or the model is built by the workflow."""
    kwargs = {"revision": model["revision"]} if model.get("revision") else {}
    if "path" in model:
        name = str((Path(base_dir) / model["path"]).expanduser())
        if not (Path(name) / "config.json").is_file():
            return None
    elif "hub" in model:
        from huggingface_hub import try_to_load_from_cache

        name = model["hub"]
        if not isinstance(try_to_load_from_cache(name, "config.json", **kwargs), str):
            return None  # not cached: nothing to check offline (transformers is not even imported)
    else:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        text = str(e).strip()
        why = text.splitlines()[0] if text else type(e).__name__
        raise ConfigError(
            f"model '{name}': its config.json cannot be read by transformers ({why}); "
            "check the model (and the installed transformers version)"
        ) from None


def check(cfg: dict, base_dir: str | os.PathLike = ".") -> None:
    """Plan-time model checks of a validated config (called by ``ropelens.config.check``)."""
    from ropelens.grid import model_method_pairs

    loaded = {}
    for label, model in cfg["models"].items():
        model_config = local_config(model, base_dir)
        if model_config is not None:
            check_model(label, model_config, model["pretrained_length"])
            loaded[label] = model_config
    for label, method in model_method_pairs(cfg):
        entry = cfg["methods"][method]
        ckpt = (entry.get("checkpoints") or {}).get(label)
        if label not in loaded or not entry.get("apply", True):
            continue
        model_config = loaded[label] if ckpt is None else local_config(ckpt, base_dir)
        if model_config is not None:
            pretrained = cfg["models"][label]["pretrained_length"]
            check_method(label, model_config, pretrained, method, entry, cfg["lengths"])

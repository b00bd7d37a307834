"""The one registry of RoPE context-extension methods.

Each method turns the base model's RoPE (theta, head dim, pretrained length) and the user's
parameters into transformers' ``rope_parameters`` (plus, rarely, other config overrides), so that
the model's own RoPE code path runs. Nothing here re-implements rotary embeddings; ``inv_freq``
asks transformers.

    >>> base = BaseRope(theta=10000.0, head_dim=64, pretrained_length=4096)
    >>> spec = resolve("pi", {"factor": 4}, base)
    >>> spec.rope_parameters
    {'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 4.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ropelens.errors import ConfigError


@dataclass(frozen=True)
class BaseRope:
    """What a method needs to know about the base model."""

    theta: float
    head_dim: int
    pretrained_length: int
    partial_rotary_factor: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class RopeSpec:
    """The result of a method: transformers ``rope_parameters`` and other config overrides."""

    rope_parameters: dict
    config_overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[[BaseRope, dict], RopeSpec]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


REGISTRY: dict[str, Method] = {}


def register(name: str, summary: str, required=(), optional=()):
    def deco(fn):
        REGISTRY[name] = Method(name, summary, fn, tuple(required), tuple(optional))
        return fn

    return deco


def known() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(known())}")
    return REGISTRY[name]


def resolve(name: str, params: dict, base: BaseRope, where: str = "method") -> RopeSpec:
    """Check ``params`` for method ``name`` and build its RoPE spec (``where``: the config key)."""
    method = get(name)
    params = dict(params or {})
    allowed = set(method.required) | set(method.optional)
    for key in params:
        if key not in allowed:
            hint = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(
                f"{where}.{key}: not a parameter of method '{name}' (allowed: {hint})"
            )
    for key in method.required:
        if key not in params:
            raise ConfigError(
                f"{where}.{key}: method '{name}' requires '{key}'; add it (e.g. {key}: 4)"
            )
    if "factor" in params:
        factor = params["factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ConfigError(
                f"{where}.factor: must be a number > 1 (got {factor!r}); "
                "use method 'rope' for an unscaled model"
            )
    return method.build(base, params)


def _theta(base: BaseRope, params: dict) -> float:
    return float(params.get("rope_theta", base.theta))


@register("rope", "original RoPE, unchanged (theta may be overridden)", optional=("rope_theta",))
def _rope(base: BaseRope, params: dict) -> RopeSpec:
    return RopeSpec({"rope_type": "default", "rope_theta": _theta(base, params)})


@register("pi", "Position Interpolation: positions divided by factor", required=("factor",))
def _pi(base: BaseRope, params: dict) -> RopeSpec:
    factor = float(params["factor"])
    return RopeSpec({"rope_type": "linear", "rope_theta": base.theta, "factor": factor})


@register("ntk", "NTK-aware: base theta scaled by factor^(d/(d-2))", required=("factor",))
def _ntk(base: BaseRope, params: dict) -> RopeSpec:
    d = base.rotary_dim
    theta = base.theta * float(params["factor"]) ** (d / (d - 2))
    return RopeSpec({"rope_type": "default", "rope_theta": theta})


@register(
    "dynamic-ntk",
    "Dynamic NTK: NTK scaling that grows with the current sequence length",
    required=("factor",),
)
def _dynamic_ntk(base: BaseRope, params: dict) -> RopeSpec:
    # transformers reads the original length from max_position_embeddings for this rope type
    return RopeSpec(
        {"rope_type": "dynamic", "rope_theta": base.theta, "factor": float(params["factor"])},
        {"max_position_embeddings": base.pretrained_length},
    )


@register(
    "yarn",
    "YaRN: NTK-by-parts interpolation with attention temperature 0.1 ln(s) + 1",
    required=("factor",),
    optional=("beta_fast", "beta_slow", "attention_factor"),
)
def _yarn(base: BaseRope, params: dict) -> RopeSpec:
    factor = float(params["factor"])
    rope = {
        "rope_type": "yarn",
        "rope_theta": base.theta,
        "factor": factor,
        "original_max_position_embeddings": base.pretrained_length,
        "beta_fast": float(params.get("beta_fast", 32.0)),
        "beta_slow": float(params.get("beta_slow", 1.0)),
        "truncate": True,
    }
    if "attention_factor" in params:
        rope["attention_factor"] = float(params["attention_factor"])
    # transformers warns unless max_position_embeddings / original == factor
    overrides = {"max_position_embeddings": int(math.ceil(factor * base.pretrained_length))}
    return RopeSpec(rope, overrides)


@register(
    "llama3",
    "Llama 3.1: low frequencies divided by factor, high kept, smooth in between",
    required=("factor",),
    optional=("low_freq_factor", "high_freq_factor"),
)
def _llama3(base: BaseRope, params: dict) -> RopeSpec:
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    if not high > low:
        raise ConfigError(
            f"llama3: high_freq_factor ({high}) must be greater than low_freq_factor ({low})"
        )
    return RopeSpec(
        {
            "rope_type": "llama3",
            "rope_theta": base.theta,
            "factor": float(params["factor"]),
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": base.pretrained_length,
        }
    )


# --- applying a method to a transformers config --------------------------------------------------
# transformers 5 keeps RoPE in ``config.rope_parameters``: one dict for every layer, or (Gemma 3,
# OLMo 3, ...) one dict per layer type, keyed by the names in ``config.layer_types``. A method
# rewrites the dicts of the layer types it targets and keeps what belongs to the architecture.

#: keys of a ``rope_parameters`` dict that describe the architecture, not the context extension
ARCHITECTURE_KEYS = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")
#: rope types a method may replace: plain RoPE and the context extensions themselves
REPLACEABLE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
#: layer types a method scales when the config has per-layer-type RoPE and the method names none.
#: Gemma 3's long-context recipe scaled only its global layers (the local ones see a short window).
DEFAULT_LAYER_TYPES = ("full_attention",)
FLAT = "full_attention"  # the label transformers gives a config's single RoPE dict


def rope_layers(model_config) -> dict:
    """The config's RoPE dicts by layer type: ``{FLAT: dict}`` when one dict serves every layer,
    ``{}`` without RoPE parameters; a per-layer-type ``None`` (a NoPE layer type) is left out."""
    rope = getattr(model_config, "rope_parameters", None) or {}
    if not rope:
        return {}
    nested = model_config.nested_rope_parameter_keys(rope)
    if not nested:
        return {FLAT: rope}
    return {key: rope[key] for key in nested if rope[key] is not None}


def is_nested(model_config) -> bool:
    rope = getattr(model_config, "rope_parameters", None) or {}
    return bool(rope) and bool(model_config.nested_rope_parameter_keys(rope))


def head_dim(model_config) -> int:
    """Head dimension as transformers' RoPE functions read it."""
    return int(
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )


def base_rope(model_config, pretrained_length: int, layer_type: str = FLAT) -> BaseRope:
    """Read theta / head dim / partial rotary of one layer type (before any method is applied)."""
    rope = rope_layers(model_config).get(layer_type) or {}
    theta = rope.get("rope_theta") or getattr(model_config, "rope_theta", None) or 10000.0
    partial = rope.get("partial_rotary_factor") or getattr(
        model_config, "partial_rotary_factor", None
    )
    return BaseRope(
        float(theta), head_dim(model_config), int(pretrained_length), float(partial or 1.0)
    )


def target_layer_types(model_config, requested=None, where: str = "method") -> list[str]:
    """The layer types a method applies to (``requested``: the method entry's ``layer_types``)."""
    layers = rope_layers(model_config)
    if not is_nested(model_config):
        present = sorted(set(getattr(model_config, "layer_types", None) or [FLAT]))
        missing = [t for t in present if requested is not None and t not in requested]
        if missing:
            raise ConfigError(
                f"{where}.layer_types: this model has one RoPE for all its layers "
                f"({', '.join(present)}), so a method cannot leave '{missing[0]}' out; "
                "remove layer_types"
            )
        return [FLAT]
    if requested is None:
        chosen = [t for t in DEFAULT_LAYER_TYPES if t in layers] or sorted(layers)
        return chosen
    unknown = [t for t in requested if t not in layers]
    if unknown:
        raise ConfigError(
            f"{where}.layer_types: '{unknown[0]}' is not a RoPE layer type of this model; "
            f"use some of: {', '.join(sorted(layers))}"
        )
    return list(requested)


def apply(model_config, spec: RopeSpec, layer_type: str = FLAT):
    """Write a RoPE spec into one layer type's dict of a transformers config (in place), keeping
    the architecture's keys (partial rotary, ...), and let transformers validate it."""
    if getattr(model_config, "head_dim", 0) is None:
        # Mixtral's config has head_dim=None: its model derives it, while transformers' yarn and
        # dynamic RoPE functions read the attribute as it is (None * factor)
        model_config.head_dim = head_dim(model_config)
    for key, value in spec.config_overrides.items():
        setattr(model_config, key, value)
    old = rope_layers(model_config).get(layer_type) or {}
    rope = dict(spec.rope_parameters)
    partial = getattr(model_config, "partial_rotary_factor", None)
    for key in ARCHITECTURE_KEYS:
        if key in old:
            rope[key] = old[key]
    if partial is not None and partial != 1.0:
        rope.setdefault("partial_rotary_factor", partial)
    original = rope.get("original_max_position_embeddings")
    if original is not None and hasattr(model_config, "original_max_position_embeddings"):
        # Phi3 & co.: transformers copies this attribute over the dict's value when it standardises
        model_config.original_max_position_embeddings = original
    if is_nested(model_config):
        model_config.rope_parameters = {**model_config.rope_parameters, layer_type: rope}
    else:
        model_config.rope_parameters = rope
    if hasattr(model_config, "validate_rope"):
        model_config.validate_rope()
    return model_config


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_method` did: the layer types it rewrote, and how (``longrope``: the
    method expressed exactly through LongRoPE per-dimension factors, for configs that accept no
    other scaled rope type, e.g. Phi-3)."""

    layer_types: tuple[str, ...]
    expressed_as: str | None = None


def apply_method(
    model_config,
    name: str,
    params: dict,
    pretrained_length: int,
    layer_types=None,
    where: str = "method",
    model: str = "the model",
) -> Applied:
    """Apply method ``name`` to ``model_config`` (in place), per targeted layer type.

    A combination transformers refuses, or that would silently be another method, is one
    :class:`ConfigError` line naming the model, the method and the reason.
    """
    if not rope_layers(model_config):
        raise ConfigError(f"{where}: {model} cannot be studied: {no_rope_reason(model_config)}")
    if getattr(model_config, "is_heterogeneous", False):
        raise ConfigError(
            f"{where}: method '{name}' cannot apply to {model}: its layers have their own configs "
            "(a heterogeneous transformers config), which ropelens does not rescale"
        )
    targets = target_layer_types(model_config, layer_types, where)
    how = None
    for layer_type in targets:
        native = (rope_layers(model_config)[layer_type] or {}).get("rope_type", "default")
        if native not in REPLACEABLE_TYPES:
            raise ConfigError(
                f"{where}: method '{name}' cannot apply to {model}: its {layer_type} layers use "
                f"rope type '{native}', part of the architecture, which the method would replace"
            )
        base = base_rope(model_config, pretrained_length, layer_type)
        spec = resolve(name, params, base, where=where)
        how = _apply_validated(model_config, spec, base, layer_type, name, where, model) or how
    return Applied(tuple(targets), how)


def _apply_validated(model_config, spec, base, layer_type, name, where, model) -> str | None:
    """Apply ``spec``; where the config refuses its rope type, apply its exact LongRoPE form
    instead (returns "longrope"), else raise one line naming model, method and reason."""
    import copy

    keys = ("max_position_embeddings", "original_max_position_embeddings", "rope_parameters")
    saved = {k: copy.deepcopy(getattr(model_config, k)) for k in keys if hasattr(model_config, k)}
    try:
        apply(model_config, spec, layer_type)
        return None
    except (ValueError, KeyError) as e:
        refusal = _first_line(e)
        for key, value in saved.items():
            setattr(model_config, key, value)
    longrope = as_longrope(spec, base)
    if longrope is not None:
        try:
            apply(model_config, longrope, layer_type)
            return "longrope"
        except (ValueError, KeyError):
            for key, value in saved.items():
                setattr(model_config, key, value)
    why = (
        "dynamic NTK changes with the sequence length, which LongRoPE factors cannot express"
        if longrope is None
        else "its LongRoPE form is refused too"
    )
    raise ConfigError(
        f"{where}: method '{name}' cannot apply to {model}: transformers' "
        f"{type(model_config).__name__} refuses rope type '{spec.rope_parameters['rope_type']}' "
        f"({refusal}) and {why}; list the other models in {where}.models"
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip().strip("\"'")
    return text.splitlines()[0] if text else type(e).__name__


def no_rope_reason(model_config) -> str:
    """Why a config without ``rope_parameters`` cannot be studied (one clause)."""
    if getattr(model_config, "rotary_dim", None):
        return (
            f"{type(model_config).__name__} computes its rotary embedding itself from rotary_dim, "
            "outside transformers' rope_parameters, so no method can be applied"
        )
    return f"{type(model_config).__name__} has no rotary position embedding"


def as_longrope(spec: RopeSpec, base: BaseRope) -> RopeSpec | None:
    """``spec`` as LongRoPE parameters when that is exactly the method: a static rescaling of
    every frequency (PI, YaRN, Llama 3) becomes per-dimension factors f_i = theta_i / theta'_i
    with the method's attention factor; NTK-aware is a base change (``default``) and needs none;
    dynamic NTK changes with the sequence length and has no LongRoPE form (None)."""
    rope_type = spec.rope_parameters["rope_type"]
    if rope_type == "dynamic":
        return None
    if rope_type == "default":
        return spec
    inv, attention = formula_inv_freq(spec, base)
    plain, _ = formula_inv_freq(RopeSpec({"rope_type": "default", "rope_theta": base.theta}), base)
    factors = [float(x) for x in (plain.double() / inv.double())]
    rope = {
        "rope_type": "longrope",
        "rope_theta": base.theta,
        "factor": float(spec.rope_parameters["factor"]),
        "short_factor": factors,
        "long_factor": factors,
        "attention_factor": float(attention),
        "original_max_position_embeddings": base.pretrained_length,
    }
    return RopeSpec(rope, {})


def formula_inv_freq(spec: RopeSpec, base: BaseRope):
    """Inverse frequencies and attention factor of ``spec`` by transformers' generic RoPE
    functions, on a LLaMA config with ``base``'s head and rotary dimension (``default`` is linear
    scaling by 1, the generic function that honours partial rotary)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**spec.rope_parameters, "partial_rotary_factor": base.partial_rotary_factor}
    if rope["rope_type"] == "default":
        rope.update(rope_type="linear", factor=1.0)
    shim = LlamaConfig(
        hidden_size=base.head_dim,
        num_attention_heads=1,
        head_dim=base.head_dim,
        max_position_embeddings=spec.config_overrides.get(
            "max_position_embeddings", base.pretrained_length
        ),
        rope_parameters=rope,
    )
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](shim)


# --- what a model computes ------------------------------------------------------------------------


def rotary_module(model):
    """The rotary-embedding module of a loaded model (the first ``*RotaryEmbedding``), or None."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    return None


def inv_freq(model_or_config, layer_type: str = FLAT):
    """Inverse frequencies and attention factor exactly as this architecture computes them: read
    from its own rotary module (a loaded model's, or one built from a config), per layer type."""
    rotary = _rotary_of(model_or_config)
    if rotary is None:
        raise ValueError(f"{type(model_or_config).__name__}: no rotary embedding module found")
    if isinstance(getattr(rotary, "rope_type", None), dict):
        return getattr(rotary, f"{layer_type}_inv_freq"), getattr(
            rotary, f"{layer_type}_attention_scaling"
        )
    return rotary.inv_freq, rotary.attention_scaling


def _rotary_of(model_or_config):
    import torch

    if isinstance(model_or_config, torch.nn.Module):
        return rotary_module(model_or_config)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_or_config)
    meta = rotary_module(skeleton)
    return None if meta is None else type(meta)(meta.config)

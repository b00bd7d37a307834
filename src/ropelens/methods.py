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


def base_rope(model_config, pretrained_length: int) -> BaseRope:
    """Read theta / head dim from a transformers config (before any method is applied)."""
    rope = getattr(model_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") or getattr(model_config, "rope_theta", None) or 10000.0
    head_dim = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads
    )
    partial = rope.get("partial_rotary_factor") or getattr(
        model_config, "partial_rotary_factor", 1.0
    )
    return BaseRope(float(theta), int(head_dim), int(pretrained_length), float(partial or 1.0))


def apply(model_config, spec: RopeSpec):
    """Write a RoPE spec into a transformers config (in place) and return it."""
    for key, value in spec.config_overrides.items():
        setattr(model_config, key, value)
    rope = dict(spec.rope_parameters)
    partial = getattr(model_config, "partial_rotary_factor", None)
    if partial is not None and partial != 1.0:
        rope.setdefault("partial_rotary_factor", partial)
    model_config.rope_parameters = rope
    if hasattr(model_config, "validate_rope"):
        model_config.validate_rope()
    return model_config


def inv_freq(model_config):
    """Inverse frequencies and attention factor exactly as a LLaMA-family model computes them."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(model_config)
    return rotary.inv_freq, rotary.attention_scaling

"""The one registry of RoPE context-extension methods.

Each method turns the base model's RoPE (theta, head dim, pretrained length) and the user's
parameters into transformers' ``rope_parameters`` (plus, rarely, other config overrides), so that
the model's own RoPE code path runs. Nothing here re-implements rotary embeddings; ``inv_freq``
asks transformers. Parameters are checked here (``PARAMETERS``: one line naming the key); a
``factor: auto`` is resolved at each cell's length to s = max(1, L / L0).

    >>> base = BaseRope(theta=10000.0, head_dim=64, pretrained_length=4096)
    >>> spec = resolve("pi", {"factor": 4}, base)
    >>> spec.rope_parameters
    {'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 4.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ropelens.errors import ConfigError


@dataclass(frozen=True)
class BaseRope:
    """What a method needs to know about the base model (``nominal``: a stand-in at plan time,
    before the model's own config is read; checks that need the model wait for it)."""

    theta: float
    head_dim: int
    pretrained_length: int
    partial_rotary_factor: float = 1.0
    nominal: bool = False

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class RopeSpec:
    """The result of a method: transformers ``rope_parameters`` and other config overrides.

    ``factor`` is the scale factor the method used (``factor: auto`` resolved at the cell's
    length), None for methods without one; ``owns`` are architecture keys of ``rope_parameters``
    (see ARCHITECTURE_KEYS) that the method sets itself instead of keeping the model's."""

    rope_parameters: dict
    config_overrides: dict = field(default_factory=dict)
    factor: float | None = None
    owns: tuple[str, ...] = ()
    positions: object = None  # attention-side: a ropelens.positions.PositionMap


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[[BaseRope, dict], RopeSpec]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    paper: str = ""  # where the method comes from (README methods table)
    writes: str = ""  # what it writes into transformers' rope_parameters (README methods table)
    side: str = "frequency"  # frequency: a change of rope_parameters; attention: of positions
    auto_factor: bool = False  # accepts factor: auto (s = max(1, L / L0) per cell)


class ParameterError(Exception):
    """Raised by a method's builder: parameter ``key`` is wrong (``resolve`` names the entry)."""

    def __init__(self, key: str, text: str):
        super().__init__(f"{key}: {text}")
        self.key, self.text = key, text


class Refusal(Exception):
    """Raised by a method's builder: the method cannot apply to this model (one clause why)."""


REGISTRY: dict[str, Method] = {}
AUTO = "auto"  # factor: auto -> s = max(1, L / L0) at each cell's length L
AUTO_NOMINAL = 2.0  # the factor `auto` stands for in plan-time checks without a length


def register(name: str, summary: str, required=(), optional=(), **info):
    """Add a method to the registry (``info``: paper, writes, side, auto_factor); a name registered
    twice is refused, as lm-eval's registry does, instead of silently replacing the first."""

    def deco(fn):
        if name in REGISTRY:
            raise ValueError(
                f"method '{name}' is already registered (by {REGISTRY[name].build.__qualname__}); "
                "choose another name"
            )
        REGISTRY[name] = Method(name, summary, fn, tuple(required), tuple(optional), **info)
        return fn

    return deco


def known() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(known())}")
    return REGISTRY[name]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _is_number(v) and v > 0


def _factor_list(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_positive(x) for x in v)


#: parameter -> (check, what a good value is); ``factor`` is checked by ``resolve`` itself
PARAMETERS = {
    "rope_theta": (_positive, "a number > 0 (the RoPE base)"),
    "beta_fast": (_positive, "a number > 0 (rotations over L0 above which a pair is kept)"),
    "beta_slow": (_positive, "a number > 0 (rotations over L0 below which a pair is interpolated)"),
    "attention_factor": (_positive, "a number > 0 (the scale of cos/sin, i.e. sqrt(1/t))"),
    "low_freq_factor": (_positive, "a number > 0"),
    "high_freq_factor": (_positive, "a number > 0"),
    "p": (lambda v: _is_number(v) and 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "short_factor": (_factor_list, "a list of numbers > 0, one per rotary frequency pair"),
    "long_factor": (_factor_list, "a list of numbers > 0, one per rotary frequency pair"),
    "window": (lambda v: _is_number(v) and v >= 1 and v == int(v), "a whole number >= 1"),
    "group": (lambda v: _is_number(v) and v >= 2 and v == int(v), "a whole number >= 2"),
    "leak": (lambda v: _is_number(v) and v > 1, "a number > 1 (ReRoPE's k: slope 1/k beyond w)"),
    "offset": (
        lambda v: _is_number(v) and v >= 2 and v == int(v),
        "a whole number of tokens >= 2 (STRING's S, e.g. L0 / 3; not a fraction of L0)",
    ),
    "local": (
        lambda v: _is_number(v) and v >= 1 and v == int(v),
        "a whole number of tokens >= 1 (STRING's W, below its offset)",
    ),
    "factors_file": (
        lambda v: isinstance(v, str) and bool(v.strip()),
        "a path to a JSON or YAML file with short_factor and long_factor",
    ),
}
#: what the line about a missing required parameter suggests (else 4)
EXAMPLES = {"rope_theta": 500000, "p": 0.75, "window": 512, "offset": 1365, "local": 128}


def resolve(
    name: str,
    params: dict,
    base: BaseRope,
    where: str = "method",
    length: int | None = None,
    model: str | None = None,
) -> RopeSpec:
    """Check ``params`` for method ``name`` and build its RoPE spec (``where``: the config key;
    ``length``: the cell's length, which ``factor: auto`` needs unless ``base`` is nominal;
    ``model``: how a refusal names the model)."""
    method = get(name)
    params = _checked(method, dict(params or {}), where)
    if params.get("factor") == AUTO:
        if length is None and not base.nominal:
            raise ConfigError(
                f"{where}.factor: auto scales by each cell's length, and none was given; pass the "
                "cell's length (ropelens sets it from --length)"
            )
        s = AUTO_NOMINAL if length is None else max(1.0, length / base.pretrained_length)
        params["factor"] = s
    try:
        spec = method.build(base, params)
    except ParameterError as e:
        raise ConfigError(f"{where}.{e.key}: {e.text}") from None
    except Refusal as e:
        to = f" to {model}" if model else ""
        raise ConfigError(f"{where}: method '{name}' cannot apply{to}: {e}") from None
    factor = params.get("factor")
    return replace(spec, factor=None if factor is None else float(factor))


def _checked(method: Method, params: dict, where: str) -> dict:
    """``params`` with every key allowed, required ones present and values well-typed."""
    name = method.name
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
                f"{where}.{key}: method '{name}' requires '{key}'; add it (e.g. {key}: "
                f"{EXAMPLES.get(key, 4)})"
            )
    for key, value in params.items():
        if key == "factor":
            _check_factor(method, value, where)
        elif key in PARAMETERS and not PARAMETERS[key][0](value):
            raise ConfigError(f"{where}.{key}: must be {PARAMETERS[key][1]} (got {value!r})")
    return params


def _check_factor(method: Method, factor, where: str) -> None:
    if factor == AUTO:
        if not method.auto_factor:
            able = ", ".join(m.name for m in REGISTRY.values() if m.auto_factor)
            raise ConfigError(
                f"{where}.factor: auto (s = max(1, L/L0) per cell) is not available for method "
                f"'{method.name}'; give a number > 1 (auto works with {able})"
            )
        return
    if not _is_number(factor) or not factor > 1:
        auto = ", or factor: auto for max(1, L/L0) per cell" if method.auto_factor else ""
        raise ConfigError(
            f"{where}.factor: must be a number > 1 (got {factor!r}); "
            f"use method 'rope' for an unscaled model{auto}"
        )


def table() -> str:
    """The README's methods table (between its methods markers), from the registry."""
    lines = [
        "| method | side | parameters | transformers `rope_parameters` | what it does | paper |",
        "|---|---|---|---|---|---|",
    ]
    for m in REGISTRY.values():
        params = [f"`{k}`" + (" (or `auto`)" if k == "factor" and m.auto_factor else "")
                  for k in m.required]  # fmt: skip
        params += [f"[`{k}`]" for k in m.optional]
        row = [f"`{m.name}`", m.side, ", ".join(params) or "—", m.writes, m.summary, m.paper]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def uses_length(params: dict | None) -> bool:
    """Whether a method's parameters depend on the cell's length (``factor: auto``)."""
    return (params or {}).get("factor") == AUTO


def _theta(base: BaseRope, params: dict) -> float:
    return float(params.get("rope_theta", base.theta))


PI_PAPER = "Chen et al. 2023, arXiv 2306.15595"
YARN_PAPER = "Peng et al. 2023, arXiv 2309.00071"


@register(
    "rope",
    "original RoPE, unchanged (theta may be overridden)",
    writes="`default`",
    optional=("rope_theta",),
    paper="Su et al. 2021, arXiv 2104.09864",
)
def _rope(base: BaseRope, params: dict) -> RopeSpec:
    return RopeSpec({"rope_type": "default", "rope_theta": _theta(base, params)})


@register(
    "pi",
    "Position Interpolation: positions divided by factor",
    writes="`linear`",
    required=("factor",),
    paper=PI_PAPER,
    auto_factor=True,
)
def _pi(base: BaseRope, params: dict) -> RopeSpec:
    factor = float(params["factor"])
    return RopeSpec({"rope_type": "linear", "rope_theta": base.theta, "factor": factor})


@register(
    "ntk",
    "NTK-aware: base theta scaled by factor^(d/(d-2))",
    writes="`default` with θ·s^(d/(d−2))",
    required=("factor",),
    paper="bloc97 2023 (reddit r/LocalLLaMA); YaRN paper §3.1",
    auto_factor=True,
)
def _ntk(base: BaseRope, params: dict) -> RopeSpec:
    d = base.rotary_dim
    theta = base.theta * float(params["factor"]) ** (d / (d - 2))
    return RopeSpec({"rope_type": "default", "rope_theta": theta})


@register(
    "dynamic-ntk",
    "Dynamic NTK: NTK scaling that grows with the current sequence length",
    writes="`dynamic`",
    required=("factor",),
    paper="emozilla 2023 (reddit r/LocalLLaMA); YaRN paper §3.3",
)
def _dynamic_ntk(base: BaseRope, params: dict) -> RopeSpec:
    # transformers reads the original length from max_position_embeddings for this rope type
    return RopeSpec(
        {"rope_type": "dynamic", "rope_theta": base.theta, "factor": float(params["factor"])},
        {"max_position_embeddings": base.pretrained_length},
    )


def _ramp(base: BaseRope, params: dict, attention_factor=None) -> RopeSpec:
    """transformers' ``yarn`` rope type: the NTK-by-parts ramp, with YaRN's attention factor
    0.1 ln(s) + 1 unless ``attention_factor`` is given."""
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
    if not rope["beta_fast"] > rope["beta_slow"]:
        raise ParameterError(
            "beta_fast", f"must be greater than beta_slow ({rope['beta_slow']:g}); got "
            f"{rope['beta_fast']:g}"
        )  # fmt: skip
    if attention_factor is not None:
        rope["attention_factor"] = float(attention_factor)
    # transformers warns unless max_position_embeddings / original == factor
    overrides = {"max_position_embeddings": int(math.ceil(factor * base.pretrained_length))}
    return RopeSpec(rope, overrides)


@register(
    "yarn",
    "YaRN: NTK-by-parts interpolation with attention temperature 0.1 ln(s) + 1",
    writes="`yarn`",
    required=("factor",),
    optional=("beta_fast", "beta_slow", "attention_factor"),
    paper=YARN_PAPER,
    auto_factor=True,
)
def _yarn(base: BaseRope, params: dict) -> RopeSpec:
    return _ramp(base, params, params.get("attention_factor"))


@register(
    "ntk-by-parts",
    "NTK-by-parts: YaRN's ramp between kept and interpolated pairs, without its temperature",
    writes="`yarn` with `attention_factor` 1",
    required=("factor",),
    optional=("beta_fast", "beta_slow"),
    paper=f"{YARN_PAPER}, §3.2 (ramp as in its reference code)",
    auto_factor=True,
)
def _ntk_by_parts(base: BaseRope, params: dict) -> RopeSpec:
    return _ramp(base, params, attention_factor=1.0)


@register(
    "llama3",
    "Llama 3.1: low frequencies divided by factor, high kept, smooth in between",
    writes="`llama3`",
    required=("factor",),
    optional=("low_freq_factor", "high_freq_factor"),
    paper="Llama 3 herd, Dubey et al. 2024, arXiv 2407.21783",
    auto_factor=True,
)
def _llama3(base: BaseRope, params: dict) -> RopeSpec:
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    if not high > low:
        raise ParameterError(
            "high_freq_factor", f"must be greater than low_freq_factor ({low:g}); got {high:g}"
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


@register(
    "abf",
    "Adjusted base frequency: RoPE with a new base theta (CodeLlama 1e6, Llama 2 Long 5e5)",
    writes="`default` with the new θ",
    required=("rope_theta",),
    paper="Xiong et al. 2023, arXiv 2309.16039; CodeLlama, Rozière et al. 2023, arXiv 2308.12950",
)
def _abf(base: BaseRope, params: dict) -> RopeSpec:
    return RopeSpec({"rope_type": "default", "rope_theta": float(params["rope_theta"])})


@register(
    "longrope",
    "LongRoPE: per-pair rescale factors, long_factor (inline or in factors_file) beyond L0, "
    "short_factor (default 1) within",
    writes="`longrope`",
    required=("factor",),
    optional=("short_factor", "long_factor", "factors_file", "attention_factor"),
    paper="Ding et al. 2024, arXiv 2402.13753 (Phi-3)",
)
def _longrope(base: BaseRope, params: dict) -> RopeSpec:
    short, long = longrope_factors(params)
    n = base.rotary_dim // 2
    for key, factors in (("short_factor", short), ("long_factor", long)):
        if factors is not None and len(factors) != n and not base.nominal:
            raise ParameterError(
                key, f"{len(factors)} factors, but the model rotates {n} frequency pairs "
                f"(rotary dimension {base.rotary_dim}); give {n}"
            )  # fmt: skip
    factor = float(params["factor"])
    rope = {
        "rope_type": "longrope",
        "rope_theta": base.theta,
        "factor": factor,
        # without short factors, RoPE is unchanged up to the pretrained length
        "short_factor": [float(x) for x in short] if short else [1.0] * n,
        "long_factor": [float(x) for x in long],
        "original_max_position_embeddings": base.pretrained_length,
    }
    if "attention_factor" in params:
        rope["attention_factor"] = float(params["attention_factor"])
    overrides = {"max_position_embeddings": int(math.ceil(factor * base.pretrained_length))}
    return RopeSpec(rope, overrides)


def longrope_factors(params: dict) -> tuple[list | None, list]:
    """(short_factor or None, long_factor) of LongRoPE parameters: inline, or from factors_file."""
    if "factors_file" in params:
        if "short_factor" in params or "long_factor" in params:
            raise ParameterError("factors_file", "give the factors inline or in a file, not both")
        loaded = read_factors(params["factors_file"])
        return loaded.get("short_factor"), loaded["long_factor"]
    if "long_factor" not in params:
        raise ParameterError(
            "long_factor", "LongRoPE needs long_factor (one number per rotary frequency pair) "
            "inline, or factors_file"
        )  # fmt: skip
    return params.get("short_factor"), params["long_factor"]


def read_factors(path) -> dict:
    """short_factor / long_factor from a JSON or YAML file: at its top level, or in the
    ``rope_parameters`` / ``rope_scaling`` of a Hugging Face config.json (Phi-3 and LongRoPE)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ParameterError("factors_file", f"'{path}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = getattr(e, "problem", None) or type(e).__name__
        raise ParameterError("factors_file", f"'{path}' cannot be read ({why})") from None
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or "long_factor" not in data:
        raise ParameterError(
            "factors_file", f"'{path}' has no long_factor (at its top level, or in "
            "rope_parameters / rope_scaling); give short_factor and long_factor lists"
        )  # fmt: skip
    out = {k: data[k] for k in ("short_factor", "long_factor") if data.get(k) is not None}
    for key, value in out.items():
        if not _factor_list(value):
            raise ParameterError("factors_file", f"'{path}': {key} is not {PARAMETERS[key][1]}")
    return out


@register(
    "p-rope",
    "p-RoPE: only the fraction p of highest frequencies rotates, the rest carry no position",
    writes="`proportional`",
    required=("p",),
    paper="Barbero et al. 2024, arXiv 2410.06205 (transformers' proportional type, Gemma 4)",
)
def _p_rope(base: BaseRope, params: dict) -> RopeSpec:
    if base.partial_rotary_factor != 1.0:
        raise Refusal(
            f"its heads rotate only a fraction {base.partial_rotary_factor:g} of their "
            "dimensions, and p-RoPE (transformers' proportional type) rotates whole heads"
        )
    rope = {
        "rope_type": "proportional",
        "rope_theta": base.theta,
        "partial_rotary_factor": float(params["p"]),
    }
    return RopeSpec(rope, owns=("partial_rotary_factor",))


# --- attention-side: the model's RoPE kept, positions changed inside ropelens' attention --------


def _positions(base: BaseRope, kind: str, params: dict) -> RopeSpec:
    from ropelens.positions import PositionMap

    window = int(params["window"])
    if window >= base.pretrained_length and not base.nominal:
        raise ParameterError(
            "window", f"{window} is not below the pretrained length {base.pretrained_length}; "
            "the window keeps distances the model was trained on"
        )  # fmt: skip
    group = int(params.get("group", 1))
    leak = float(params["leak"]) if "leak" in params else None
    # the frequencies stay the model's: rope_parameters are left as they are (see apply_method)
    return RopeSpec({}, positions=PositionMap(kind, window, group, leak))


@register(
    "rerope",
    "ReRoPE: distances from the window w on seen as w (or w + (d - w)/leak), normal below",
    required=("window",),
    optional=("leak",),
    paper="Su 2023, github.com/bojone/rerope (leaky ReRoPE: k)",
    writes="unchanged",
    side="attention",
)
def _rerope(base: BaseRope, params: dict) -> RopeSpec:
    return _positions(base, "rerope", params)


@register(
    "self-extend",
    "Self-Extend: distances from the neighbour window w on grouped, floor(i/G) - floor(j/G) + "
    "w - floor(w/G)",
    required=("group", "window"),
    paper="Jin et al. 2024, arXiv 2401.01325",
    writes="unchanged",
    side="attention",
)
def _self_extend(base: BaseRope, params: dict) -> RopeSpec:
    return _positions(base, "self-extend", params)


@register(
    "string",
    "STRING: distances from the offset S on shifted to d - S + W (well-trained small ones "
    "overwrite the rarely trained large ones), normal below",
    required=("offset", "local"),
    paper="An et al. 2024, arXiv 2410.18745 (paper: S ≈ L0/3, W 128)",
    writes="unchanged",
    side="attention",
)
def _string(base: BaseRope, params: dict) -> RopeSpec:
    from ropelens.positions import PositionMap

    offset, local = int(params["offset"]), int(params["local"])
    if not offset > local:
        raise ParameterError(
            "offset", f"{offset} must exceed local ({local}): distances from S on become "
            "d - S + W, which must be shorter than d"
        )  # fmt: skip
    if offset >= base.pretrained_length and not base.nominal:
        raise ParameterError(
            "offset", f"{offset} is not below the pretrained length {base.pretrained_length}; "
            "STRING shifts distances within it (the paper's S is about L0 / 3)"
        )  # fmt: skip
    return RopeSpec({}, positions=PositionMap("string", offset, local=local))


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
        if key in old and key not in spec.owns:
            rope[key] = old[key]
    if partial is not None and partial != 1.0 and "partial_rotary_factor" not in spec.owns:
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
    other scaled rope type, e.g. Phi-3), and the scale factor it used (``factor: auto`` resolved
    at the cell's length; None for methods without a factor)."""

    layer_types: tuple[str, ...]
    expressed_as: str | None = None
    factor: float | None = None
    positions: object = None  # attention-side: the ropelens.positions.PositionMap to install


def apply_method(
    model_config,
    name: str,
    params: dict,
    pretrained_length: int,
    layer_types=None,
    where: str = "method",
    model: str = "the model",
    length: int | None = None,
) -> Applied:
    """Apply method ``name`` to ``model_config`` (in place), per targeted layer type, for a
    cell of ``length`` tokens (needed by ``factor: auto`` only).

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
    if get(name).side == "attention":
        return _apply_positions(model_config, name, params, pretrained_length, where, model)
    targets = target_layer_types(model_config, layer_types, where)
    how, factor = None, None
    for layer_type in targets:
        native = (rope_layers(model_config)[layer_type] or {}).get("rope_type", "default")
        if native not in REPLACEABLE_TYPES:
            raise ConfigError(
                f"{where}: method '{name}' cannot apply to {model}: its {layer_type} layers use "
                f"rope type '{native}', part of the architecture, which the method would replace"
            )
        base = base_rope(model_config, pretrained_length, layer_type)
        spec = resolve(name, params, base, where=where, length=length, model=model)
        how = _apply_validated(model_config, spec, base, layer_type, name, where, model) or how
        factor = spec.factor if factor is None else factor
    return Applied(tuple(targets), how, factor)


def _apply_positions(model_config, name, params, pretrained_length, where, model) -> Applied:
    """An attention-side method: the RoPE is left as it is; one line where the model's rotation
    cannot be moved (``ropelens.positions.layout_problem``)."""
    from ropelens.positions import layout_problem

    base = base_rope(model_config, pretrained_length)
    spec = resolve(name, params, base, where=where, model=model)
    layers = rope_layers(model_config)
    kinds = {t: (r or {}).get("rope_type", "default") for t, r in layers.items()}
    nested = sorted(layers) if is_nested(model_config) else None
    rotary = _rotary_of(model_config)
    problem = layout_problem(model_config, rotary, nested, kinds, head_dim(model_config))
    if problem:
        raise ConfigError(
            f"{where}: method '{name}' cannot apply to {model}: {problem}, so ropelens cannot "
            "move its queries and keys to other positions; list the other models in "
            f"{where}.models"
        )
    return Applied(tuple(sorted(rope_layers(model_config))), None, None, spec.positions)


def _apply_validated(model_config, spec, base, layer_type, name, where, model) -> str | None:
    """Apply ``spec``; where the config refuses its rope type, apply its exact LongRoPE form
    instead (returns "longrope"), else raise one line naming model, method and reason."""
    import copy

    keys = ("max_position_embeddings", "original_max_position_embeddings", "rope_parameters")
    saved = {k: copy.deepcopy(getattr(model_config, k)) for k in keys if hasattr(model_config, k)}
    try:
        apply(model_config, spec, layer_type)
        return None
    except (ValueError, KeyError, TypeError) as e:
        refusal = _first_line(e)
        for key, value in saved.items():
            setattr(model_config, key, value)
    longrope = as_longrope(spec, base)
    if longrope is not None:
        try:
            apply(model_config, longrope, layer_type)
            return "longrope"
        except (ValueError, KeyError, TypeError):
            for key, value in saved.items():
                setattr(model_config, key, value)
    kind = spec.rope_parameters["rope_type"]
    why = (
        "its LongRoPE form is refused too"
        if longrope is not None
        else "dynamic NTK changes with the sequence length, which LongRoPE factors cannot express"
        if kind == "dynamic"
        else f"rope type '{kind}' has no LongRoPE form"
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
    dynamic NTK changes with the sequence length and has no LongRoPE form (None), nor has p-RoPE
    (its zero frequencies), nor LongRoPE itself when the config refused it."""
    rope_type = spec.rope_parameters["rope_type"]
    if rope_type in ("dynamic", "proportional", "longrope"):
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

"""Method registry vs formulas of the PI, NTK-aware, YaRN, NTK-by-parts, Llama-3, ABF, LongRoPE
and p-RoPE papers, written here; per-length factors (factor: auto); the registry's own rules."""

import math

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ropelens import methods
from ropelens.errors import ConfigError

THETA = 10000.0
L0 = 4096
HEAD_DIMS = [64, 128]
FACTORS = [2, 4, 8, 16, 32]
RTOL = 1e-6


def base_freqs(d, theta=THETA):
    return np.array([theta ** (-2 * i / d) for i in range(d // 2)], dtype=np.float64)


def model_freqs(name, params, d, theta=THETA, pretrained=L0):
    heads = 8
    cfg = LlamaConfig(
        hidden_size=d * heads,
        num_attention_heads=heads,
        max_position_embeddings=pretrained,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    spec = methods.resolve(name, params, methods.base_rope(cfg, pretrained))
    methods.apply(cfg, spec)
    inv, attn = methods.inv_freq(cfg)
    return inv.double().numpy(), float(attn), cfg


def assert_rel(actual, expected, rtol=RTOL):
    rel = np.max(np.abs(actual - expected) / np.abs(expected))
    assert rel <= rtol, f"max relative error {rel:.3g} > {rtol}"


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_rope_unchanged(d):
    inv, attn, _ = model_freqs("rope", {}, d)
    assert_rel(inv, base_freqs(d))
    assert attn == 1.0


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", FACTORS)
def test_pi_divides_every_frequency(d, s):
    # Chen et al. 2023: f'(x, m) = f(x, m L / L') -> every theta_i scaled by 1/s
    inv, attn, cfg = model_freqs("pi", {"factor": s}, d)
    assert_rel(inv, base_freqs(d) / s)
    assert attn == 1.0
    assert cfg.rope_parameters["rope_type"] == "linear"


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", FACTORS)
def test_ntk_aware_scales_the_base(d, s):
    # bloc97 2023: b' = b * s^(d / (d - 2))
    inv, attn, cfg = model_freqs("ntk", {"factor": s}, d)
    b = THETA * s ** (d / (d - 2))
    assert_rel(inv, base_freqs(d, b))
    # lowest frequency is interpolated exactly by s, highest is untouched
    assert inv[-1] == pytest.approx(base_freqs(d)[-1] / s, rel=RTOL)
    assert inv[0] == pytest.approx(1.0)
    assert attn == 1.0


def yarn_reference(d, s, L, alpha=1.0, beta=32.0, theta=THETA):
    """YaRN (Peng et al. 2023), NTK-by-parts as in the authors' reference code.

    Dimension pair i rotates r_i = L / lambda_i times over the original context. Dimensions with
    r > beta are extrapolated, r < alpha interpolated by 1/s. Between the two, the reference code
    ramps linearly over the dimension index between the correction dims
    d(r) = d * ln(L / (2 pi r)) / (2 ln theta) (floored / ceiled), which we follow here.
    """
    base = base_freqs(d, theta)
    lo = math.floor(d * math.log(L / (2 * math.pi * beta)) / (2 * math.log(theta)))
    hi = math.ceil(d * math.log(L / (2 * math.pi * alpha)) / (2 * math.log(theta)))
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    out = np.empty_like(base)
    for i, f in enumerate(base):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        out[i] = f * (1 - ramp) + (f / s) * ramp
    mscale = 0.1 * math.log(s) + 1.0  # sqrt(1/t)
    return out, mscale


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", FACTORS)
def test_yarn(d, s):
    inv, attn, _ = model_freqs("yarn", {"factor": s}, d)
    ref, mscale = yarn_reference(d, s, L0)
    assert_rel(inv, ref)
    assert attn == pytest.approx(mscale, rel=RTOL)
    # the paper's boundary conditions: high-frequency dims (r > beta) untouched, low (r < 1) / s
    r = L0 / (2 * math.pi / base_freqs(d))
    assert_rel(inv[r > 32 * 1.5], base_freqs(d)[r > 32 * 1.5])
    assert_rel(inv[r < 1 / 1.5], base_freqs(d)[r < 1 / 1.5] / s)


def test_yarn_custom_betas_and_attention_factor():
    inv, attn, _ = model_freqs(
        "yarn", {"factor": 8, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.5}, 128
    )
    ref, _ = yarn_reference(128, 8, L0, alpha=2, beta=16)
    assert_rel(inv, ref)
    assert attn == 1.5


def llama3_reference(d, s, L, theta, low=1.0, high=4.0):
    """Llama 3.1: wavelengths < L/high kept, > L/low divided by s, smooth in between."""
    out = []
    for f in base_freqs(d, theta):
        wavelen = 2 * math.pi / f
        if wavelen < L / high:
            out.append(f)
        elif wavelen > L / low:
            out.append(f / s)
        else:
            smooth = (L / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / s + smooth * f)
    return np.array(out)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", FACTORS)
def test_llama3(d, s):
    inv, attn, _ = model_freqs("llama3", {"factor": s}, d, theta=500000.0, pretrained=8192)
    assert_rel(inv, llama3_reference(d, s, 8192, 500000.0))
    assert attn == 1.0
    inv, _, _ = model_freqs(
        "llama3", {"factor": s, "low_freq_factor": 2, "high_freq_factor": 8}, d, pretrained=L0
    )
    assert_rel(inv, llama3_reference(d, s, L0, THETA, low=2, high=8))


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", [2, 8])
def test_dynamic_ntk_grows_with_length(d, s):
    _, _, cfg = model_freqs("dynamic-ntk", {"factor": s}, d)
    assert cfg.max_position_embeddings == L0
    for seq_len in (L0 // 2, L0, 2 * L0, 8 * L0):
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, None, seq_len)
        ratio = max(seq_len, L0) / L0
        b = THETA * (s * ratio - (s - 1)) ** (d / (d - 2))
        assert_rel(inv.double().numpy(), base_freqs(d, b))


def test_resolve_rejects_bad_parameters():
    base = methods.BaseRope(THETA, 128, L0)
    with pytest.raises(ConfigError, match=r"methods.pi.factor: method 'pi' requires 'factor'"):
        methods.resolve("pi", {}, base, where="methods.pi")
    for bad in (1, 0.5, -2, True, "4"):
        with pytest.raises(ConfigError, match=r"factor: must be a number > 1"):
            methods.resolve("yarn", {"factor": bad}, base)
    with pytest.raises(ConfigError, match=r"known methods: abf, dynamic-ntk, llama3, "):
        methods.resolve("xpos", {}, base)
    with pytest.raises(ConfigError, match=r"not a parameter of method 'ntk'"):
        methods.resolve("ntk", {"factor": 2, "beta_fast": 3}, base)


def test_apply_is_idempotent():
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=L0)
    spec = methods.resolve("yarn", {"factor": 4}, methods.base_rope(cfg, L0))
    methods.apply(cfg, spec)
    first = dict(cfg.rope_parameters)
    methods.apply(cfg, methods.resolve("yarn", {"factor": 4}, methods.base_rope(cfg, L0)))
    assert cfg.rope_parameters == first


def example_params(name: str, rotary_dim: int, s: float = 4) -> dict:
    """Typical parameters of each registry method at factor ``s`` (LongRoPE: ``rotary_dim / 2``
    long factors rising from 1 to 2s, short factors 1 to 1.5 — not a uniform scaling)."""
    n = rotary_dim // 2
    ramp = [1 + (2 * s - 1) * i / max(n - 1, 1) for i in range(n)]
    return {
        "rope": {},
        "abf": {"rope_theta": 20 * THETA},
        "p-rope": {"p": 0.75},
        "rerope": {"window": 12},
        "self-extend": {"window": 8, "group": 3},
        "string": {"offset": 10, "local": 3},
        "longrope": {
            "factor": s,
            "long_factor": ramp,
            "short_factor": [1 + 0.5 * i / max(n - 1, 1) for i in range(n)],
        },
    }.get(name, {"factor": s})


# --- the methods beyond the paper's: ABF, NTK-by-parts, LongRoPE, p-RoPE ------------------------


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("theta", [5e5, 1e6])
def test_abf_is_a_new_base(d, theta):
    # Xiong et al. 2023 / CodeLlama: theta_i = b'^(-2i/d) with the adjusted base b'
    inv, attn, cfg = model_freqs("abf", {"rope_theta": theta}, d)
    assert_rel(inv, base_freqs(d, theta))
    assert attn == 1.0 and cfg.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", FACTORS)
def test_ntk_by_parts_is_the_ramp_without_temperature(d, s):
    # YaRN paper §3.2: h(theta_i) = (1 - gamma) theta_i / s + gamma theta_i; no attention scaling
    inv, attn, cfg = model_freqs("ntk-by-parts", {"factor": s}, d)
    ref, _ = yarn_reference(d, s, L0)
    assert_rel(inv, ref)
    assert attn == 1.0
    r = L0 / (2 * math.pi / base_freqs(d))
    assert_rel(inv[r > 32 * 1.5], base_freqs(d)[r > 32 * 1.5])
    assert_rel(inv[r < 1 / 1.5], base_freqs(d)[r < 1 / 1.5] / s)
    # the same frequencies as YaRN: only the temperature differs
    yarn_inv, yarn_attn, _ = model_freqs("yarn", {"factor": s}, d)
    assert_rel(inv, yarn_inv)
    assert yarn_attn == pytest.approx(0.1 * math.log(s) + 1)
    inv2, _, _ = model_freqs("ntk-by-parts", {"factor": s, "beta_fast": 16, "beta_slow": 2}, d)
    assert_rel(inv2, yarn_reference(d, s, L0, alpha=2, beta=16)[0])


def longrope_reference(d, factors, s, L, theta=THETA):
    """LongRoPE (Ding et al. 2024): theta_i / lambda_i per pair, and the attention scale
    sqrt(1 + ln s / ln L) of Phi-3 (the paper's choice of t, after YaRN)."""
    lam = np.asarray(factors, dtype=np.float64)
    return base_freqs(d, theta) / lam, math.sqrt(1 + math.log(s) / math.log(L))


def longrope_freqs(cfg, seq_len):
    """The frequencies a LongRoPE model uses at ``seq_len`` (its rotary module picks the short or
    the long factors by the length of the forward)."""
    import torch

    rotary = methods._rotary_of(cfg)
    with torch.no_grad():
        rotary(torch.zeros(1, 1), torch.arange(seq_len)[None])
    return rotary.inv_freq.double().numpy(), float(rotary.attention_scaling)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", [2, 8, 32])
def test_longrope_short_and_long_factors(d, s):
    params = example_params("longrope", d, s)
    inv, attn, cfg = model_freqs("longrope", params, d)
    short, attention = longrope_reference(d, params["short_factor"], s, L0)
    assert_rel(inv, short)  # before any forward, and within L0
    assert attn == pytest.approx(attention, rel=RTOL)
    assert_rel(longrope_freqs(cfg, L0)[0], short)
    long, _ = longrope_reference(d, params["long_factor"], s, L0)
    got, attn = longrope_freqs(cfg, L0 + 1)
    assert_rel(got, long)
    assert attn == pytest.approx(attention, rel=RTOL)
    # without short factors RoPE is unchanged up to L0; attention_factor overrides the default
    only_long = {"factor": s, "long_factor": params["long_factor"], "attention_factor": 1.25}
    inv, attn, cfg = model_freqs("longrope", only_long, d)
    assert_rel(inv, base_freqs(d))
    assert attn == 1.25
    assert_rel(longrope_freqs(cfg, 2 * L0)[0], long)


def test_longrope_factors_from_a_file(tmp_path):
    import json

    from ropelens import config

    d, n = 64, 32
    long = [1.0 + i / 8 for i in range(n)]
    short = [1.0 + i / 64 for i in range(n)]
    # a Phi-3 style config.json (factors in rope_scaling) and a plain YAML file
    scaling = {"type": "longrope", "long_factor": long, "short_factor": short}
    (tmp_path / "phi.json").write_text(json.dumps({"rope_scaling": scaling}))
    (tmp_path / "f.yaml").write_text(f"long_factor: {long}\n")
    for file, want_short in (("phi.json", short), ("f.yaml", [1.0] * n)):
        params = {"factor": 8, "factors_file": str(tmp_path / file)}
        inv, _, _ = model_freqs("longrope", params, d)
        assert_rel(inv, base_freqs(d) / np.array(want_short))
        # a config's file is read at plan time (relative to the workflow) and inlined
        cfg = {
            "models": {"m": {"tiny": {"hidden_size": 128, "heads": 2}, "pretrained_length": 64}},
            "methods": {
                "rope": {},
                "lr": {"method": "longrope", "factor": 8, "factors_file": file},
            },
            "lengths": [64],
            "corpora": {"code": {"builtin": "stdlib"}},
            "ppl": {"corpus": "code"},
            "needle": {"lengths": []},  # 64 tokens cannot hold a needle prompt
        }
        spec = config.cell_spec(config.prepare(cfg, tmp_path), "m", "lr")
        assert spec["params"]["long_factor"] == long and "factors_file" not in spec["params"]
        assert spec["params"].get("short_factor", [1.0] * n) == want_short


def test_longrope_bad_factors_are_one_line(tmp_path):
    base = methods.BaseRope(THETA, 64, L0)
    cases = [
        ({"factor": 4}, r"^methods.lr.long_factor: LongRoPE needs long_factor"),
        ({"factor": 4, "long_factor": [1.0] * 31}, r"^methods.lr.long_factor: 31 factors, but"),
        ({"factor": 4, "long_factor": [1.0, -2.0]}, r"^methods.lr.long_factor: must be a list"),
        ({"factor": 4, "long_factor": "1, 2"}, r"^methods.lr.long_factor: must be a list"),
        ({"long_factor": [1.0] * 32}, r"^methods.lr.factor: method 'longrope' requires"),
        ({"factor": 4, "factors_file": "nope.json"}, r"^methods.lr.factors_file: 'nope.json' does"),
        (
            {"factor": 4, "factors_file": "x.json", "long_factor": [1.0] * 32},
            r"^methods.lr.factors_file: give the factors inline or in a file, not both",
        ),
    ]
    (tmp_path / "empty.json").write_text("{}")
    cases.append(({"factor": 4, "factors_file": str(tmp_path / "empty.json")}, r"has no long_f"))
    for params, match in cases:
        with pytest.raises(ConfigError, match=match):
            methods.resolve("longrope", params, base, where="methods.lr")
    nominal = methods.BaseRope(THETA, 128, L0, nominal=True)  # plan time: the model decides
    methods.resolve("longrope", {"factor": 4, "long_factor": [1.0] * 31}, nominal)


def p_rope_reference(d, p, theta=THETA):
    """p-RoPE (Barbero et al. 2024): the floor(p d / 2) highest frequencies theta^(-2i/d) rotate,
    the lowest d/2 - floor(p d / 2) are set to zero (those dimensions carry no position)."""
    kept = math.floor(p * d / 2)
    return np.array([theta ** (-2 * i / d) if i < kept else 0.0 for i in range(d // 2)])


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("p", [0.25, 0.5, 0.75, 0.9])
def test_p_rope_keeps_the_highest_frequencies(d, p):
    inv, attn, cfg = model_freqs("p-rope", {"p": p}, d)
    ref = p_rope_reference(d, p)
    rotating = ref > 0
    assert_rel(inv[rotating], ref[rotating])
    assert np.all(inv[~rotating] == 0.0) and (~rotating).sum() == d // 2 - math.floor(p * d / 2)
    assert attn == 1.0 and cfg.rope_parameters["rope_type"] == "proportional"


def test_p_rope_refuses_partial_rotary_and_bad_p():
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.25)
    with pytest.raises(ConfigError) as err:
        methods.apply_method(cfg, "p-rope", {"p": 0.5}, L0, where="methods.p", model="neox")
    assert str(err.value).startswith("methods.p: method 'p-rope' cannot apply to neox: its heads")
    assert "\n" not in str(err.value)
    assert cfg.rope_parameters["rope_type"] == "default"  # left as it was
    base = methods.BaseRope(THETA, 64, L0)
    for bad in (0, 1, 1.5, True, "half"):
        with pytest.raises(ConfigError, match=r"^methods.p.p: must be a number between 0 and 1"):
            methods.resolve("p-rope", {"p": bad}, base, where="methods.p")


# --- per-length factors: factor: auto -> s = max(1, L / L0) at each cell ------------------------


@pytest.mark.parametrize("length", [L0 // 2, L0, 3 * L0, 16 * L0])
def test_auto_factor_is_the_cells_length_over_l0(length):
    s = max(1.0, length / L0)
    d = 64
    for name, ref in (
        ("pi", lambda: (base_freqs(d) / s, 1.0)),
        ("ntk", lambda: (base_freqs(d, THETA * s ** (d / (d - 2))), 1.0)),
        ("yarn", lambda: yarn_reference(d, s, L0)),
        ("ntk-by-parts", lambda: (yarn_reference(d, s, L0)[0], 1.0)),
        ("llama3", lambda: (llama3_reference(d, s, L0, THETA), 1.0)),
    ):
        cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, max_position_embeddings=L0)
        applied = methods.apply_method(cfg, name, {"factor": "auto"}, L0, length=length)
        assert applied.factor == s, name  # what the cell records in its factor column
        inv, attn = methods.inv_freq(cfg)
        want_inv, want_attn = ref()
        assert_rel(inv.double().numpy(), want_inv)
        assert float(attn) == pytest.approx(want_attn, rel=RTOL), name


def test_auto_factor_rules():
    base = methods.BaseRope(THETA, 64, L0)
    for name in ("dynamic-ntk", "longrope"):
        params = {**example_params(name, 64), "factor": "auto"}
        with pytest.raises(ConfigError, match=r"^methods.x.factor: auto .* not available for"):
            methods.resolve(name, params, base, where="methods.x")
    with pytest.raises(ConfigError, match=r"^methods.x.factor: auto scales by each cell's length"):
        methods.resolve("pi", {"factor": "auto"}, base, where="methods.x")
    nominal = methods.BaseRope(THETA, 64, L0, nominal=True)
    assert methods.resolve("pi", {"factor": "auto"}, nominal).factor == methods.AUTO_NOMINAL
    with pytest.raises(ConfigError, match=r"^methods.x.factor: must be a number > 1 \(got 'a"):
        methods.resolve("pi", {"factor": "automatic"}, base, where="methods.x")
    # only a length-dependent method's cell spec carries the length (one model for all lengths)
    from ropelens import models

    spec = {"params": {"factor": "auto"}, "apply": True}
    assert models.at_length(spec, 512) == {**spec, "length": 512}
    assert models.at_length({"params": {"factor": 4}}, 512) == {"params": {"factor": 4}}


def test_auto_factor_in_a_config():
    from ropelens import config

    cfg = {
        "models": {"m": {"tiny": {}, "pretrained_length": 64}},
        "methods": {"rope": {}, "pi-auto": {"method": "pi", "factor": "auto"}},
        "lengths": [32, 64, 256],
        "corpora": {"code": {"builtin": "stdlib"}},
        "ppl": {"corpus": "code"},
        "needle": {"lengths": [256]},  # 32 and 64 tokens cannot hold a needle prompt
    }
    assert config.cell_spec(config.prepare(cfg), "m", "pi-auto")["params"] == {"factor": "auto"}
    cfg["methods"]["pi-auto"].update(cpt_length=256, checkpoints={"m": {"hub": "a/b"}})
    with pytest.raises(ConfigError, match=r"^methods.pi-auto.factor: auto scales each cell"):
        config.prepare(cfg)


def test_register_refuses_a_duplicate_name():
    before = dict(methods.REGISTRY)
    with pytest.raises(ValueError, match=r"method 'pi' is already registered"):
        methods.register("pi", "another PI")(lambda base, params: None)
    assert before == methods.REGISTRY


def test_readme_methods_table_is_the_registry():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- methods:start -->", "<!-- methods:end -->"
    assert start in text and end in text, "README lacks the methods table markers"
    shown = text.split(start)[1].split(end)[0].strip()
    assert shown == methods.table(), (
        "README's methods table differs from the registry; paste the output of "
        "`python -c 'from ropelens import methods; print(methods.table())'` between the markers"
    )


# --- architectures: per-layer-type RoPE, partial rotary, refusals (see tests/test_conformance) ---


def gemma3(**kw):
    from transformers import Gemma3TextConfig

    layer_types = ["sliding_attention", "full_attention"]
    return Gemma3TextConfig(
        hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
        layer_types=layer_types, max_position_embeddings=L0, **kw,
    )  # fmt: skip


def test_per_layer_type_default_is_the_global_layers():
    cfg = gemma3()
    applied = methods.apply_method(cfg, "pi", {"factor": 4}, L0)
    assert applied.layer_types == ("full_attention",)
    assert cfg.rope_parameters["full_attention"] == {
        "rope_type": "linear", "rope_theta": 1e6, "factor": 4.0,
    }  # fmt: skip
    assert cfg.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}


def test_per_layer_type_methods_can_name_their_layer_types():
    cfg = gemma3()
    both = ["sliding_attention", "full_attention"]
    applied = methods.apply_method(cfg, "ntk", {"factor": 4}, L0, layer_types=both)
    assert applied.layer_types == tuple(both)
    d = 16
    for layer_type, theta in (("sliding_attention", 1e4), ("full_attention", 1e6)):
        assert cfg.rope_parameters[layer_type]["rope_theta"] == theta * 4 ** (d / (d - 2))
    with pytest.raises(ConfigError, match=r"^methods.x.layer_types: 'global' is not a RoPE layer"):
        methods.apply_method(
            gemma3(), "pi", {"factor": 2}, L0, layer_types=["global"], where="methods.x"
        )


def test_one_rope_for_every_layer_cannot_leave_a_layer_type_out():
    from transformers import Gemma2Config

    cfg = Gemma2Config(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=2)
    with pytest.raises(ConfigError, match=r"one RoPE for all its layers .* 'sliding_attention'"):
        methods.apply_method(cfg, "pi", {"factor": 2}, L0, layer_types=["full_attention"])
    every = ["full_attention", "sliding_attention"]
    assert methods.apply_method(cfg, "pi", {"factor": 2}, L0, layer_types=every).layer_types == (
        "full_attention",
    )


def test_partial_rotary_is_kept_wherever_transformers_keeps_it():
    import copy

    from transformers import GPTNeoXConfig, Phi3Config, StableLmConfig

    for original, partial in (
        (GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.25), 0.25),
        (StableLmConfig(hidden_size=64, num_attention_heads=4), 0.25),
        (Phi3Config(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5), 0.5),
    ):
        for name in methods.known():
            if name == "dynamic-ntk" and isinstance(original, Phi3Config) or name == "p-rope":
                continue  # refused (see test_p_rope_refuses_partial_rotary)
            cfg = copy.deepcopy(original)
            methods.apply_method(cfg, name, example_params(name, int(16 * partial)), L0)
            assert cfg.rope_parameters["partial_rotary_factor"] == partial, (cfg, name)
            inv, _ = methods.inv_freq(cfg)
            assert inv.shape[0] == int(16 * partial) // 2


def test_phi3_dynamic_ntk_is_one_line_and_the_rest_is_longrope():
    from transformers import Phi3Config

    cfg = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=L0)
    with pytest.raises(ConfigError) as err:
        methods.apply_method(cfg, "dynamic-ntk", {"factor": 2}, L0, where="methods.d", model="phi")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("methods.d: method 'dynamic-ntk' cannot apply to phi:")
    assert cfg.rope_parameters["rope_type"] == "default"  # left as it was
    assert methods.apply_method(cfg, "pi", {"factor": 2}, 2 * L0).expressed_as == "longrope"
    assert cfg.rope_parameters["long_factor"] == cfg.rope_parameters["short_factor"] == [2.0] * 8
    assert cfg.original_max_position_embeddings == 2 * L0  # transformers copies this attribute
    inv, attention = methods.inv_freq(cfg)
    assert_rel(inv.double().numpy(), base_freqs(16) / 2)
    assert attention == 1.0


def test_structural_rope_types_and_no_rope_are_refused():
    from transformers import GPT2Config, GPTJConfig

    from ropelens import architectures

    for cfg, reason in (
        (GPT2Config(), "GPT2Config has no rotary position embedding"),
        (GPTJConfig(), "GPTJConfig computes its rotary embedding itself from rotary_dim"),
    ):
        with pytest.raises(ConfigError, match=f"cannot be studied: {reason}"):
            methods.apply_method(cfg, "rope", {}, L0)
        with pytest.raises(ConfigError, match=f"^models.m: {reason}.*remove it from models$"):
            architectures.check_model("m", cfg, L0)
    from transformers import FalconConfig

    with pytest.raises(ConfigError, match=r"^models.f: FalconConfig is configured with ALiBi"):
        architectures.check_model("f", FalconConfig(alibi=True), L0)


def test_pretrained_length_against_the_config():
    from transformers import LlamaConfig, Phi3Config

    from ropelens import architectures

    cfg = LlamaConfig(max_position_embeddings=4096)
    architectures.check_model("m", cfg, 4096)
    architectures.check_model("m", cfg, 2048)  # trained shorter than the config allows: fine
    with pytest.raises(ConfigError, match=r"^models.m.pretrained_length: 8192 exceeds .* 4096;"):
        architectures.check_model("m", cfg, 8192)
    scaled = LlamaConfig(
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    )  # fmt: skip
    architectures.check_model("m", scaled, 8192)
    with pytest.raises(ConfigError, match=r"131072, but .* is 8192 .* set pretrained_length: 8192"):
        architectures.check_model("m", scaled, 131072)
    # Phi-3's original_max_position_embeddings attribute counts only with a scaled rope type
    architectures.check_model("m", Phi3Config(max_position_embeddings=256), 256)


def test_layer_types_in_a_method_entry_reach_the_cell(tmp_path):
    from ropelens import config

    cfg = {
        "models": {"m": {"tiny": {}, "pretrained_length": 64}},
        "methods": {"rope": {}, "pi": {"factor": 2, "layer_types": ["full_attention"]}},
        "lengths": [64],
        "corpora": {"code": {"builtin": "stdlib"}},
        "ppl": {"corpus": "code"},
        "needle": {"lengths": []},  # 64 tokens cannot hold a needle prompt
    }
    out = config.prepare(cfg)
    spec = config.cell_spec(out, "m", "pi")
    assert spec["layer_types"] == ["full_attention"] and spec["params"] == {"factor": 2}
    cfg["methods"]["pi"]["layer_types"] = "full_attention"
    with pytest.raises(
        ConfigError, match=r"methods.pi.layer_types: 'full_attention' is not of type"
    ):
        config.prepare(cfg)


def test_hub_models_are_checked_from_the_cache_only(tmp_path):
    """A hub model in the local cache is checked (GPT-2 refused); one not cached is skipped."""
    import subprocess
    import sys

    import yaml
    from transformers import GPT2Config

    snap = tmp_path / "hub" / "models--org--nope" / "snapshots" / ("0" * 40)
    GPT2Config().save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    cfg = {
        "models": {
            "absent": {"hub": "org/not-cached", "pretrained_length": 4096},
            "nope": {"hub": "org/nope", "pretrained_length": 1024},
        },
        "methods": {"rope": {}},
        "lengths": [64],
        "corpora": {"code": {"builtin": "stdlib"}},
        "ppl": {"corpus": "code"},
    }
    path = tmp_path / "c.yaml"
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for models_, ok in (({"absent": cfg["models"]["absent"]}, True), (cfg["models"], False)):
        path.write_text(yaml.safe_dump({**cfg, "models": models_}))
        proc = subprocess.run(
            [sys.executable, "-m", "ropelens", "check-config", str(path)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert (proc.returncode == 0) == ok, proc.stderr
        if not ok:
            assert proc.stderr.strip() == (
                "ropelens: error: models.nope: GPT2Config has no rotary position embedding; "
                "ropelens studies RoPE models — remove it from models"
            )


def test_methods_config_shares_the_default_toy_base():
    """configs/methods.yaml trains (or reuses) exactly config.yaml's toy base, on the same axes,
    and names every method beyond the paper's."""
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    default = yaml.safe_load((repo / "config.yaml").read_text())
    extra = yaml.safe_load((repo / "configs/methods.yaml").read_text())
    assert extra["models"] == default["models"]
    for key in ("lengths", "depths", "corpora", "ppl", "attention", "needle", "runtime"):
        assert extra[key] == default[key], key
    for label in ("rope", "pi", "yarn"):
        assert extra["methods"][label] == default["methods"][label]
    used = {entry.get("method", label) for label, entry in extra["methods"].items()}
    assert set(methods.known()) - {"dynamic-ntk", "llama3", "ntk"} <= used
    assert any(methods.uses_length(entry) for entry in extra["methods"].values())


def test_auto_factor_cell_records_the_factor_it_used(tmp_path, tiny_model_dir):
    """A PPL cell with factor: auto, run as the workflow runs it (the CLI, --length): its factor
    column and its recorded rope parameters are s = max(1, L / L0) of that cell, and its
    perplexity is the one of PI at that fixed factor."""
    import json

    import pyarrow.parquet as pq

    from ropelens import cli

    from .conftest import tiny_spec, token_table

    tokens = tmp_path / "tokens.parquet"
    pq.write_table(token_table([[(7 * i) % 250 for i in range(200)]]), tokens)
    settings = {"protocol": "truncate", "max_documents": 1, "position_bins": 2}
    nll = {}
    for label, params, length in (
        ("auto", {"factor": "auto"}, 32),
        ("auto", {"factor": "auto"}, 160),
        ("fixed", {"factor": 2.5}, 160),
    ):
        out = tmp_path / f"{label}-{length}.parquet"
        spec = tiny_spec(tiny_model_dir, "pi", params)
        argv = ["ppl", "--spec", json.dumps(spec), "--settings", json.dumps(settings)]
        argv += ["--tokens", str(tokens), "--length", str(length), "--out", str(out)]
        assert cli.main(argv) == 0
        table = pq.read_table(out)
        want = max(1.0, length / 64) if label == "auto" else 2.5
        assert table.column("factor").to_pylist() == [want]
        meta = table.schema.metadata
        assert json.loads(meta[b"ropelens.rope_parameters"])["factor"] == want
        nll[label, length] = table.column("nll_sum").to_pylist()[0]
    assert nll["auto", 160] == pytest.approx(nll["fixed", 160], rel=1e-6)

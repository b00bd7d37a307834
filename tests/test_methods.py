"""Method registry vs formulas of the PI, NTK-aware, YaRN and Llama-3 papers, written here."""

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
    with pytest.raises(
        ConfigError, match=r"known methods: dynamic-ntk, llama3, ntk, pi, rope, yarn"
    ):
        methods.resolve("rerope", {}, base)
    with pytest.raises(ConfigError, match=r"not a parameter of method 'ntk'"):
        methods.resolve("ntk", {"factor": 2, "beta_fast": 3}, base)


def test_apply_is_idempotent():
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=L0)
    spec = methods.resolve("yarn", {"factor": 4}, methods.base_rope(cfg, L0))
    methods.apply(cfg, spec)
    first = dict(cfg.rope_parameters)
    methods.apply(cfg, methods.resolve("yarn", {"factor": 4}, methods.base_rope(cfg, L0)))
    assert cfg.rope_parameters == first

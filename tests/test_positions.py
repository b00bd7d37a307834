"""Attention-side methods (ReRoPE, Self-Extend, STRING): their position maps against the papers'
distances, written here, and the further rotation against the model's own RoPE at explicit
positions. The whole attention against eager attention is in tests/test_conformance.py."""

import math

import pytest
import torch

from ropelens import methods, positions
from ropelens.errors import ConfigError

L0 = 4096


def pairs(n=300):
    i = torch.arange(n)[:, None].expand(n, n)
    j = torch.arange(n)[None, :].expand(n, n)
    keep = i >= j
    return i[keep], j[keep]


@pytest.mark.parametrize("w", [1, 16, 100])
@pytest.mark.parametrize("leak", [None, 2.0, 16.0])
def test_rerope_distances(w, leak):
    # Su 2023: d' = d below w; w beyond (clipped) or w + (d - w) / k (leaky ReRoPE)
    pm = positions.PositionMap("rerope", w, leak=leak)
    i, j = pairs()
    d = (i - j).double()
    far = pm.far_query(i) - pm.far_key(j)
    want = torch.full_like(d, float(w)) if leak is None else w + (d - w) / leak
    torch.testing.assert_close(far, want, rtol=0, atol=1e-9)
    expect = torch.where(d < w, d, want)
    torch.testing.assert_close(pm.distance(d), expect, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("group", "w"), [(2, 8), (4, 16), (8, 100), (3, 7)])
def test_self_extend_distances(group, w):
    # Jin et al. 2024: grouped query position floor(i / G) + w - floor(w / G), key floor(j / G)
    pm = positions.PositionMap("self-extend", w, group=group)
    i, j = pairs()
    far = pm.far_query(i) - pm.far_key(j)
    want = [
        math.floor(a / group) - math.floor(b / group) + w - math.floor(w / group)
        for a, b in zip(i.tolist(), j.tolist(), strict=True)
    ]
    assert far.tolist() == want
    # at the window's edge the grouped distance continues the neighbour one (no jump back)
    edge = (i - j) == w
    assert torch.all(far[edge] >= w - group + 1) and torch.all(far[edge] <= w + 1)


@pytest.mark.parametrize(("offset", "local"), [(2, 1), (85, 16), (100, 99)])
def test_string_distances(offset, local):
    # An et al. 2024 (Fig. 5, position matrix): d below S; from S on, d - S + W
    pm = positions.PositionMap("string", offset, local=local)
    i, j = pairs()
    true = (i - j).tolist()
    want = [d if d < offset else d - offset + local for d in true]
    d = (i - j).double()
    merged = torch.where(d < offset, d, pm.far_query(i) - pm.far_key(j))
    assert merged.tolist() == want and pm.distance(d).tolist() == want
    # over L = 300 tokens the shifted distances run from W to L - 1 - S + W (< L: no new ones)
    shifted = [w for w, t in zip(want, true, strict=True) if t >= offset]
    assert min(shifted) == local and max(shifted) == 299 - offset + local


@pytest.mark.parametrize("config_name", ["LlamaConfig", "Phi3Config", "GPTNeoXConfig"])
def test_rotation_composes_with_the_models_own(config_name):
    """The model rotates q to p; ``rotate`` by p' - p gives the model's own rotation at p'
    (partial rotary included: Phi-3 rotates half of each head, GPT-NeoX a quarter)."""
    import sys

    import transformers

    kw = {"hidden_size": 128, "num_attention_heads": 4, "max_position_embeddings": 256}
    kw.update({"Phi3Config": {"partial_rotary_factor": 0.5}}.get(config_name, {}))
    kw.update({"GPTNeoXConfig": {"rotary_pct": 0.25}}.get(config_name, {}))
    cfg = getattr(transformers, config_name)(**kw)
    rotary = methods._rotary_of(cfg)
    attention = positions._attention_class(cfg)
    apply = sys.modules[attention.__module__].apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 32, generator=g)
    p = torch.tensor([0, 1, 5, 40, 200, 255])
    p2 = torch.tensor([7.0, 0.0, 2.5, 300.0, 13.0, 255.0])  # float positions: leaky ReRoPE's
    with torch.no_grad():
        at_p, _ = apply(x, x, *rotary(x, p[None]))
        at_p2, _ = apply(x, x, *rotary(x, p2[None]))
    moved = positions.rotate(at_p.double(), p2.double() - p.double(), rotary.inv_freq)
    torch.testing.assert_close(moved.float(), at_p2, rtol=0, atol=2e-4)
    assert not torch.allclose(at_p, at_p2, atol=1e-2)


def test_parameters_and_refusals_are_one_line():
    base = methods.BaseRope(10000.0, 64, L0)
    cases = [
        ("rerope", {}, r"^methods.r.window: method 'rerope' requires 'window'"),
        ("rerope", {"window": 0}, r"^methods.r.window: must be a whole number >= 1"),
        ("rerope", {"window": 8.5}, r"^methods.r.window: must be a whole number >= 1"),
        ("rerope", {"window": 64, "leak": 1}, r"^methods.r.leak: must be a number > 1"),
        ("rerope", {"window": L0}, r"^methods.r.window: 4096 is not below the pretrained length"),
        ("self-extend", {"window": 64}, r"^methods.r.group: method 'self-extend' requires"),
        ("self-extend", {"window": 64, "group": 1}, r"^methods.r.group: must be a whole number"),
        ("self-extend", {"window": 64, "group": 4, "leak": 2}, r"not a parameter of method"),
        ("string", {"local": 128}, r"^methods.r.offset: method 'string' requires 'offset'; add"),
        ("string", {"offset": 1365}, r"^methods.r.local: method 'string' requires 'local'"),
        ("string", {"offset": 0.33, "local": 8}, r"^methods.r.offset: must be a whole number of"),
        ("string", {"offset": 1365, "local": 0}, r"^methods.r.local: must be a whole number of"),
        ("string", {"offset": 128, "local": 128}, r"^methods.r.offset: 128 must exceed local"),
        ("string", {"offset": L0, "local": 128}, r"^methods.r.offset: 4096 is not below the pre"),
        ("string", {"offset": 1365, "local": 128, "window": 8}, r"not a parameter of method"),
    ]
    for name, params, match in cases:
        with pytest.raises(ConfigError, match=match):
            methods.resolve(name, params, base, where="methods.r")
    spec = methods.resolve("self-extend", {"window": 512, "group": 8}, base)
    assert spec.positions == positions.PositionMap("self-extend", 512, 8, None)
    assert spec.rope_parameters == {}  # the model's RoPE is left as it is
    spec = methods.resolve("string", {"offset": 1365, "local": 128}, base)
    assert spec.positions == positions.PositionMap("string", 1365, local=128)


def test_architectures_that_cannot_move_positions_are_refused():
    from transformers import (
        CohereConfig,
        DeepseekV2Config,
        LlamaConfig,
        Phi3Config,
        SmolLM3Config,
    )

    kw = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 256}
    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    for cfg, why in (
        (CohereConfig(**kw), "another layout than rotate-half"),
        (DeepseekV2Config(**kw), "multi-head latent attention"),
        (SmolLM3Config(**kw, num_hidden_layers=2, no_rope_layers=[1, 0]), "layers without RoPE"),
        (LlamaConfig(**kw, rope_parameters=dynamic), "changes with the sequence length"),
    ):
        with pytest.raises(ConfigError) as err:
            methods.apply_method(
                cfg, "rerope", {"window": 32}, 256, where="methods.r", model="model 'm'"
            )
        text = str(err.value)
        assert text.startswith("methods.r: method 'rerope' cannot apply to model 'm': ")
        assert why in text and "\n" not in text, text
    for cfg in (LlamaConfig(**kw), Phi3Config(**kw, partial_rotary_factor=0.5)):
        before = dict(cfg.rope_parameters)
        applied = methods.apply_method(cfg, "self-extend", {"window": 32, "group": 4}, 256)
        assert applied.positions.kind == "self-extend" and cfg.rope_parameters == before


def test_attention_side_methods_are_training_free():
    from ropelens import config

    cfg = {
        "models": {"m": {"tiny": {}, "pretrained_length": 64}},
        "methods": {
            "rope": {},
            "se": {
                "method": "self-extend", "group": 4, "window": 16, "cpt_length": 256,
                "checkpoints": {"m": {"train": {"corpus": "code", "steps": 2}}},
            },
        },
        "lengths": [64],
        "corpora": {"code": {"builtin": "stdlib"}},
        "ppl": {"corpus": "code"},
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"^methods.se.checkpoints.m.train: 'self-extend' chan"):
        config.prepare(cfg)

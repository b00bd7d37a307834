"""Conformance matrix: every architecture of tests/archs.py, checked against an independent
reference (eager attention, a plain transformers load). Adding an architecture is one line there."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ropelens import architectures, methods, models
from ropelens.errors import ConfigError
from tests import archs
from tests.test_methods import (
    base_freqs,
    example_params,
    llama3_reference,
    longrope_reference,
    p_rope_reference,
    yarn_reference,
)

NAMES = [a.name for a in archs.ARCHS]


@pytest.mark.parametrize("name", NAMES)
def test_arch_builds_peaked_and_round_trips(name, tmp_path):
    """Every entry builds from its config class, runs a forward, has peaked attention on every
    layer (mean max probability at least twice its unpeaked value and 2.5x uniform), and loads back
    from the directory ``archs.write`` saves with the same logits."""
    from transformers import AutoModelForCausalLM

    model = archs.build(name)
    flat = archs.max_attention(archs.build(name, peaked=False))
    peaked = archs.max_attention(model)
    uniform = float(torch.mean(1.0 / torch.arange(1, 49)))
    assert len(peaked) == len(archs.attention_layers(model))
    for p, f in zip(peaked, flat, strict=True):
        assert p > 2.0 * uniform and p > 1.5 * f, (peaked, flat, uniform)
    out = archs.write(name, tmp_path / name)
    again = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.arange(40)[None] % 256
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert (out / "tokenizer.json").exists()


def test_table_covers_what_the_issue_names():
    need = {"llama", "llama-gqa", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}
    need |= {"gpt-neox", "stablelm", "phi", "glm", "glm4", "olmo2", "cohere", "granite"}
    need |= {"deepseek-v2", "deepseek-v3", "gpt2"}
    assert need <= set(NAMES)
    assert [a.name for a in archs.ARCHS if not a.has_rope] == ["gpt2"]
    for a in archs.ARCHS:
        cfg = a.make_config()
        if a.sliding:
            assert cfg.sliding_window == archs.WINDOW
        types = getattr(cfg, "layer_types", None)
        if a.sliding and types is not None:
            assert {"sliding_attention", "full_attention"} <= set(types), a.name
        if a.softcap:
            assert cfg.attn_logit_softcapping is not None
        if a.mla:
            assert cfg.v_head_dim != cfg.qk_head_dim


# --- methods: every RoPE architecture x every registry method ----------------------------------
# The model's own rotary module (loaded through ropelens.models.load from a local directory) is
# compared with the method's formula, written independently here (tests/test_methods.py) over the
# architecture's *rotary* dimension; the layer types a method must leave alone are unchanged.

P = archs.BASE["max_position_embeddings"]  # pretrained length of every tiny model
S = 4  # a typical factor
DYNAMIC_AT = 4 * P  # dynamic NTK and LongRoPE are checked after a forward at this many positions
PARTIAL = "it rotates whole heads and this architecture rotates part of each (partial rotary)"
#: (architecture, method) -> (the reason it is refused, at plan time in one line; words of that
#: line); every other combination of a RoPE architecture with a registry method must pass the
#: formula checks
REFUSED = {
    ("phi3", "dynamic-ntk"): (
        "Phi3Config takes only default or LongRoPE, and LongRoPE cannot express a scaling that "
        "grows with the sequence length",
        "LongRoPE factors cannot express",
    ),
    # PhiMoE needs short_mscale / long_mscale for any rope type but default (its rotary module
    # then scales by them instead of the method's attention factor, and recomputes frequencies
    # from the config on every forward): refused, as transformers' line says
    **{
        ("phimoe", m): (
            "PhimoeConfig refuses a scaled rope type without short_mscale (its LongRoPE form too)",
            "short_mscale field must be a number",
        )
        for m in ("pi", "dynamic-ntk", "yarn", "ntk-by-parts", "llama3", "longrope", "p-rope")
    },
    **{
        (a.name, "p-rope"): (PARTIAL, "heads rotate only a fraction")
        for a in archs.ROPE_ARCHS
        if a.partial_rotary
    },
}
#: architectures whose queries and keys an attention-side method cannot move -> words of the line
CANNOT_MOVE = {
    **{n: "another layout than rotate-half" for n in ("glm", "glm4", "cohere")},
    **{n: "another layout than rotate-half" for n in ("helium", "ernie4.5")},
    **{n: "multi-head latent attention" for n in ("deepseek-v2", "deepseek-v3")},
    **{n: "layers without RoPE" for n in ("smollm3", "llama4")},
    **{n: "RoPE on some of its layers only" for n in ("exaone4", "cohere2")},
    **{n: "RoPE under a condition" for n in ("falcon", "falcon-40b")},  # not with ALiBi
    **{n: "multi-head latent attention" for n in ("minicpm3",)},
}
ATTENTION_SIDE = [m for m in methods.known() if methods.REGISTRY[m].side == "attention"]
FREQUENCY_SIDE = [m for m in methods.known() if m not in ATTENTION_SIDE]
for _name, _why in CANNOT_MOVE.items():
    for _m in ATTENTION_SIDE:
        REFUSED[(_name, _m)] = (f"its RoPE cannot be moved ({_why})", _why)
NO_ROPE = {a.name: "no rotary position embedding" for a in archs.ARCHS if not a.has_rope}
#: architectures refused as a whole (ropelens.architectures.UNSTUDIED) -> the reason
UNSTUDIED = {
    a.name: architectures.UNSTUDIED[a.make_config().model_type] for a in archs.REFUSED_ARCHS
}


def params_of(name: str, method: str) -> dict:
    """The method's parameters on architecture ``name`` (LongRoPE: one factor per rotary pair)."""
    arch = archs.BY_NAME[name]
    return example_params(method, rotary_dim(arch) if arch.has_rope else 2, S)


#: how a method is written into transformers where not its own rope type
EXPRESSED = {("phi3", m): "longrope" for m in ("pi", "yarn", "ntk-by-parts", "llama3")}
ROPE_NAMES = [a.name for a in archs.ROPE_ARCHS]
PASSING = [(a, m) for a in ROPE_NAMES for m in FREQUENCY_SIDE if (a, m) not in REFUSED]
MOVING = [(a, m) for a in ROPE_NAMES for m in ATTENTION_SIDE if (a, m) not in REFUSED]


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory):
    """The local directory of an architecture's tiny model, written once per session."""
    root, done = tmp_path_factory.mktemp("archs"), {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = archs.write(name, root / name)
        return done[name]

    return get


def spec_of(directory, name: str, method: str, **extra) -> dict:
    return {
        "model": name,
        "method": method,
        "source": {"path": str(directory)},
        "pretrained_length": P,
        "registry": method,
        "params": params_of(name, method),
        "runtime": {"device": "cpu", "dtype": "float32"},
        **extra,
    }


def rotary_dim(arch) -> int:
    kw = arch.config_kwargs()
    head = kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
    return arch.rotary_dim or head


def base_thetas(arch) -> dict:
    """theta per RoPE layer type, from the config as its class builds it (before any method)."""
    return {t: float(r["rope_theta"]) for t, r in methods.rope_layers(arch.make_config()).items()}


def formula(method: str, d: int, theta: float):
    """(inverse frequencies, attention factor) of ``method`` at factor S, pretrained length P
    (with the parameters of ``example_params``)."""
    params = example_params(method, d, S)
    if method == "rope":
        return base_freqs(d, theta), 1.0
    if method == "abf":
        return base_freqs(d, params["rope_theta"]), 1.0
    if method == "p-rope":
        return p_rope_reference(d, params["p"], theta), 1.0
    if method == "longrope":  # after a forward over DYNAMIC_AT > P positions: the long factors
        return longrope_reference(d, params["long_factor"], S, P, theta)
    if method == "ntk-by-parts":
        return yarn_reference(d, S, P, theta=theta)[0], 1.0
    if method == "pi":
        return base_freqs(d, theta) / S, 1.0
    if method == "ntk":
        return base_freqs(d, theta * S ** (d / (d - 2))), 1.0
    if method == "dynamic-ntk":  # after a forward over DYNAMIC_AT positions
        grown = theta * (S * DYNAMIC_AT / P - (S - 1)) ** (d / (d - 2))
        return base_freqs(d, grown), 1.0
    if method == "yarn":
        return yarn_reference(d, S, P, theta=theta)
    if method == "llama3":
        return llama3_reference(d, S, P, theta), 1.0
    raise AssertionError(f"no reference formula for method {method!r}: add one here")


def model_rope(model, layer_type: str, method: str):
    """The loaded model's inverse frequencies and attention factor for ``layer_type``."""
    if method in ("dynamic-ntk", "longrope"):
        rotary = methods.rotary_module(model)
        x, pos = torch.zeros(1, 1), torch.arange(DYNAMIC_AT)[None]
        kwargs = {"layer_type": layer_type} if isinstance(rotary.rope_type, dict) else {}
        with torch.no_grad():
            rotary(x, pos, **kwargs)
    inv, attention = methods.inv_freq(model, layer_type)
    return inv.double().numpy(), float(attention)


def assert_rel(actual, expected, what: str, rtol: float = 1e-6):
    """Relative error <= rtol; where the formula has a zero frequency (p-RoPE), exactly zero."""
    n, m = actual.shape[0], expected.shape[0]
    assert n == m, f"{what}: {n} frequencies, expected {m} (rotary dimension / 2)"
    zero = expected == 0
    assert np.all(actual[zero] == 0), f"{what}: frequencies that must be zero are not"
    actual, expected = actual[~zero], expected[~zero]
    rel = float(np.max(np.abs(actual - expected) / np.abs(expected)))
    assert rel <= rtol, f"{what}: max relative error {rel:.3g} > {rtol}"


@pytest.mark.parametrize(("name", "method"), PASSING)
def test_method_is_its_formula_over_the_rotary_dimension(name, method, arch_dir):
    """Each layer type's inverse frequencies and attention factor, as the architecture's own
    rotary module computes them after ropelens applied the method, equal the method's formula
    over the rotary dimension (<= 1e-6); layer types the method must not touch are plain RoPE."""
    arch = archs.BY_NAME[name]
    loaded = models.load(spec_of(arch_dir(name), name, method), attn_implementation="eager")
    thetas, d = base_thetas(arch), rotary_dim(arch)
    targets = loaded.rope["layer_types"]
    assert targets == (["full_attention"] if arch.layer_type_rope else [methods.FLAT])
    assert loaded.rope["expressed_as"] == EXPRESSED.get((name, method))
    for layer_type, theta in thetas.items():
        touched = layer_type in targets
        inv, attention = model_rope(loaded.model, layer_type, method if touched else "rope")
        ref, ref_attention = formula(method if touched else "rope", d, theta)
        assert_rel(inv, ref, f"{name} {method} {layer_type}")
        assert attention == pytest.approx(ref_attention, rel=1e-6), (layer_type, attention)


@pytest.mark.parametrize("name", [n for n in ROPE_NAMES if (n, "yarn") not in REFUSED])
def test_auto_factor_is_applied_at_the_cells_length(name, arch_dir):
    """``factor: auto`` (s = max(1, L / P)) through a cell spec at length L: YaRN at 8P is YaRN at
    factor 8, PI at P / 2 is plain RoPE; the recorded factor is the one used."""
    arch = archs.BY_NAME[name]
    thetas, d = base_thetas(arch), rotary_dim(arch)
    for method, length, s in (("yarn", 8 * P, 8.0), ("pi", P // 2, 1.0)):
        spec = spec_of(arch_dir(name), name, method)
        spec = models.at_length({**spec, "params": {"factor": "auto"}}, length)
        loaded = models.load(spec, attn_implementation="eager")
        assert loaded.rope["factor"] == s
        for layer_type, theta in thetas.items():
            touched = layer_type in loaded.rope["layer_types"]
            inv, attention = model_rope(loaded.model, layer_type, "rope")
            if not touched or s == 1.0:
                ref, ref_attention = base_freqs(d, theta), 1.0
            else:
                ref, ref_attention = yarn_reference(d, s, P, theta=theta)
            assert_rel(inv, ref, f"{name} {method} auto at {length} {layer_type}")
            assert attention == pytest.approx(ref_attention, rel=1e-6)


def test_gemma3_keeps_its_per_layer_type_thetas():
    thetas = base_thetas(archs.BY_NAME["gemma3"])
    assert thetas == {"sliding_attention": 10000.0, "full_attention": 1000000.0}


@pytest.mark.parametrize("name", ROPE_NAMES)
def test_rope_is_a_plain_transformers_load(name, arch_dir):
    """Method ``rope`` leaves the model as transformers loads it (logits within 1e-6)."""
    from transformers import AutoModelForCausalLM

    directory = arch_dir(name)
    loaded = models.load(spec_of(directory, name, "rope"), attn_implementation="eager")
    plain = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    ids = (torch.arange(3 * P // 2)[None] * 7) % 256
    with torch.no_grad():
        ours, theirs = loaded.model(ids).logits, plain(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert loaded.model.config.rope_parameters == plain.config.rope_parameters


# --- refusals at plan time, one line each ------------------------------------------------------


def grid(models_: dict, methods_: dict) -> dict:
    return {
        "models": models_,
        "methods": methods_,
        "lengths": [P],
        "corpora": {"code": {"builtin": "stdlib"}},
        "ppl": {"corpus": "code"},
    }


REFUSALS = [(a, m) for a in NO_ROPE for m in methods.known()] + list(REFUSED)


@pytest.mark.parametrize(("name", "method"), REFUSALS)
def test_refused_at_plan_time_in_one_line(name, method, arch_dir):
    from ropelens import config

    entry = {name: {"path": str(arch_dir(name)), "pretrained_length": P}}
    with pytest.raises(ConfigError) as err:
        config.prepare(grid(entry, {"rope": {}, method: params_of(name, method)}))
    text = str(err.value)
    assert "\n" not in text and (f"model '{name}'" in text or f"models.{name}" in text), text
    if name in NO_ROPE:
        assert text.startswith(f"models.{name}: ") and "no rotary position embedding" in text
    else:
        assert text.startswith(f"methods.{method}: method '{method}' cannot apply to model")
        assert REFUSED[(name, method)][1] in text, text


def test_check_config_prints_the_refusal_as_one_line(arch_dir, tmp_path):
    import yaml

    entry = {n: {"path": str(arch_dir(n)), "pretrained_length": P} for n in ("phi3", "gpt2")}
    for name, methods_ in (
        ("gpt2", {"rope": {}}),
        ("phi3", {"rope": {}, "dynamic-ntk": {"factor": S}}),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(grid({name: entry[name]}, methods_)))
        proc = subprocess.run(
            [sys.executable, "-m", "ropelens", "check-config", str(path)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ropelens: error: "), proc.stderr
        assert f"models.{name}" in lines[0] or f"model '{name}'" in lines[0], lines[0]
        assert "Traceback" not in proc.stderr


# --- attention: statistics and logits under ropelens' attention equal the model's own ----------

ROPE = [a.name for a in archs.ROPE_ARCHS]
LENGTH = 40  # prefill queries: longer than the sliding window (16)
NEEDLE_LENGTH = 96  # needle prompt: the shortest the default template fits, 6 windows long
TOL = 1e-4
HAYSTACK = ["The quick brown fox jumps over the lazy dog. It was a sunny day.\n"]


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest)


@pytest.fixture(params=[True, False], ids=["rowstats", "torch-ops"])
def kernel(request, monkeypatch):
    """CPU chunks reduce rows with the compiled kernel or with torch operations (other devices)."""
    from ropelens import attention as att

    monkeypatch.setattr(att, "_work", 0)  # this process's work so far (state, not a choice)
    with att.use_paths(row_kernel=request.param, row_kernel_min_work=0 if request.param else 2**62):
        yield


def load_plain(model_dir, name: str):
    """The model as a ropelens cell loads it (no method applied: attention is the subject)."""
    return models.load(spec_of(model_dir, name, "rope", apply=False))


def eager(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def eager_probs(model, seq) -> dict:
    """Layer index -> (heads, queries, keys) float64 eager attention of one uncached forward,
    for every attention layer (a hybrid's recurrent or convolution layers have none)."""
    with torch.no_grad():
        out = model(torch.tensor([seq]), output_attentions=True, use_cache=False)
    return by_layer(model, out.attentions)


def by_layer(model, attentions) -> dict:
    """Layer index -> (heads, queries, keys) float64 of a forward's ``attentions``."""
    probs = [a[0].double().numpy() for a in attentions]
    layers = archs.attention_layers(model)
    if len(probs) == model.config.num_hidden_layers:  # one per layer (MiniMax: linear ones too)
        return {i: probs[i] for i in layers}
    return dict(zip(layers, probs, strict=True))


def reference(probs, spec, queries):
    """Statistics from eager probabilities at absolute positions, per layer and head, over the
    ``queries``: (q, total) pairs, query q seeing keys 0..q of the ``total`` keys of its call (a
    prefill of L: total L; a decoding step: q + 1), position bins of k / total."""
    rows = []
    for layer, a in probs.items():
        for h in range(a.shape[0]):
            ent, pos, dist, span, last = [], 0.0, 0.0, 0.0, math.nan
            for q, total in queries:
                p = a[h, q, :total]
                assert abs(p.sum() - 1) < 1e-5 and p[q + 1 :].sum() == 0
                e = float(-(p[p > 0] * np.log(p[p > 0])).sum())
                ent.append(e)
                last = e
                pb = np.zeros(spec.position_bins)
                np.add.at(pb, (np.arange(total) * spec.position_bins) // total, p)
                d = q - np.arange(q + 1)
                bins = np.where(d == 0, 0, np.floor(np.log2(np.maximum(d, 1))) + 1).astype(int)
                db = np.zeros(spec.distance_bins)
                np.add.at(db, np.minimum(bins, spec.distance_bins - 1), p[: q + 1])
                sm = np.array([p[max(s, 0) : max(min(t, total), 0)].sum() for s, t in spec.spans])
                pos, dist, span = pos + pb, dist + db, span + sm
            n = len(ent)
            rows.append(
                dict(
                    layer=layer,
                    head=h,
                    n_queries=n,
                    entropy_mean=float(np.mean(ent)),
                    entropy_last=last,
                    pos_mass=pos / n,
                    dist_mass=dist / n,
                    span_mass=span / n,
                )
            )
    return rows


def assert_matches(table, ref, keys=("pos_mass", "dist_mass", "span_mass")):
    got = table.to_pylist()
    assert [(g["layer"], g["head"], g["n_queries"]) for g in got] == [
        (r["layer"], r["head"], r["n_queries"]) for r in ref
    ]
    for g, r in zip(got, ref, strict=True):
        for k in ("entropy_mean", "entropy_last"):
            assert abs(g[k] - r[k]) < TOL, (g["layer"], g["head"], k, g[k], r[k])
        for k in keys:
            np.testing.assert_allclose(g[k], r[k], atol=TOL, rtol=0, err_msg=k)


def prompt_ids(length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=g).tolist()


@pytest.mark.parametrize("name", ROPE)
def test_attention_cell_statistics_equal_eager(name, arch_dir, kernel):
    """Prefill statistics (recorder with spans, in several chunks; and an attention cell through
    distributions.measure) equal eager attention on every layer, sliding ones included."""
    from ropelens import distributions
    from ropelens.attention import StatsSpec, record_attention

    from .conftest import token_table

    d = arch_dir(name)
    model = load_plain(d, name).model
    seq = prompt_ids(LENGTH)
    probs = eager_probs(eager(d), seq)
    spec = StatsSpec(
        position_bins=8,
        distance_bins=7,
        spans=[(3, 9), (20, 37), (30, 90)],
        query_start=10,
        memory_budget_bytes=40_000,  # several chunks per layer
    )
    with torch.no_grad(), record_attention(model, spec) as rec:
        model(torch.tensor([seq]))
    assert rec.chunks > 2 * len(archs.attention_layers(model))
    queries = [(q, LENGTH) for q in range(10, LENGTH)]
    assert_matches(rec.table(), reference(probs, spec, queries))
    # the attention cell: last half of the document's queries, position and distance bins
    settings = dict(
        documents=1, query_fraction=0.5, position_bins=8, distance_bins=7, memory_budget_mb=1
    )
    table, n = distributions.measure(model, token_table([seq]), LENGTH, settings)
    cell_spec = StatsSpec(position_bins=8, distance_bins=7)
    ref = reference(probs, cell_spec, [(q, LENGTH) for q in range(LENGTH // 2, LENGTH)])
    assert n == 1
    assert_matches(table, ref, keys=("pos_mass", "dist_mass"))


@pytest.mark.parametrize("name", ROPE)
def test_needle_decoding_statistics_equal_eager(name, arch_dir, kernel):
    """A needle cell (prompt 6 sliding windows long, greedy decoding with the KV cache) records
    every answering query on every layer, with entropy and needle-span mass equal to eager
    attention of one uncached forward over prompt + fed tokens, at absolute positions."""
    from ropelens import needle, retrieval

    d = arch_dir(name)
    loaded = load_plain(d, name)
    tok, length, new = loaded.tokenizer, NEEDLE_LENGTH, 5
    settings = {"seed": 3, "max_new_tokens": new, "memory_budget_mb": 1}
    rows = retrieval.run_cell(loaded.model, tok, HAYSTACK, length, 50, settings)
    assert rows["status"][0] == "ok", rows["error"]
    prompt = needle.build_prompt(tok, HAYSTACK, length, 50, needle.cell_seed(length, 50, 3))
    # independent greedy decoding: uncached eager forwards over the whole sequence
    ref_model, seq, fed = eager(d), list(prompt.input_ids), 0
    for _ in range(new):
        with torch.no_grad():
            nxt = int(ref_model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
        fed += 1
        if nxt == tok.eos_token_id:
            break
        seq.append(nxt)
    assert rows["generated"][0] == tok.decode(seq[length:])
    probs = eager_probs(ref_model, seq[: length - 1 + fed])
    queries = [(q, q + 1) for q in range(length - 1, length - 1 + fed)]
    s0, s1 = prompt.needle_span
    assert s1 < length - 2 * archs.WINDOW  # the needle is outside every answering query's window
    from ropelens.attention import StatsSpec

    ref = reference(probs, StatsSpec(spans=[(s0, s1)]), queries)
    assert rows["answering_queries"] == [fed] * len(ref)
    assert [(r["layer"], r["head"]) for r in ref] == list(zip(rows["layer"], rows["head"]))
    for r, ent, mass in zip(ref, rows["entropy"], rows["needle_mass"], strict=True):
        assert abs(ent - r["entropy_mean"]) < TOL, (r["layer"], r["head"], ent, r["entropy_mean"])
        assert abs(mass - r["span_mass"][0]) < TOL, (r["layer"], r["head"])
    # the same decoding, every statistic: position bins (k / keys of the step), distances, spans
    spec = StatsSpec(
        position_bins=8, distance_bins=9, spans=[(s0, s1), (60, 200)], query_start=length - 1
    )
    out, table = retrieval._greedy_recorded(
        loaded.model, prompt.input_ids, new, tok.eos_token_id, spec
    )
    assert out == seq[length:]
    assert_matches(table, reference(probs, spec, queries))


@pytest.mark.parametrize("name", ROPE)
def test_logits_equal_the_models_own_attention(name, arch_dir):
    """Logits of a prefill and two cached decoding steps: ropelens' attention function, recording
    and not, equals the attention the model loads with (SDPA, or eager where it has no SDPA)
    within 1e-5; where the model has a sliding window or soft-capping, dropping it would change
    them by far more (so the comparison can fail)."""
    from ropelens.attention import ATTN_IMPLEMENTATION, StatsSpec, record_attention
    from ropelens.positions import attention_modules

    arch = archs.BY_NAME[name]
    model = load_plain(arch_dir(name), name).model
    native = model.config._attn_implementation
    assert native == ("eager" if arch.softcap else "sdpa")
    seq = prompt_ids(LENGTH)

    def run():
        with torch.no_grad():
            out = model(torch.tensor([seq[:-2]]), use_cache=True)
            steps = [out.logits[0]]
            cache = out.past_key_values
            for t in seq[-2:]:
                out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                steps.append(out.logits[0])
        return torch.cat(steps)

    own = run()
    with record_attention(model, StatsSpec(query_start=5)):
        recorded = run()
    assert model.config._attn_implementation == native
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        plain = run()
    finally:
        model.set_attn_implementation(native)
    tol = 1e-5 * max(1.0, float(own.abs().max()))  # fp32: MiniCPM3's logits reach 12
    torch.testing.assert_close(recorded, own, rtol=0, atol=tol)
    torch.testing.assert_close(plain, own, rtol=0, atol=tol)
    changed = {}
    if arch.sliding:
        changed["sliding_window"] = 10**6
    if arch.softcap:
        changed["attn_logit_softcapping"] = None
    for key, value in changed.items():
        setattr(model.config, key, value)
        for attn in attention_modules(model):
            if key == "sliding_window" and getattr(attn, "sliding_window", None):
                attn.sliding_window = value
            if key == "attn_logit_softcapping":
                attn.attn_logit_softcapping = value
        assert (run() - own).abs().max() > 1e-3, key


# --- attention-side methods: merged logits against eager attention at explicit positions --------
# The reference rotates q and k with the model's *own* RoPE (its rotary module and
# apply_rotary_pos_emb) at explicit far positions, written here from the papers, and computes the
# attention eagerly in float64: logits from the model's q / k below the window, from the far ones
# beyond, the model's mask, scaling and soft-cap. ropelens moves the model's rotated q / k instead.

MOVED = {  # label -> (registry method, parameters, query far position, key far position)
    "rerope": ("rerope", {"window": 12}, lambda i: 12.0 + 0 * i, lambda j: 0.0 * j),
    "rerope-leaky": (
        "rerope", {"window": 12, "leak": 4.0}, lambda i: i / 4 + 12 * (1 - 1 / 4), lambda j: j / 4
    ),
    "self-extend": (
        "self-extend", {"window": 8, "group": 3}, lambda i: (i // 3) + 8 - 8 // 3, lambda j: j // 3
    ),
    # An et al. 2024: from the offset S = 10 on (inside the sliding window), distance d - S + W
    "string": ("string", {"offset": 10, "local": 3}, lambda i: i - 10 + 3, lambda j: 1.0 * j),
}  # fmt: skip


def near_below(params: dict) -> int:
    """The distance below which a method's logits are the model's own (STRING: its offset S)."""
    return params["offset"] if "offset" in params else params["window"]


MOVING_NAMES = sorted({a for a, _ in MOVING}, key=ROPE_NAMES.index)
_STASH: list = []


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kw):
    """Eager attention over the merged logits: the far q / k that the patched RoPE stashed."""
    qf, kf, window = _STASH.pop(0)
    r = qf.shape[-1]  # StableLM, Phi: the attention rotates the first r dimensions itself
    qf, kf = torch.cat([qf, query[..., r:]], -1), torch.cat([kf, key[..., r:]], -1)
    g = query.shape[1] // key.shape[1]
    k, v, kf = (t.repeat_interleave(g, 1).double() for t in (key, value, kf))
    near = query.double() @ k.transpose(-1, -2)
    far = qf.double() @ kf.transpose(-1, -2)
    L = query.shape[2]
    d = torch.arange(L)[:, None] - torch.arange(L)[None]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = torch.where(d < window, near, far) * scaling
    if kw.get("softcap") is not None:
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    if attention_mask is not None:
        s = s + attention_mask[..., :L].double()
    p = torch.softmax(s, -1)
    return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), p.to(query.dtype)


def moved_reference(model_dir, label: str, seq):
    """(logits, per-layer probabilities) of the reference for method ``label`` over ``seq``."""
    import sys

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    name, params, far_q, far_k = MOVED[label]
    model = eager(model_dir)
    AttentionInterface.register("ropelens_reference", _reference_attention)
    AttentionMaskInterface.register("ropelens_reference", eager_mask)
    model.set_attn_implementation("ropelens_reference")
    rotary = methods.rotary_module(model)
    from ropelens.positions import attention_modules

    modeling = sys.modules[type(attention_modules(model)[0]).__module__]
    pos = torch.arange(len(seq))
    nested = isinstance(rotary.rope_type, dict)
    x = torch.zeros(1, 1)
    table = {}
    for layer_type in methods.rope_layers(model.config) if nested else [None]:
        kw = {"layer_type": layer_type} if nested else {}
        with torch.no_grad():
            table[layer_type] = [
                rotary(x, p.double()[None], **kw) for p in (pos, far_q(pos), far_k(pos))
            ]
    own = modeling.apply_rotary_pos_emb

    def patched(q, k, cos, sin, *args, **kwargs):
        out = own(q, k, cos, sin, *args, **kwargs)
        (c, _), qcs, kcs = next(v for v in table.values() if torch.equal(v[0][0], cos))
        qf, _ = own(q, q, *qcs, *args, **kwargs)
        _, kf = own(k, k, *kcs, *args, **kwargs)
        _STASH.append((qf, kf, near_below(params)))
        return out

    modeling.apply_rotary_pos_emb = patched
    try:
        with torch.no_grad():
            out = model(torch.tensor([seq]), output_attentions=True, use_cache=False)
    finally:
        modeling.apply_rotary_pos_emb = own
    assert not _STASH
    return out.logits[0], by_layer(model, out.attentions)


#: (architecture, method label, compiled row kernel): STRING, added last, differs from the others
#: only in its far positions, and the rows are reduced after the merge by the same code for every
#: method, so it runs with the compiled kernel only (half the test time)
MOVED_CASES = [
    pytest.param(n, label, k, id=f"{'rowstats' if k else 'torch-ops'}-{n}-{label}")
    for label in MOVED
    for n in MOVING_NAMES
    for k in (True, False)
    if k or label != "string"
]


@pytest.mark.parametrize(("name", "label", "kernel"), MOVED_CASES, indirect=["kernel"])
def test_attention_side_method_equals_eager_at_explicit_positions(name, label, arch_dir, kernel):
    """A PPL-style forward (no recording) and an attention cell's statistics of a model loaded
    with an attention-side method equal the reference (logits <= 1e-4, statistics <= 1e-4), and
    the method changes the logits by far more than that (so the comparison can fail)."""
    from ropelens import distributions

    from .conftest import token_table

    method, params, _, _ = MOVED[label]
    d = arch_dir(name)
    spec = {**spec_of(d, name, method), "params": params}
    loaded = models.load(spec)
    assert loaded.rope["positions"]["kind"] == method
    seq = prompt_ids(LENGTH)
    ref_logits, probs = moved_reference(d, label, seq)
    with torch.no_grad():
        ours = loaded.model(torch.tensor([seq])).logits[0]
        plain = load_plain(d, name).model(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)
    assert (plain - ref_logits).abs().max() > 1e-3  # ten times the tolerance
    settings = dict(
        documents=1, query_fraction=0.5, position_bins=8, distance_bins=7, memory_budget_mb=1
    )
    table, _ = distributions.measure(loaded.model, token_table([seq]), LENGTH, settings)
    from ropelens.attention import StatsSpec

    cell_spec = StatsSpec(position_bins=8, distance_bins=7)
    ref = reference(probs, cell_spec, [(q, LENGTH) for q in range(LENGTH // 2, LENGTH)])
    assert_matches(table, ref, keys=("pos_mass", "dist_mass"))


@pytest.mark.parametrize(
    ("name", "label"), [(n, "self-extend") for n in MOVING_NAMES[:3]] + [("llama", "string")]
)
def test_attention_side_decoding_equals_the_uncached_forward(name, label, arch_dir):
    """Cached decoding steps (as the needle cells generate) see the same moved positions as one
    uncached forward: last-token logits within 1e-4."""
    method, params, _, _ = MOVED[label]
    loaded = models.load({**spec_of(arch_dir(name), name, method), "params": params})
    seq = prompt_ids(LENGTH)
    with torch.no_grad():
        full = loaded.model(torch.tensor([seq])).logits[0]
        out = loaded.model(torch.tensor([seq[:-3]]), use_cache=True)
        steps = [out.logits[0, -1]]
        for t in seq[-3:-1]:
            out = loaded.model(
                torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True
            )
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), full[-4:-1], rtol=0, atol=1e-4)


# --- the README's supported-architectures table is this matrix ---------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START, TABLE_END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def outcome(name: str, method: str) -> str:
    """A matrix cell as the README shows it: ✓, ✓ (LongRoPE) or refused."""
    arch = archs.BY_NAME[name]
    if not arch.has_rope or name in UNSTUDIED:
        return "refused"
    try:
        applied = methods.apply_method(arch.make_config(), method, params_of(name, method), P)
    except ConfigError:
        return "refused"
    return "✓ (LongRoPE)" if applied.expressed_as == "longrope" else "✓"


def _layer_types(arch) -> str:
    if not arch.has_rope:
        return "—"
    config = arch.make_config()
    layers = methods.rope_layers(config)
    if not methods.is_nested(config):
        kinds = sorted(set(getattr(config, "layer_types", None) or []))
        shared = f" for {' + '.join(kinds)}" if len(kinds) > 1 else ""
        return f"one RoPE{shared}, θ={layers[methods.FLAT]['rope_theta']:.0f}"
    default = methods.target_layer_types(config)
    return ", ".join(
        f"{'**' + t + '**' if t in default else t} θ={layers[t]['rope_theta']:.0f}" for t in layers
    )


def _notes(arch) -> str:
    if arch.name in NO_ROPE:
        return f"refused at plan time: {NO_ROPE[arch.name]}"
    if arch.name in UNSTUDIED:
        return f"refused at plan time: {UNSTUDIED[arch.name]}"
    notes = [f"`{m}` refused: {why}" for (a, m), (why, _) in REFUSED.items() if a == arch.name]
    longrope = [f"`{m}`" for (a, m), how in EXPRESSED.items() if a == arch.name and how]
    if longrope:
        notes.append(f"{', '.join(longrope)} written as exact LongRoPE factors")
    if arch.layer_type_rope:
        notes.append("methods scale the **bold** layer types unless `layer_types` says otherwise")
    return "; ".join(notes)


def render_table() -> str:
    """The supported-architectures table (README), from tests/archs.py and this matrix."""
    known = list(methods.REGISTRY)
    head = ["architecture", "config class", "RoPE layer types", "rotary / head dim (tiny)", *known]
    lines = ["| " + " | ".join([*head[:4], *(f"`{m}`" for m in known), "notes"]) + " |"]
    lines.append("|" + "---|" * (len(head) + 1))
    for arch in archs.ARCHS + archs.REFUSED_ARCHS:
        kw = arch.config_kwargs()
        head_dim = kw.get("head_dim") or kw.get("hidden_size", 0) // kw.get(
            "num_attention_heads", 1
        )
        dims = f"{rotary_dim(arch)} / {head_dim}" if arch.has_rope else "no RoPE"
        cells = [outcome(arch.name, m) for m in known]
        row = [arch.name, f"`{arch.config}`", _layer_types(arch), dims, *cells, _notes(arch)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def test_outcomes_are_the_matrix():
    """What the table shows is what the rows above check: ✓ cells pass the formula checks,
    refused cells are the REFUSED / NO_ROPE refusals, LongRoPE cells are EXPRESSED."""
    for arch in archs.ARCHS:
        for m in methods.known():
            got = outcome(arch.name, m)
            if arch.name in NO_ROPE or (arch.name, m) in REFUSED:
                assert got == "refused", (arch.name, m)
            else:
                assert (arch.name, m) in PASSING + MOVING
                longrope = EXPRESSED.get((arch.name, m)) == "longrope"
                assert got == ("✓ (LongRoPE)" if longrope else "✓"), (arch.name, m)


@pytest.mark.parametrize("doc", [README, README.parent / "docs" / "architectures.md"])
def test_documented_table_is_the_matrix(doc):
    text = doc.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{doc.name} lacks the architectures table"
    shown = text.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert shown == render_table(), (
        f"{doc.name}'s supported-architectures table differs from the conformance matrix; paste "
        "the output of `python -m tests.test_conformance` between the architectures markers"
    )


def test_layer_types_of_a_method_entry_reach_the_model(arch_dir):
    """``layer_types`` in the method entry (here: both of Gemma 3's) is what the model scales."""
    both = ["sliding_attention", "full_attention"]
    spec = spec_of(arch_dir("gemma3"), "gemma3", "pi", layer_types=both)
    loaded = models.load(spec, attn_implementation="eager")
    assert loaded.rope["layer_types"] == both
    assert loaded.rope["by_layer_type"]["sliding_attention"]["rope_type"] == "linear"
    for layer_type, theta in base_thetas(archs.BY_NAME["gemma3"]).items():
        inv, _ = model_rope(loaded.model, layer_type, "pi")
        assert_rel(inv, formula("pi", 16, theta)[0], layer_type)


# --- architectures refused as a whole: the reason is true of the tiny model, and it is one line


@pytest.mark.parametrize("name", list(UNSTUDIED))
def test_unstudied_architecture_is_refused_at_plan_time_and_at_load(name, arch_dir):
    from ropelens import config
    from ropelens.errors import RopelensError

    entry = {name: {"path": str(arch_dir(name)), "pretrained_length": P}}
    with pytest.raises(ConfigError) as err:
        config.prepare(grid(entry, {"rope": {}}))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"models.{name}: "), text
    assert UNSTUDIED[name] in text and text.endswith("remove it from models"), text
    with pytest.raises(RopelensError, match="cannot be studied"):  # a hub model not cached
        models.configured(spec_of(arch_dir(name), name, "rope"))


@pytest.mark.parametrize("name", ["gpt-oss", "diffllama"])
def test_unstudied_attention_is_refused_when_recorded(name):
    """What the plan-time reason says: recording this attention would not be one softmax."""
    from ropelens.attention import UnsupportedAttention, record_attention

    model = archs.build(name)
    with torch.no_grad(), pytest.raises(UnsupportedAttention), record_attention(model):
        model(torch.tensor([prompt_ids(12)]))


def test_minimax_decodes_differently_from_its_uncached_forward():
    """MiniMax's reason: its own cached decoding is not its uncached forward (far beyond the
    1e-4 the needle statistics are checked to), so eager attention cannot be the reference."""
    model = archs.build("minimax")
    seq = torch.tensor([prompt_ids(LENGTH)])
    with torch.no_grad():
        full = model(seq, use_cache=False).logits[0]
        out = model(seq[:, :-2], use_cache=True)
        step = model(seq[:, -2:-1], past_key_values=out.past_key_values, use_cache=True)
    assert (step.logits[0, -1] - full[-2]).abs().max() > 1e-3


if __name__ == "__main__":
    print(render_table())

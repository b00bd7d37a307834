"""Conformance matrix: every architecture of tests/archs.py, checked against an independent
reference (eager attention, a plain transformers load). Adding an architecture is one line there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ropelens import methods, models
from ropelens.errors import ConfigError
from tests import archs
from tests.test_methods import base_freqs, llama3_reference, yarn_reference

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
    assert len(peaked) == model.config.num_hidden_layers
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


# --- methods: every RoPE architecture x every registry method ----------------------------------
# The model's own rotary module (loaded through ropelens.models.load from a local directory) is
# compared with the method's formula, written independently here (tests/test_methods.py) over the
# architecture's *rotary* dimension; the layer types a method must leave alone are unchanged.

P = archs.BASE["max_position_embeddings"]  # pretrained length of every tiny model
S = 4  # a typical factor
PARAMS = {name: ({} if name == "rope" else {"factor": S}) for name in methods.known()}
DYNAMIC_AT = 4 * P  # dynamic NTK is checked after a forward at this many positions
#: (architecture, method) -> the reason it is refused, at plan time in one line; every other
#: combination of a RoPE architecture with a registry method must pass the formula checks
REFUSED = {
    ("phi3", "dynamic-ntk"): "Phi3Config takes only default or LongRoPE, and LongRoPE cannot "
    "express a scaling that grows with the sequence length",
}
NO_ROPE = {a.name: "no rotary position embedding" for a in archs.ARCHS if not a.has_rope}
#: how a method is written into transformers where not its own rope type
EXPRESSED = {("phi3", m): "longrope" for m in ("pi", "yarn", "llama3")}
ROPE_NAMES = [a.name for a in archs.ROPE_ARCHS]
PASSING = [(a, m) for a in ROPE_NAMES for m in methods.known() if (a, m) not in REFUSED]


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
        "params": PARAMS[method],
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
    """(inverse frequencies, attention factor) of ``method`` at factor S, pretrained length P."""
    if method == "rope":
        return base_freqs(d, theta), 1.0
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
    if method == "dynamic-ntk":
        rotary = methods.rotary_module(model)
        x, pos = torch.zeros(1, 1), torch.arange(DYNAMIC_AT)[None]
        kwargs = {"layer_type": layer_type} if isinstance(rotary.rope_type, dict) else {}
        with torch.no_grad():
            rotary(x, pos, **kwargs)
    inv, attention = methods.inv_freq(model, layer_type)
    return inv.double().numpy(), float(attention)


def assert_rel(actual, expected, what: str, rtol: float = 1e-6):
    n, m = actual.shape[0], expected.shape[0]
    assert n == m, f"{what}: {n} frequencies, expected {m} (rotary dimension / 2)"
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
        config.prepare(grid(entry, {"rope": {}, method: PARAMS[method]}))
    text = str(err.value)
    assert "\n" not in text and (f"model '{name}'" in text or f"models.{name}" in text), text
    if name in NO_ROPE:
        assert text.startswith(f"models.{name}: ") and "no rotary position embedding" in text
    else:
        assert text.startswith(f"methods.{method}: method '{method}' cannot apply to model")
        assert "LongRoPE factors cannot express" in text


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


# --- the README's supported-architectures table is this matrix ---------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START, TABLE_END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def outcome(name: str, method: str) -> str:
    """A matrix cell as the README shows it: ✓, ✓ (LongRoPE) or refused."""
    arch = archs.BY_NAME[name]
    if not arch.has_rope:
        return "refused"
    try:
        applied = methods.apply_method(arch.make_config(), method, PARAMS[method], P)
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
    notes = [f"`{m}` refused: {why}" for (a, m), why in REFUSED.items() if a == arch.name]
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
    for arch in archs.ARCHS:
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
                assert (arch.name, m) in PASSING
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


if __name__ == "__main__":
    print(render_table())

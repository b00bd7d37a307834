"""Config validation: every bad input is one line naming the key and the fix."""

import copy

import pytest
import yaml

from ropelens import config as rlconfig
from ropelens.errors import ConfigError

from .conftest import REPO, model_files

BASE = {
    "models": {"m": {"tiny": {"hidden_size": 16}, "pretrained_length": 64}},
    "methods": {"rope": {}, "pi": {"factor": 4}},
    "lengths": [32, 64],
    "corpora": {"c": {"builtin": "stdlib"}},
    "ppl": {"corpus": "c"},
    "needle": {"lengths": []},  # no needle cells: 32 and 64 tokens cannot hold the prompt
}


def with_(path, value):
    cfg = copy.deepcopy(BASE)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


def error_of(cfg, base_dir="."):
    with pytest.raises(ConfigError) as info:
        rlconfig.prepare(cfg, base_dir)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_filled():
    cfg = rlconfig.prepare(BASE)
    assert cfg["ppl"]["protocol"] == "truncate"
    assert cfg["depths"] == [0, 25, 50, 75, 100]
    assert cfg["runtime"] == {
        "device": "auto",
        "dtype": "auto",
        "threads": 1,
        "warm": True,
        "warm_memory_mb": 4000,
        "warm_idle_seconds": 300,
    }
    assert cfg["corpora"]["c"]["split"] == "test"
    assert rlconfig.cell_settings(cfg, "needle")["placement"] == "gkamradt"


# configs given after the config they extend (`--configfile BASE OVERLAY`)
OVERLAYS = {
    "tasks.yaml": "config.yaml",
    "tasks-smollm2.yaml": "configs/smollm2.yaml",
    "methods-smollm2.yaml": "configs/smollm2.yaml",
}


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base`` as Snakemake merges config files (its own update_config, which
    rules/common.smk uses too: mappings key by key)."""
    import copy

    from snakemake.utils import update_config

    out = copy.deepcopy(base)
    update_config(out, overlay)
    return out


def test_repo_configs_are_valid():
    for path in [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]:
        cfg = yaml.safe_load(path.read_text())
        if path.name in OVERLAYS:
            cfg = merged(yaml.safe_load((REPO / OVERLAYS[path.name]).read_text()), cfg)
        rlconfig.prepare(cfg, REPO)


def test_the_methods_overlay_adds_to_smollm2s_methods():
    base = yaml.safe_load((REPO / "configs/smollm2.yaml").read_text())
    cfg = merged(base, yaml.safe_load((REPO / "configs/methods-smollm2.yaml").read_text()))
    assert set(base["methods"]) < set(cfg["methods"]) and len(cfg["methods"]) == 12


@pytest.mark.parametrize(
    "path,value,expect",
    [
        (
            ["methods", "x"],
            {"method": "xpos"},
            "methods.x.method: unknown method 'xpos'; known",
        ),
        (["methods", "pi"], {}, "methods.pi.factor: method 'pi' requires 'factor'"),
        (["methods", "pi", "factor"], 1, "methods.pi.factor: must be a number > 1"),
        (["methods", "pi", "factor"], 0.5, "methods.pi.factor: must be a number > 1"),
        (["methods", "pi", "factor"], "four", "methods.pi.factor: must be a number > 1 (got 'fo"),
        (["methods", "pi", "factor"], [4], "methods.pi.factor: must be a number > 1 (got [4])"),
        (["methods", "pi", "factor"], ["a"], "methods.pi.factor[0]: 'a' is not of type number"),
        (["methods", "yarn"], {"factor": 4, "beta_fast": "x"}, "methods.yarn.beta_fast: must be"),
        (["lengths"], [32, "64k"], "lengths[1]: '64k' is not of type integer"),
        (["lengths"], [32, 64.5], "lengths[1]: 64.5 is not of type integer"),
        (["lengths"], [0, 64], "lengths[0]: 0 is out of range; use a value >= 1"),
        (["lengths"], [-8], "lengths[0]: -8 is out of range"),
        (["lengths"], [], "lengths: must not be empty"),
        (["lengths"], [64, 64], "lengths: 64 is listed twice"),
        (["depths"], [0, 50, 101], "depths[2]: 101 is out of range; use a value <= 100"),
        (["depths"], [-1], "depths[0]: -1 is out of range; use a value >= 0"),
        (["models", "m"], {"path": "no/such/dir", "pretrained_length": 64}, "models.m.path"),
        (["models", "m", "pretrained_length"], 0, "models.m.pretrained_length: 0 is out of range"),
        (["models", "m"], {"pretrained_length": 64}, "models.m: give exactly one of path, hub"),
        (["ppl", "corpus"], "nope", "ppl.corpus: 'nope' is not in corpora"),
        (["ppl", "protocol"], "strided", "ppl.protocol: 'strided' is not allowed; use one of"),
        (["corpora", "c"], {"path": "missing.jsonl"}, "corpora.c.path: 'missing.jsonl' does not"),
        (["methods", "pi", "checkpoints"], {"other": {"hub": "a/b"}}, "model 'other' is not in"),
        (["runtime"], {"device": "tpu"}, "runtime.device: 'tpu' is not allowed"),
        (["needle"], {"placement": "middle"}, "needle.placement: 'middle' is not allowed"),
        (["attention"], {"reference": "nope"}, "attention.reference: method 'nope' is not in"),
        (["attention"], {"reference": {"model": "x"}}, "attention.reference.model: 'x' is not in"),
        (["attention"], {"reference": {"length": 99}}, "attention.reference.length: 99 is not in"),
        (["attention"], {"reference": {"length": "long"}}, "attention.reference.length: 'long'"),
        (["attention"], {"reference": {"metod": "rope"}}, "attention.reference: give a method"),
        (["attention"], {"reference": []}, "attention.reference: empty list"),
        (["modles"], {}, "additional properties are not allowed"),
    ],
)
def test_bad_input_names_key_and_fix(path, value, expect):
    msg = error_of(with_(path, value))
    assert expect.lower() in msg.lower(), msg


def test_model_path_message_says_how_to_fix():
    msg = error_of(with_(["models", "m"], {"path": "no/such/dir", "pretrained_length": 64}))
    assert "does not exist" in msg and "hub:" in msg


def test_corpus_without_long_enough_document(tmp_path):
    (tmp_path / "short.jsonl").write_text('{"text": "tiny doc"}\n{"text": "another"}\n')
    cfg = with_(["corpora", "c"], {"path": "short.jsonl"})
    msg = error_of(cfg, tmp_path)
    assert "corpora.c.path" in msg and "shortest requested length (32" in msg


def test_checkpoints_need_cpt_length(tmp_path):
    model_files(tmp_path / "ck")
    cfg = with_(["methods", "pi", "checkpoints"], {"m": {"path": "ck"}})
    assert "methods.pi.cpt_length: required with checkpoints" in error_of(cfg, tmp_path)
    cfg["methods"]["pi"]["cpt_length"] = 256
    rlconfig.prepare(cfg, tmp_path)


def test_pairs_and_cell_spec(tmp_path):
    model_files(tmp_path / "ck")
    cfg = copy.deepcopy(BASE)
    cfg["models"]["n"] = {"hub": "org/model", "pretrained_length": 4096}
    cfg["methods"]["pi-cpt"] = {
        "method": "pi",
        "factor": 8,
        "cpt_length": 32768,
        "checkpoints": {"n": {"hub": "org/model-32k"}},
    }
    cfg["methods"]["only-m"] = {"method": "ntk", "factor": 2, "models": ["m"]}
    cfg = rlconfig.prepare(cfg, tmp_path)
    pairs = rlconfig.model_method_pairs(cfg)
    assert ("n", "pi-cpt") in pairs and ("m", "pi-cpt") not in pairs
    assert ("m", "only-m") in pairs and ("n", "only-m") not in pairs
    assert ("n", "rope") in pairs and ("m", "rope") in pairs
    spec = rlconfig.cell_spec(cfg, "n", "pi-cpt")
    assert spec["source"] == {"hub": "org/model-32k"}
    assert spec["registry"] == "pi" and spec["params"] == {"factor": 8}
    assert spec["checkpoint"] and spec["cpt_length"] == 32768
    assert rlconfig.cell_spec(cfg, "m", "rope")["source"] == {"path": "resources/models/m"}


def test_attention_cells_include_the_references():
    cfg = copy.deepcopy(BASE)
    cfg["models"]["n"] = {"tiny": {"hidden_size": 16}, "pretrained_length": 128}
    cfg["lengths"] = [32, 64, 128]
    cfg["attention"] = {"lengths": [64], "reference": ["rope", {"model": "n", "length": "same"}]}
    cells = rlconfig.attention_cells(rlconfig.prepare(cfg))
    assert ("m", "rope", 64) in cells and ("n", "rope", 128) in cells  # each at its pretrained
    assert ("m", "pi", 32) not in cells and len(cells) == len(set(cells)) == 5

"""The shipped toy zoo (zoo/, ropelens.zoo): it is what configs/zoo.yaml trains, the default config
runs it, retraining reproduces it, and a damaged file is one line at plan time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from ropelens import config, preflight, toytrain, zoo
from ropelens.errors import ConfigError

from .conftest import REPO, job_counts

ZOO = REPO / "zoo"
RECIPE = config.load_yaml(REPO / "configs" / "zoo.yaml")
SHIPPED = [(zoo.shipped_path(trained), key) for trained, key in zoo.trained_dirs(RECIPE)]


def summary(rel: str) -> dict:
    return json.loads((ZOO / rel / zoo.PROVENANCE).read_text())


def recipe_settings(key: str) -> dict:
    """The train block at ``key`` (models.M.train / methods.X.checkpoints.M.train), defaults
    filled as the rules fill them."""
    node = RECIPE
    for part in key.split("."):
        node = node[part]
    return toytrain.train_defaults(node, "pretrain" if key.startswith("models.") else "continual")


def test_the_shipped_zoo_is_what_the_recipe_trains():
    """Every model configs/zoo.yaml trains is shipped, nothing else, each with the settings the
    recipe gives now: a changed setting without a retrained zoo fails here."""
    shipped = sorted(p.parent.relative_to(ZOO).as_posix() for p in ZOO.rglob(zoo.PROVENANCE))
    assert shipped == sorted(rel for rel, _ in SHIPPED)
    for rel, key in SHIPPED:
        s = summary(rel)
        assert s["settings"] == json.loads(json.dumps(recipe_settings(key))), (rel, key)
        assert s["shipped"]["dtype"] == "float16"
        assert s["versions"]["torch"] and s["corpus"]["content_sha256"], rel
        if rel.startswith("toy/cpt/"):
            label = rel.rsplit("/", 1)[1]
            entry = RECIPE["methods"][label]
            assert s["method"] == label and s["registry"] == entry.get("method", label)
            assert s["length"] == entry["cpt_length"]


def test_every_continual_run_differs_only_in_method_and_length():
    """A fair comparison: every continual run gets the same data mix, steps and tokens per step."""
    runs = [(recipe_settings(key), rel.rsplit("/", 1)[1]) for rel, key in SHIPPED if "/cpt/" in rel]
    tokens = {s["batch_size"] * RECIPE["methods"][label]["cpt_length"] for s, label in runs}
    assert len(runs) == 7 and len(tokens) == 1
    rest = {json.dumps({**s, "batch_size": None}, sort_keys=True) for s, _ in runs}
    assert len(rest) == 1


def test_default_config_runs_the_shipped_zoo():
    """config.yaml: the base and every continually pretrained model from zoo/, with the recipe's
    method, factor and length; no train block (the default run trains nothing)."""
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    for name, model in RECIPE["models"].items():
        assert default["models"][name]["path"] == f"zoo/{name}/base"
        assert default["models"][name]["pretrained_length"] == model["pretrained_length"]
        assert "train" not in default["models"][name]
    for label, entry in RECIPE["methods"].items():
        for name in entry.get("checkpoints") or {}:
            used = default["methods"][label]
            assert used["checkpoints"][name] == {"path": f"zoo/{name}/cpt/{label}"}
            for key in ("method", "factor", "cpt_length", "apply"):
                assert used.get(key) == entry.get(key), (label, key)


def test_the_zoo_fits_the_repository_budget():
    total = sum(p.stat().st_size for p in ZOO.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"zoo/ is {total / 2**20:.1f} MiB (budget 30 MiB)"


@pytest.fixture(scope="module")
def train_corpora(tmp_path_factory):
    """The base's corpora materialised as the workflow does, from this Python's standard library."""
    from ropelens import corpora

    root = tmp_path_factory.mktemp("zoo_corpora")
    s = summary("toy/base")
    paths = {}
    for role in ("corpus", "haystack"):
        name = s["settings"][role]
        paths[role] = root / f"{name}.parquet"
        prov = corpora.build(RECIPE["corpora"][name], paths[role])
        if prov["content_sha256"] != s[role]["content_sha256"]:
            pytest.skip(f"this Python's {name} differs from the one the zoo trained on")
    return paths


def test_retraining_reproduces_the_shipped_first_steps(train_corpora, tmp_path):
    """CPU training is deterministic: the base's first steps, retrained from the recipe with its
    thread count, give the shipped loss values exactly."""
    s = summary("toy/base")
    settings = recipe_settings("models.toy.train")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        toytrain._seed_all(settings["seed"])
        model, tok = toytrain.build_base(settings, s["length"])
        got = toytrain.train(
            model, tok, settings, s["length"], train_corpora["corpus"], train_corpora["haystack"],
            stop_after=len(s["first_losses"]),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert got["first_losses"] == s["first_losses"]


@pytest.fixture
def shipped_copy(tmp_path):
    dst = tmp_path / "zoo" / "toy" / "base"
    shutil.copytree(ZOO / "toy" / "base", dst)
    return dst


def test_a_corrupted_shipped_file_is_one_line_at_plan_time(shipped_copy):
    preflight.check_model_dir(shipped_copy, "models.toy.path")  # intact: fine
    weights = shipped_copy / zoo.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        preflight.check_model_dir(shipped_copy, "models.toy.path")
    text = str(err.value)
    assert "\n" not in text and str(weights) in text and "differ from the SHA-256" in text
    assert "git checkout -- zoo/" in text and "make zoo" in text
    weights.unlink()
    with pytest.raises(ConfigError, match="are missing; .*make zoo"):
        preflight.check_model_dir(shipped_copy, "models.toy.path")


def test_a_missing_zoo_is_one_line_naming_the_restore_command(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    with pytest.raises(ConfigError) as err:
        config.prepare(cfg, tmp_path)  # a folder without zoo/
    text = str(err.value)
    assert "\n" not in text and "zoo/toy/base" in text and "git checkout -- zoo/" in text, text


def test_ship_writes_half_precision_with_its_hash(tmp_path):
    """ship(): a trained directory in float16 whose logits stay close to the float32 ones."""
    from transformers import AutoModelForCausalLM

    from ropelens.models import tiny_llama
    from ropelens.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    model = tiny_llama(tok, 64, hidden_size=32, layers=1, heads=2, seed=0)
    src = tmp_path / "trained"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    (src / zoo.PROVENANCE).write_text(json.dumps({"settings": {"seed": 0}}))
    record = zoo.ship(src, tmp_path / "shipped")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "shipped")
    assert again.dtype == torch.float16 and record["dtype"] == "float16"
    assert record["sha256"] == zoo.sha256(tmp_path / "shipped" / zoo.WEIGHTS)
    written = json.loads((tmp_path / "shipped" / zoo.PROVENANCE).read_text())
    assert written["shipped"] == record and written["settings"] == {"seed": 0}
    ids = torch.arange(20)[None]
    with torch.no_grad():
        diff = (again.float()(ids).logits - model(ids).logits).abs().max()
    assert diff < 1e-2


@pytest.mark.workflow
def test_make_zoo_trains_through_the_workflows_rules(snakemake, tmp_path):
    """`make zoo`'s Snakemake target plans the recipe's pretrain and continual runs."""
    proc = snakemake(tmp_path, "-n", "zoo", "--configfile", str(REPO / "configs" / "zoo.yaml"))
    assert job_counts(proc) == {"corpus": 2, "pretrain": 1, "continual": 7, "zoo": 1}

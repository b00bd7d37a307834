"""Careless-user cases, triggered as a user would (snakemake or the CLI in a temp folder).

Each ends in one line naming what is wrong and the fix, and no traceback (issue 14): config files,
corpora read at plan time, model directories, the hub cache when offline, configs that would
produce mislabelled results, damaged cells, and every subcommand called by hand with bad arguments.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import REPO, job_counts, model_files
from .test_incremental import MICRO

pytestmark = pytest.mark.workflow


def one_line(proc, prefix: str = "ropelens: ") -> str:
    """The only non-empty stderr line of a failed run (and no traceback); progress bars aside."""
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.strip() and not re.search(r"\d%\|", ln)]
    assert len(err) == 1 and err[0].startswith(prefix), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return err[0]


def grid(**changes) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    for key, value in changes.items():
        node = cfg
        *path, last = key.split("/")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def plan(snakemake, workdir: Path, cfg: dict, *args):
    (workdir / "grid.yaml").write_text(yaml.safe_dump(cfg))
    return snakemake(workdir, "--configfile", str(workdir / "grid.yaml"), "-n", *args, check=False)


# --- config files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expect",
    [
        ("", "config file 'config.yaml' is empty"),
        (
            "models:\n  toy: {pretrained_length: 256\nmethods: {}\n",
            "config file 'config.yaml' line",
        ),
        ("- a\n- b\n", "the top level is a list"),
    ],
)
def test_broken_default_config_is_one_line(tmp_path, snakemake, text, expect):
    (tmp_path / "config.yaml").write_text(text)
    line = one_line(snakemake(tmp_path, "-n", check=False), "ropelens: config error: ")
    assert expect in line


def test_configfile_gives_exactly_the_users_grid(tmp_path, snakemake):
    """The shipped config.yaml (the toy zoo) is not merged into a --configfile grid."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "zoo").symlink_to(REPO / "zoo")  # the default runs the shipped zoo
    counts = job_counts(plan(snakemake, tmp_path, MICRO))
    assert counts["ppl"] == 4  # the micro grid alone: none of the default's 13 methods
    # without --configfile the default applies, with --config overrides (typed, nested too)
    proc = snakemake(tmp_path, "-n", "--config", "depths=[0]", check=False)
    counts = job_counts(proc)
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    cells = len(default["methods"]) * len(default["needle"]["lengths"])
    assert counts["needle"] == cells and "pretrain" not in counts, proc.stderr[-2000:]


@pytest.mark.parametrize("args", [["check-config", "nope.yaml"], ["check-config", "bad.yaml"]])
def test_check_config_names_file_and_line(tmp_path, args):
    (tmp_path / "bad.yaml").write_text("models:\n  a: [1,\n")
    line = one_line(cli(tmp_path, *args), "ropelens: error: ")
    assert "does not exist" in line if "nope" in args[1] else "bad.yaml' line 3" in line


# --- corpora and models read at plan time ---------------------------------------------------------

LONG = "x = 1\n" * 40


def _corpus(tmp_path, name, content) -> dict:
    path = tmp_path / name
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    else:
        path.write_bytes(content)
    return grid(corpora={"code": {"path": name}})


CORPORA = {
    "latin1 txt": ("doc.txt", LONG.encode() + "caf\xe9\n".encode("latin1"), "not UTF-8 (line 41"),
    "bad jsonl line": (
        "docs.jsonl",
        (json.dumps({"text": LONG}) + "\n\n{'text': 'single quotes'}\n").encode(),
        "docs.jsonl: line 3 is not JSON",
    ),
    "text a number": ("docs.jsonl", b'{"text": 12}\n', "line 1: 'text' is int, not a string"),
    "text null": ("docs.jsonl", b'{"text": null}\n', "line 1: 'text' is null"),
    "jsonl array": ("docs.jsonl", b"[1, 2]\n", "line 1 is a list, not a JSON object"),
    "parquet null": (
        "docs.parquet",
        pa.table({"text": pa.array([LONG, None], pa.string())}),
        "row 1: 'text' is null",
    ),
    "not parquet": ("docs.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
}


@pytest.mark.parametrize("case", list(CORPORA))
def test_malformed_corpus_is_one_line_with_file_and_line(tmp_path, snakemake, case):
    name, content, expect = CORPORA[case]
    line = one_line(plan(snakemake, tmp_path, _corpus(tmp_path, name, content)))
    assert line.startswith("ropelens: config error: corpora.code.path: ") and expect in line


def _safetensors(path: Path, declared: int, written: int) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [declared // 4], "data_offsets": [0, declared]}}
    )
    data = len(header).to_bytes(8, "little") + header.encode() + b"\0" * written
    path.write_bytes(data)


def _broken_model(folder: Path, case: str) -> None:
    model_files(folder)
    if case == "no config.json":
        (folder / "config.json").unlink()
    elif case == "truncated safetensors":
        _safetensors(folder / "model.safetensors", 4000, 1000)
    elif case == "no weights":
        (folder / "model.safetensors").unlink()
    elif case == "missing shard":
        (folder / "model.safetensors").unlink()
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002.st"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        _safetensors(folder / "model-00001-of-00002.safetensors", 8, 8)
    elif case == "truncated pytorch_model.bin":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    elif case == "no tokenizer":
        (folder / "tokenizer.json").unlink()


MODELS = {
    "no config.json": "has no config.json",
    "truncated safetensors": "is truncated (",
    "no weights": "has no weights",
    "missing shard": "weight shard",
    "truncated pytorch_model.bin": "is truncated or not a PyTorch checkpoint",
    "no tokenizer": "has no tokenizer",
}


@pytest.mark.parametrize("case", list(MODELS))
@pytest.mark.parametrize("role", ["model", "checkpoint"])
def test_incomplete_model_directory_is_one_line(tmp_path, snakemake, case, role):
    _broken_model(tmp_path / "m", case)
    if role == "model":
        cfg, key = grid(**{"models/micro": {"path": "m", "pretrained_length": 64}}), "models.micro"
    else:
        ckpt = {
            "method": "pi",
            "factor": 2,
            "cpt_length": 128,
            "checkpoints": {"micro": {"path": "m"}},
        }
        cfg, key = grid(**{"methods/pi-cpt": ckpt}), "methods.pi-cpt.checkpoints.micro"
    line = one_line(plan(snakemake, tmp_path, cfg))
    assert line.startswith(f"ropelens: config error: {key}.path: ") and MODELS[case] in line


# --- the hub cache when offline: before a real run submits anything -------------------------------


@pytest.mark.parametrize("what", ["model", "checkpoint", "dataset"])
def test_offline_run_names_what_to_download(tmp_path, snakemake, what, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if what == "model":
        cfg, repo = (
            grid(**{"models/micro": {"hub": "org/absent", "pretrained_length": 64}}),
            "org/absent",
        )
    elif what == "checkpoint":
        ckpt = {
            "method": "pi",
            "factor": 2,
            "cpt_length": 128,
            "checkpoints": {"micro": {"hub": "org/cpt"}},
        }
        cfg, repo = grid(**{"methods/pi-cpt": ckpt}), "org/cpt"
    else:
        cfg, repo = grid(corpora={"code": {"dataset": "org/corpus"}}), "org/corpus"
    assert job_counts(plan(snakemake, tmp_path, cfg))  # the plan (-n) is shown
    grid_file = str(tmp_path / "grid.yaml")
    proc = snakemake(tmp_path, "--configfile", grid_file, "--cores", "1", check=False)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("ropelens:")]
    assert len(err) == 1 and f"'{repo}' is not in the Hugging Face cache" in err[0], proc.stderr
    assert "huggingface-cli download" in err[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / ".snakemake/locks").exists()


# --- configs that would label results as something they are not -----------------------------------

MISLABELLED = {
    "apply false without checkpoints": (
        {"methods/pi": {"factor": 2, "apply": False}},
        "methods.pi.apply: false keeps a checkpoint's own RoPE config",
    ),
    "method on no model": ({"methods/pi": {"factor": 2, "models": []}}, "methods.pi.models: []"),
    "depth in exponent form": ({"depths": [0, 0.00001]}, "depths[1]: 1e-05 would be labelled"),
    "depth rounded in its label": ({"depths": [12.3456789]}, "labelled depth=12.3457"),
}


@pytest.mark.parametrize("case", list(MISLABELLED))
def test_mislabelling_config_is_refused(tmp_path, snakemake, case):
    change, expect = MISLABELLED[case]
    line = one_line(plan(snakemake, tmp_path, grid(**change)))
    assert line.startswith("ropelens: config error: ") and expect in line


def test_damaged_cell_stops_the_plan(tmp_path, snakemake):
    cell = tmp_path / "results/ppl/model=micro/method=rope/length=64.parquet"
    cell.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), cell)
    cell.write_bytes(cell.read_bytes()[:-10])  # truncated (a full disk, a partial copy)
    line = one_line(plan(snakemake, tmp_path, MICRO))
    assert "1 damaged cell file(s) (first: results/ppl/model=micro" in line
    assert "ropelens verify results --delete" in line


# --- the CLI by hand -----------------------------------------------------------------------------


def cli(workdir: Path, *args, **env):
    return subprocess.run(
        [sys.executable, "-m", "ropelens", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env},
        timeout=300,
    )


@pytest.fixture
def by_hand(tmp_path, tiny_model_dir):
    """A folder with a corpus, a token file, a file in the way, and a cell spec."""
    from .conftest import tiny_spec, token_table

    pq.write_table(
        pa.table({"doc_id": ["a"], "split": ["test"], "text": [LONG]}), tmp_path / "c.parquet"
    )
    pq.write_table(token_table([list(range(80))]), tmp_path / "t.parquet")
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "badmodel"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    spec = tiny_spec(tiny_model_dir)
    settings = {"protocol": "truncate", "max_documents": 1, "position_bins": 2}
    return tmp_path, spec, settings


CLI_CASES = {
    "spec lacks keys": (
        lambda spec: {"spec": {"model": "tiny"}},
        "--spec: missing method, source, pretrained_length, registry, params",
    ),
    "settings lack keys": (
        lambda spec: {"settings": {"protocol": "truncate"}},
        "--settings: missing max_documents, position_bins",
    ),
    "tokens file missing": (
        lambda spec: {"tokens": "none.parquet"},
        "--tokens: 'none.parquet' does not exist",
    ),
    "wrong parquet kind": (
        lambda spec: {"tokens": "c.parquet"},
        "is not a tokenised corpus (`ropelens tokenize`): it lacks",
    ),
    "negative length": (lambda spec: {"length": "-8"}, "argument --length: -8 must be >= 1"),
    "out under a file": (
        lambda spec: {"out": "afile/x.parquet"},
        "'afile' is a file, not a folder",
    ),
    "broken model": (
        lambda spec: {"spec": {**spec, "source": {"path": "badmodel"}}},
        "cannot load model config 'badmodel'",
    ),
    "not JSON": (lambda spec: {"spec": "{model: tiny"}, "argument --spec: not valid JSON"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_ppl_by_hand_with_bad_arguments(by_hand, case):
    workdir, spec, settings = by_hand
    change, expect = CLI_CASES[case]
    args = {
        "spec": spec,
        "settings": settings,
        "tokens": "t.parquet",
        "length": "16",
        "out": "o/c.parquet",
    }
    args.update(change(spec))
    argv = ["ppl"]
    for key, value in args.items():
        argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    line = one_line(cli(workdir, *argv), "ropelens: error: ")
    assert expect in line
    assert not (workdir / "o").exists() or not list((workdir / "o").iterdir())


def needle_argv(depth: str) -> list[str]:
    """`ropelens needle` by hand with empty spec/settings and the given depth."""
    return (
        "needle --spec {} --settings {} --haystack t.parquet --length 8 --depth "
        f"{depth} --out n.parquet"
    ).split()


@pytest.mark.parametrize(
    "argv,expect",
    [
        (
            needle_argv("150"),
            "argument --depth: 150 is not a percentage",
        ),
        (
            needle_argv("50"),
            "--haystack: 't.parquet' is not a materialised corpus",
        ),
        (
            [
                "tokenize",
                "--corpus",
                "t.parquet",
                "--source",
                '{"path": "x"}',
                "--out",
                "o.parquet",
            ],
            "--corpus: 't.parquet' is not a materialised corpus",
        ),
        (["aggregate-ppl", "t.parquet", "--prefix", "out/ppl"], "missing columns"),
        (
            ["aggregate-ppl", "gone.parquet", "--prefix", "out/ppl"],
            "cell 'gone.parquet' does not exist",
        ),
        (
            [
                "corpus",
                "--spec",
                '{"path": "c.parquet", "column": "body"}',
                "--out",
                "afile/c.parquet",
            ],
            "'afile' is a file",
        ),
        (["verify", "nowhere"], "verify: 'nowhere' is not a folder"),
        (["ppl", "--spec", "{}"], "the following arguments are required"),
    ],
)
def test_subcommands_by_hand_are_one_line(by_hand, argv, expect):
    workdir, _, _ = by_hand
    assert expect in one_line(cli(workdir, *argv), "ropelens: error: ")


def test_job_failure_traceback_only_when_asked(by_hand):
    workdir, spec, settings = by_hand
    argv = [
        "ppl",
        "--spec",
        json.dumps({**spec, "source": {"path": "badmodel"}}),
        "--settings",
        json.dumps(settings),
        "--tokens",
        "t.parquet",
        "--length",
        "16",
        "--out",
        "cell.parquet",
    ]
    one_line(cli(workdir, *argv))
    debug = cli(workdir, *argv, ROPELENS_DEBUG="1")
    assert "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1].startswith(
        "ropelens: error: "
    )
    assert not (workdir / "cell.parquet").exists()

"""Degenerate grids (issue 27): lengths too short for their prompts are refused at plan time, and
every aggregate, table and chart says what it lacks instead of crashing — no cells, every cell
errored or failed, every cell passed, one cell, a model without cells of a kind — and the report
is written for each. Unexpected errors are named as such; an unwritable results folder is one
line before any job starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ropelens import config, needle, tasks
from ropelens.errors import ConfigError, DataError
from ropelens.tokenizer import build_byte_tokenizer

from .conftest import REPO
from .test_incremental import MICRO


def micro(**changes) -> dict:
    cfg = json.loads(json.dumps(MICRO))
    cfg.update(changes)
    return cfg


def refusal(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config.prepare(cfg)
    line = str(info.value)
    assert "\n" not in line
    return line


# --- plan time: a length that cannot hold its prompt -----------------------------------------


def test_the_issues_needle_grid_is_refused_with_the_shortest_length_that_fits():
    """A tiny LLaMA (byte tokenizer), pretrained_length 64, needle lengths [64]."""
    line = refusal(micro(needle={"lengths": [64]}))
    assert line.startswith("needle.lengths: 64 tokens is too short for the needle prompt")
    shortest = int(line.split("the shortest that fits is ")[1].split(":")[0])
    tok = build_byte_tokenizer()  # the tokenizer the tiny model is saved with
    needle.build_prompt(tok, ["Some prose. More prose."], shortest, 50, seed=1)
    with pytest.raises(DataError, match="too short"):
        needle.build_prompt(tok, ["Some prose. More prose."], shortest - 1, 50, seed=1)
    assert config.prepare(micro(needle={"lengths": [128]}))["needle"]["lengths"] == [128]
    # the configured template is the one measured: a longer needle sentence needs more tokens
    template = {"needle": "The secret magic number of the day is {answer}."}
    n = shortest + 4
    line = refusal(micro(needle={"lengths": [n], "template": template}, lengths=[64, n, 128]))
    want = needle.min_length(tok, needle.Template(**template))
    assert want > n and line.startswith(f"needle.lengths: {n} tokens") and f"is {want}:" in line


def test_a_defaulted_needle_length_is_refused_too():
    line = refusal(micro(needle={}))  # needle.lengths defaults to lengths: [64, 128]
    assert line.startswith("needle.lengths: 64 tokens") and "defaults to lengths" in line


@pytest.mark.parametrize("task", tasks.TASKS)
def test_a_task_length_too_short_for_its_prompts_is_refused(task):
    depths = [0, 50, 100]
    cfg = micro(tasks={"lengths": [128], "depths": depths, task: {}}, needle={"lengths": [128]})
    try:
        config.prepare(cfg)
    except ConfigError as e:
        line = str(e)
    else:
        line = None
    tok = build_byte_tokenizer()

    def fits(n: int) -> bool:
        try:
            for d in depths:
                tasks.build(tok, task, ["Some prose."], n, d, tasks.cell_seed(task, n, d))
        except DataError:
            return False
        return True

    assert (line is None) == fits(128), line  # refused exactly when a cell would not fit
    if line is not None:
        assert line.startswith(f"tasks.lengths: 128 tokens is too short for the {task} prompts")
        shortest = int(line.split("the shortest that fits every depth is ")[1].split(":")[0])
        assert fits(shortest) and not any(fits(n) for n in range(129, shortest))


def test_models_with_their_own_tokenizer_are_left_to_their_cells(tmp_path):
    """No tokenizer is loaded at plan time: a path model's cells record prompt_error instead."""
    from .conftest import model_files

    cfg = micro(needle={"lengths": [64]})
    cfg["models"] = {"micro": {"path": model_files(tmp_path / "m"), "pretrained_length": 64}}
    assert config.prepare(cfg)["needle"]["lengths"] == [64]


def test_the_plan_time_length_check_imports_neither_torch_nor_transformers():
    cfg = micro(tasks={"lengths": [128], "passkey": {}}, needle={"lengths": [64]})
    code = (
        "import json, sys\n"
        "from ropelens import config\n"
        "from ropelens.errors import ConfigError\n"
        f"cfg = json.loads({json.dumps(json.dumps(cfg))})\n"
        "try:\n    config.prepare(cfg)\nexcept ConfigError as e:\n    print(e)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.splitlines()
    assert out[0].startswith("needle.lengths: 64 tokens") and out[1] == "[]"


@pytest.mark.workflow
def test_snakemake_refuses_the_issues_grid_before_any_job(tmp_path, snakemake):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(micro(needle={"lengths": [64]})))
    proc = snakemake(tmp_path, "--configfile", str(tmp_path / "grid.yaml"), "-n", check=False)
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(err) == 1, proc.stderr
    assert err[0].startswith("ropelens: config error: needle.lengths: 64 tokens is too short")
    assert not (tmp_path / "results").exists()

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
from ropelens.cli import main
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


# --- aggregates of degenerate grids -----------------------------------------------------------

PRETRAINED = 64
GRID = {"model": None, "method": None, "length": None, "rope_type": "default", "factor": None}
GRID |= {"pretrained_length": PRETRAINED, "cpt_length": None}
HEADS = [(layer, head) for layer in range(2) for head in range(2)]


def _columns(rows: list[dict], schema) -> dict:
    return {name: [r.get(name) for r in rows] for name in schema.names}


def _grid(model, method, length) -> dict:
    return GRID | {"model": model, "method": method, "length": length}


def ppl_cell(root, model, method, length) -> str:
    from ropelens import schemas
    from ropelens.io import write_cell

    rows = [
        _grid(model, method, length)
        | {"protocol": "truncate", "doc_id": f"d{i}", "tokens": length, "nll_sum": 2.0 * length}
        | {"ppl": 7.4, "bin_tokens": [length // 2] * 2, "bin_loss": [2.0, 2.0]}
        for i in range(2)
    ]
    out = root / f"results/ppl/model={model}/method={method}/length={length}.parquet"
    return str(write_cell(_columns(rows, schemas.PPL), schemas.PPL, out))


def attention_cell(root, model, method, length) -> str:
    from ropelens import schemas
    from ropelens.io import write_cell

    mass = [0.4, 0.2, 0.2, 0.2] if method == "rope" else [0.3, 0.3, 0.2, 0.2]
    rows = [
        _grid(model, method, length)
        | {"documents": 1, "query_window": 8, "layer": layer, "head": head, "n_queries": 8}
        | {"entropy_mean": 1.5, "entropy_last": 1.6, "pos_mass": mass, "dist_mass": mass}
        | {"sink_tokens": 4, "sink_mass": 0.3}
        for layer, head in HEADS
    ]
    out = root / f"results/attention/model={model}/method={method}/length={length}.parquet"
    return str(write_cell(_columns(rows, schemas.ATTENTION), schemas.ATTENTION, out))


def answer_cell(root, outcome, model, method, length, depth, task=None) -> str:
    """A needle cell (a task cell with ``task``): passed, failed or prompt_error."""
    from ropelens import schemas
    from ropelens.io import write_cell

    schema = schemas.TASKS if task else schemas.NEEDLE
    base = _grid(model, method, length) | {"depth": float(depth), "task": task}
    base |= {"registry_method": method, "prompt_format": "plain", "placement": "gkamradt"}
    if outcome == "prompt_error":
        error = f"needle: length {length} is too short for the needle and question"
        rows = [base | {"status": "prompt_error", "error": error, "passed": False}]
    else:
        passed = outcome == "pass"
        entropy = 1.0 if passed else 3.0
        base |= {"status": "ok", "passed": passed, "score": float(passed), "answer": "12345"}
        base |= {"generated": " 12345" if passed else " 99", "mean_entropy": entropy}
        base |= {"span_kind": ["needle"], "span_index": [0], "span_start": [10]}
        base |= {"span_end": [20], "mean_target_mass": 0.5, "predicted_distractor": False}
        rows = [
            base
            | {"layer": layer, "head": head, "entropy": entropy, "needle_mass": 0.5}
            | {"target_mass": 0.5, "span_mass": [0.5], "answering_queries": 3}
            for layer, head in HEADS
        ]
    kind = f"tasks/task={task}" if task else "needle"
    out = root / f"results/{kind}/model={model}/method={method}/length={length}"
    return str(write_cell(_columns(rows, schema), schema, out / f"depth={depth:g}.parquet"))


# the cells of each case: (model, method, length, outcome); model "b" never has cells
MIXED = [("a", "rope", 64, "pass"), ("a", "rope", 128, "fail"), ("a", "pi", 128, "pass")]
MIXED += [("a", "pi", 64, "fail")]
CASES = {
    "no_cells": [],
    "all_errored": [("a", x, n, "prompt_error") for x in ("rope", "pi") for n in (64, 128)],
    "all_failed": [(m, x, n, "fail") for m, x, n, _ in MIXED],
    "all_passed": [(m, x, n, "pass") for m, x, n, _ in MIXED],
    "one_cell": [("a", "rope", 64, "pass")],
    "model_without_cells": MIXED,
}
# what each case must say (in the tables' .md and in the charts of model a; b: no cells)
SAYS = {
    "no_cells": "No {what} cells of model 'a' in this grid",
    "all_errored": "4 of 4 cells have no result (4 prompt_error",
    "all_failed": "with a result failed",
    "all_passed": "with a result passed",
    "one_cell": "with a result passed (1 of 1)",
    "model_without_cells": "No {what} cells of model 'b' in this grid",
}
STATUS_CASES = list(CASES)  # needle and tasks: every case
GRID_CASES = ["no_cells", "one_cell", "model_without_cells"]  # ppl, attention: no status


def chart_args(root, flags: dict) -> tuple[list[str], list]:
    """``--html A B --png A B``-style arguments for models a and b, as the rules pass them:
    html flag -> file stem (with {model}); and the stems, whose .html/.png/.vl.json must exist."""
    f = root / "results/figures"
    args, stems = [], []
    for flag, stem in flags.items():
        names = [f / stem.format(model=m) for m in ("a", "b")]
        args += [flag, *(f"{n}.html" for n in names)]
        args += [flag.replace("html", "png"), *(f"{n}.png" for n in names)]
        stems += names
    return args, stems


def run_aggregate(root, command, cells, tables, flags, *extra, single: str = "") -> dict:
    """Run the aggregate; every table (.parquet/.csv/.md) and chart (.html/.png/.vl.json) it
    must write exists, and the report of them is written. Returns {file name: text}.
    ``single``: the stem of the one chart of every model (``--html``/``--png``), if any."""
    t = root / "results/tables"
    args, stems = chart_args(root, flags)
    if single:
        stems.append(root / "results/figures" / single)
        args += ["--html", f"{stems[-1]}.html", "--png", f"{stems[-1]}.png"]
    assert main([command, *cells, "--prefix", str(t / tables[0]), *args, *extra]) == 0
    out = {}
    for name in tables:
        for ext in (".parquet", ".csv", ".md"):
            assert (t / f"{name}{ext}").stat().st_size > 0, name + ext
        out[f"{name}.md"] = (t / f"{name}.md").read_text(encoding="utf-8")
    for stem in stems:
        for ext in (".html", ".png", ".vl.json"):
            assert stem.with_name(stem.name + ext).stat().st_size > 0, stem.name + ext
        out[stem.name] = stem.with_name(stem.name + ".vl.json").read_text(encoding="utf-8")
    files = [str(t / f"{name}.parquet") for name in tables]
    files += [str(stem.with_name(stem.name + ".html")) for stem in stems]
    report = root / "results/report.html"
    assert main(["report", *files, "--out", str(report)]) == 0
    out["report.html"] = report.read_text(encoding="utf-8")
    return out


def says(text: str, phrase: str) -> bool:
    """``phrase`` is in a table, a chart spec (JSON) or the report page (HTML-escaped)."""
    import html

    return phrase in text or json.dumps(phrase)[1:-1] in text or html.escape(phrase) in text


NEEDLE_TABLES = ["needle", "needle_entropy_strata", "needle_cpt"]
NEEDLE_CHARTS = {"--html": "needle_{model}", "--strata-html": "needle_entropy_strata_{model}"}


@pytest.mark.parametrize("case", STATUS_CASES)
def test_aggregate_needle(tmp_path, case):
    cells = [answer_cell(tmp_path, o, m, x, n, 50) for m, x, n, o in CASES[case]]
    out = run_aggregate(
        tmp_path, "aggregate-needle", cells, NEEDLE_TABLES, NEEDLE_CHARTS, "--models", "a", "b"
    )
    _check_answer_case(out, case, "needle", "needle_entropy_strata")
    if case == "all_errored":  # the heatmap draws the cells and says why they have no result
        assert says(out["needle_a"], "4 of 4 cells have no result (4 prompt_error: needle: length")


def _check_answer_case(out: dict, case: str, what: str, strata: str | None) -> None:
    """The tables, the charts of model a and b and the report say what the case lacks."""
    phrase = SAYS[case].format(what=what)
    for name, text in out.items():
        if name.endswith(".md") or name == "report.html":
            assert says(text, phrase), (name, phrase, text[:3000])
    b = f"No {what} cells of model 'b' in this grid."
    assert all(says(text, b) for name, text in out.items() if name.endswith("_b"))
    if strata is None:
        return
    drawn = case == "model_without_cells"  # a has passes and failures: a real AUROC chart
    assert says(out[f"{strata}_a"], "No AUROC") is False
    assert says(out[f"{strata}_a"], phrase) is (not drawn)
    assert ('"layer"' in out[f"{strata}_a"]) is drawn


TASK_CHARTS = {"--html": "tasks_passkey_{model}"}


@pytest.mark.parametrize("case", STATUS_CASES)
def test_aggregate_tasks(tmp_path, case):
    cells = [answer_cell(tmp_path, o, m, x, n, 50, "passkey") for m, x, n, o in CASES[case]]
    names = ["tasks", "tasks_entropy", "tasks_distractors", "tasks_hops"]
    extra = ("--models", "a", "b", "--tasks", "passkey")
    out = run_aggregate(tmp_path, "aggregate-tasks", cells, names, TASK_CHARTS, *extra)
    _check_answer_case(out, case, "passkey", None)
    if case == "all_errored":  # the heatmap draws the cells and says why they have no result
        assert says(out["tasks_passkey_a"], "4 of 4 cells have no result (4 prompt_error")


GRID_CELLS = {  # (model, method, length) of each case without a status
    "no_cells": [],
    "one_cell": [("a", "rope", PRETRAINED)],  # the JS reference itself
    "model_without_cells": [("a", x, n) for x in ("rope", "pi") for n in (PRETRAINED, 128)],
}


def _check_grid_case(out: dict, case: str, kind: str, charted_a: list[str]) -> None:
    """Tables, the report and the charts of a and b (or the one chart of all) say what's missing."""
    none = f"No {kind} cells in this grid."
    b = f"No {kind} cells of model 'b' in this grid."
    for name, text in out.items():
        if name.endswith(".md") or name == "report.html" or name == "ppl":
            assert says(text, none if case == "no_cells" else b), (name, text[:2000])
        if name.endswith("_b"):
            assert says(text, b), name
    a = f"No {kind} cells of model 'a' in this grid."
    for name in charted_a:  # a note without cells, a drawn chart with them
        assert says(out[name], a) is (case == "no_cells")
        assert ('"facet"' in out[name]) is (case != "no_cells")


@pytest.mark.parametrize("case", GRID_CASES)
def test_aggregate_ppl(tmp_path, case):
    cells = [ppl_cell(tmp_path, *c) for c in GRID_CELLS[case]]
    extra = ("--models", "a", "b")
    out = run_aggregate(tmp_path, "aggregate-ppl", cells, ["ppl"], {}, *extra, single="ppl")
    _check_grid_case(out, case, "perplexity", [])
    assert ('"facet"' in out["ppl"]) is (case != "no_cells")  # drawn, with the note under it


ATTENTION_CHARTS = {
    "--html": "attention_{model}",
    "--distance-html": "attention_distance_{model}",
    "--js-html": "attention_js_{model}",
}


@pytest.mark.parametrize("case", GRID_CASES)
def test_aggregate_attention(tmp_path, case):
    cells = [attention_cell(tmp_path, *c) for c in GRID_CELLS[case]]
    tables = ["attention_js"]
    extra = ("--models", "a", "b")
    out = run_aggregate(tmp_path, "aggregate-attention", cells, tables, ATTENTION_CHARTS, *extra)
    assert (tmp_path / "results/tables/attention_js_layers.parquet").exists()
    _check_grid_case(out, case, "attention", ["attention_a", "attention_distance_a"])


@pytest.mark.parametrize("case", GRID_CASES)
def test_aggregate_sinks(tmp_path, case):
    cells = [attention_cell(tmp_path, *c) for c in GRID_CELLS[case]]
    charts = {"--html": "sinks_{model}"}
    out = run_aggregate(tmp_path, "aggregate-sinks", cells, ["sinks"], charts, "--models", "a", "b")
    assert (tmp_path / "results/tables/sinks_layers.parquet").exists()
    _check_grid_case(out, case, "attention", ["sinks_a"])


@pytest.mark.workflow
def test_a_grid_whose_every_needle_cell_errs_still_gets_its_report(
    tmp_path, snakemake, tiny_model_dir
):
    """The issue's grid with a model the plan cannot measure prompts for (its own directory):
    every needle cell is a prompt_error, and the run ends with the report saying so."""
    cfg = micro(needle={"lengths": [64]}, lengths=[64], depths=[0, 50])
    cfg["models"] = {"micro": {"path": str(tiny_model_dir), "pretrained_length": 64}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, "--configfile", str(tmp_path / "grid.yaml"), "--cores", "2")
    results = tmp_path / "results"
    why = "No needle cell of model 'micro' has a result: 4 of 4 cells have no result"
    assert why + " (4 prompt_error: needle: length 64 is too short" in _md(results, "needle")
    assert says((results / "figures/needle_entropy_strata_micro.vl.json").read_text(), why)
    assert says((results / "report.html").read_text(encoding="utf-8"), why)


def _md(results, name: str) -> str:
    return (results / "tables" / f"{name}.md").read_text(encoding="utf-8")


# --- errors: the JSON arguments are blamed only for their own keys ----------------------------


def _error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("ropelens: error: "), err
    return err[0]


def test_a_key_missing_from_a_json_argument_names_that_argument(tmp_path, capsys):
    out = tmp_path / "c.parquet"
    assert main(["corpus", "--spec", '{"split": "test"}', "--out", str(out)]) == 1
    line = _error_line(capsys)
    assert f"corpus for {out}: the JSON argument --spec lacks the key 'dataset'" in line


def test_an_internal_key_error_is_named_as_one(tmp_path, capsys, monkeypatch):
    """The issue's mislabel: a KeyError on a table inside a command is a bug, not an argument."""
    import pandas as pd

    from ropelens import retrieval

    monkeypatch.setattr(retrieval, "strata_table", lambda cells: pd.DataFrame()["model"])
    cell = answer_cell(tmp_path, "pass", "a", "rope", 64, 0)
    prefix = tmp_path / "results/tables/needle"
    argv = ["aggregate-needle", cell, "--prefix", str(prefix), "--models", "a"]
    assert main(argv) == 1
    line = _error_line(capsys)
    assert line.startswith(f"ropelens: error: aggregate-needle: internal error for {prefix}: ")
    assert "KeyError: 'model'" in line and "JSON" not in line and "--debug" in line
    assert main(["--debug", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == line


def test_a_json_argument_lacking_the_key_is_not_blamed_for_a_lookup_elsewhere(
    tmp_path, capsys, monkeypatch
):
    """--reference lacks 'model' too, but the KeyError comes from a table: internal."""
    import pandas as pd

    from ropelens import distributions

    monkeypatch.setattr(distributions, "js_table", lambda *a: pd.DataFrame()["model"])
    prefix = tmp_path / "t/attention_js"
    argv = ["aggregate-attention", "--prefix", str(prefix), "--reference", '{"method": "rope"}']
    assert main(argv) == 1
    line = _error_line(capsys)
    assert f"aggregate-attention: internal error for {prefix}: KeyError: 'model'" in line


# --- a results folder the run cannot write: one line before any job -----------------------------


def test_a_file_where_the_results_folder_must_be_is_refused(tmp_path):
    from ropelens import preflight

    (tmp_path / "results").write_text("not a folder")
    cell = tmp_path / "results/ppl/model=m/method=rope/length=64.parquet"
    line = preflight.unwritable([str(cell)])
    assert line.startswith(f"cannot write '{cell}': '{tmp_path / 'results'}' is a file, not a")
    with pytest.raises(NotADirectoryError):  # what the job would meet, as root too
        cell.parent.mkdir(parents=True)


def test_writable_folders_pass_and_keep_nothing_of_the_check(tmp_path):
    from ropelens import preflight

    (tmp_path / "logs").mkdir()
    paths = [tmp_path / "results/tables/ppl.md", tmp_path / "logs/report/ppl.log"]
    assert preflight.unwritable([str(p) for p in paths]) is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs"]


def test_a_folder_without_write_permission_is_refused_unless_the_user_can_write_it(tmp_path):
    """Root writes through a chmod: the check refuses only what the jobs could not do."""
    import os

    from ropelens import preflight

    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = preflight.unwritable([str(folder / "tables/ppl.md")])
        if os.geteuid() == 0:
            assert line is None
            (folder / "written-by-root").write_text("x")  # as the jobs would
        else:
            assert f"'{folder}' cannot be written (Permission denied)" in line
    finally:
        folder.chmod(0o755)


def read_only(folder, *cmd, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``folder`` mounted read-only (a private mount namespace: root cannot
    write there either); skip where this machine cannot make one."""
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(folder), "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"no read-only bind mount here (unshare -rm): {probe.stderr[-200:]!r}")
    argv = ["unshare", "-rm", "sh", "-c", script, "sh", str(folder), *cmd]
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def test_a_read_only_results_folder_is_refused(tmp_path):
    (tmp_path / "results").mkdir()
    code = "import sys; from ropelens import preflight; print(preflight.unwritable(sys.argv[1:]))"
    cell = str(tmp_path / "results/ppl/model=m/method=rope/length=64.parquet")
    proc = read_only(tmp_path / "results", sys.executable, "-c", code, cell, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "results' cannot be written (Read-only file system)" in proc.stdout


def _refused_before_any_job(proc, workdir, expect: str) -> None:
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("ropelens:")]
    assert proc.returncode != 0 and len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith("ropelens: error: cannot write ") and expect in err[0], err[0]
    assert "Traceback" not in proc.stderr and "OSError" not in proc.stderr
    assert not (workdir / "logs").exists() and not (workdir / "resources").exists()


@pytest.mark.workflow
@pytest.mark.parametrize("args", [["-n"], ["-c1"]])
def test_snakemake_refuses_a_results_file_before_planning(tmp_path, snakemake, args):
    """Snakemake itself would stop with a NotADirectoryError traceback while building the DAG."""
    (tmp_path / "results").write_text("not a folder")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(MICRO))
    proc = snakemake(tmp_path, "--configfile", str(tmp_path / "grid.yaml"), *args, check=False)
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith("ropelens: error: 'results' is a file, not a folder, but the work")
    assert not (tmp_path / "logs").exists()


@pytest.mark.workflow
def test_snakemake_refuses_a_read_only_results_folder_before_any_job(tmp_path):
    from .conftest import snakemake_bin

    (tmp_path / "results").mkdir()
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(MICRO))
    argv = [snakemake_bin(), "-s", str(REPO / "Snakefile"), "--configfile", "grid.yaml", "-c1"]
    proc = read_only(tmp_path / "results", *argv, cwd=tmp_path, timeout=600)
    _refused_before_any_job(proc, tmp_path, "'results' cannot be written (Read-only file system)")

"""The workflow end to end on a micro config: cells, aggregates, incremental reruns, bad input."""

import math

import pyarrow.parquet as pq
import pytest
import yaml

from ropelens import schemas
from ropelens.io import dataset

from .conftest import job_counts

pytestmark = pytest.mark.workflow

MICRO = {
    "models": {
        "micro": {
            "tiny": {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1},
            "pretrained_length": 64,
        }
    },
    "methods": {"rope": {}, "pi": {"factor": 2}},
    "lengths": [64, 128],
    "depths": [0, 100],
    "corpora": {
        "code": {"builtin": "stdlib", "max_documents": 12},
        "prose": {"builtin": "pydoc", "split": "train", "max_documents": 6},
    },
    "ppl": {"corpus": "code", "max_documents": 2, "position_bins": 4},
    # 64 tokens cannot hold the needle prompt (refused at plan time); tests/test_degenerate.py
    # runs a grid whose every needle cell is a prompt_error
    "needle": {"lengths": [128]},
}


def write_config(workdir, cfg):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "micro.yaml").write_text(yaml.safe_dump(cfg))
    return ["--configfile", str(workdir / "micro.yaml")]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, snakemake):
    workdir = tmp_path_factory.mktemp("micro")
    args = write_config(workdir, MICRO)
    snakemake(workdir, *args, "--cores", "2")
    return workdir, args


def test_cells_table_and_chart(micro_run):
    workdir, _ = micro_run
    cells = sorted((workdir / "results/ppl").rglob("*.parquet"))
    assert [c.relative_to(workdir / "results/ppl").as_posix() for c in cells] == [
        "model=micro/method=pi/length=128.parquet",
        "model=micro/method=pi/length=64.parquet",
        "model=micro/method=rope/length=128.parquet",
        "model=micro/method=rope/length=64.parquet",
    ]
    for c in cells:
        t = pq.read_table(c)
        assert t.schema.names == schemas.PPL.names
        assert t.num_rows == 2
    table = pq.read_table(workdir / "results/tables/ppl.parquet").to_pandas()
    assert len(table) == 4 and (table["ppl"] > 1).all()
    assert set(table["rope_type"]) == {"default", "linear"}
    for name in ("tables/ppl.csv", "tables/ppl.md", "figures/ppl.html", "figures/ppl.png"):
        assert (workdir / "results" / name).stat().st_size > 0
    assert "| pi |" in (workdir / "results/tables/ppl.md").read_text()
    assert not list(workdir.rglob("*.tmp")), "temporary files left behind"


def test_attention_cells_and_aggregates(micro_run):
    workdir, _ = micro_run
    cells = sorted((workdir / "results/attention").rglob("*.parquet"))
    assert len(cells) == 4
    t = pq.read_table(cells[0])
    assert t.schema.names == schemas.ATTENTION.names
    assert t.num_rows == 1 * 2  # layers x heads of the micro model
    js = pq.read_table(workdir / "results/tables/attention_js.parquet").to_pandas()
    assert len(js) == 4 * 2 and set(js["layer"]) == {"mean"}  # cells x coordinate systems
    assert set(js["coordinates"]) == {"position", "distance"}
    ref = js[(js["method"] == "rope") & (js["length"] == 64)]
    assert (ref[["js_head_averaged", "js_per_head"]].to_numpy() == 0).all()
    assert set(js["reference"]) == {"rope at the pretrained length"}
    for name in (
        "tables/attention_js.md",
        "figures/attention_micro.png",
        "figures/attention_distance_micro.png",
        "figures/attention_js_micro.png",
    ):
        assert (workdir / "results" / name).stat().st_size > 0
    sinks = pq.read_table(workdir / "results/tables/sinks_layers.parquet").to_pandas()
    assert len(sinks) == 4 * 2 and sinks["sink_mass"].between(0, 1).all()  # 4 cells x (1 + mean)
    for name in ("tables/sinks.md", "figures/sinks_micro.png"):
        assert (workdir / "results" / name).stat().st_size > 0
    assert (workdir / "logs/ppl/model=micro/method=pi/length=64.log").exists()


def test_needle_cells_and_aggregates(micro_run):
    workdir, _ = micro_run
    cells = sorted((workdir / "results/needle").rglob("*.parquet"))
    rel = [c.relative_to(workdir / "results/needle").as_posix() for c in cells]
    assert "model=micro/method=pi/length=128/depth=100.parquet" in rel and len(cells) == 4
    df = dataset(workdir / "results/needle").to_table().to_pandas()  # the grid as one table
    long = df[df["length"] == 128]
    assert len(long) == len(df)
    assert set(long["status"]) == {"ok"}
    assert len(long) == 4 * 1 * 2  # cells x layers x heads
    assert long["entropy"].between(0, math.log(128 + 10)).all()  # prompt + generated keys
    summary = pq.read_table(workdir / "results/tables/needle.parquet").to_pandas()
    assert set(summary["method"]) == {"rope", "pi", "(all methods)"}
    for name in ("tables/needle.md", "tables/needle_cpt.md", "figures/needle_micro.png"):
        assert (workdir / "results" / name).stat().st_size > 0


def test_rerun_is_a_noop_and_deleted_cell_is_recomputed(micro_run, snakemake):
    workdir, args = micro_run
    assert job_counts(snakemake(workdir, *args, "-n")) == {}
    (workdir / "results/ppl/model=micro/method=rope/length=128.parquet").unlink()
    expected = {"ppl": 1, "ppl_table": 1, "html_report": 1, "all": 1}
    assert job_counts(snakemake(workdir, *args, "-n")) == expected
    snakemake(workdir, *args, "--cores", "2")
    assert job_counts(snakemake(workdir, *args, "-n")) == {}


def test_changed_method_params_rerun_only_that_method(micro_run, snakemake, tmp_path):
    workdir, _ = micro_run
    cfg = yaml.safe_load((workdir / "micro.yaml").read_text())
    cfg["methods"]["pi"]["factor"] = 3
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir, "--configfile", str(path), "-n")
    assert job_counts(proc) == {
        "ppl": 2,
        "attention": 2,
        "needle": 2,
        "ppl_table": 1,
        "attention_report": 1,
        "sinks_report": 1,
        "needle_report": 1,
        "html_report": 1,
        "all": 1,
    }
    wildcards = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("wildcards:")]
    assert len(wildcards) == 6 and not [w for w in wildcards if "method=rope" in w]


@pytest.mark.parametrize(
    "change,expect",
    [
        ({"methods": {"x": {"method": "longlora"}}}, "methods.x.method: unknown method 'longlora'"),
        ({"methods": {"pi": {}}}, "methods.pi.factor: method 'pi' requires 'factor'"),
        ({"lengths": [64, -3]}, "lengths[1]: -3 is out of range"),
        ({"depths": [50, 150]}, "depths[1]: 150 is out of range"),
        (
            {"models": {"micro": {"path": "nowhere", "pretrained_length": 32}}},
            "models.micro.path: directory 'nowhere' does not exist",
        ),
        ({"corpora": {"code": {"path": "nofile.txt"}}}, "corpora.code.path: 'nofile.txt'"),
    ],
)
def test_bad_config_is_one_line_before_any_job(tmp_path, snakemake, change, expect):
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    for key, value in change.items():
        if isinstance(value, dict) and key in ("methods",):
            cfg[key].update(value)
        else:
            cfg[key] = value
    args = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, *args, "--cores", "1", check=False)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == [f"ropelens: config error: {err[0].split('config error: ')[1]}"], proc.stderr
    assert expect in err[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "results").exists()


def test_uncomputable_cell_writes_nothing(tmp_path, snakemake):
    (tmp_path / "short.jsonl").write_text('{"text": "' + "x = 1\\n" * 10 + '"}\n')
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    cfg["corpora"] = {"code": {"path": "short.jsonl"}}
    cfg["needle"] = {"haystack": "code", "lengths": [128]}
    cfg["lengths"] = [16, 128]
    cfg["methods"] = {"rope": {}}
    args = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, *args, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    assert (tmp_path / "results/ppl/model=micro/method=rope/length=16.parquet").exists()
    assert not (tmp_path / "results/ppl/model=micro/method=rope/length=128.parquet").exists()
    log = (tmp_path / "logs/ppl/model=micro/method=rope/length=128.log").read_text()
    assert "ropelens: error: no document has 128 tokens" in log
    assert "Traceback" not in log
    # the same line on Snakemake's stderr, naming the cell
    shown = "ropelens: ppl model=micro, method=rope, length=128: ropelens: error: no document"
    assert shown in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "results").rglob("*.tmp"))


def test_paper_sized_grid_builds_its_dag(tmp_path, snakemake):
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    cfg["models"] = {
        f"m{i}": {"hub": f"org/model-{i}", "pretrained_length": 4096} for i in range(4)
    }
    cfg["methods"] = {f"pi-{f}": {"method": "pi", "factor": f} for f in (2, 4, 8, 16)}
    cfg["methods"].update({f"yarn-{f}": {"method": "yarn", "factor": f} for f in (2, 4, 8)})
    cfg["methods"]["rope"] = {}
    cfg["lengths"] = [2**k for k in range(10, 22)]
    del cfg["needle"]  # needle cells at every length
    args = write_config(tmp_path, cfg)
    counts = job_counts(snakemake(tmp_path, *args, "-n"))
    assert counts["ppl"] == 4 * 8 * 12


def test_html_report_and_snakemake_report(micro_run, snakemake):
    import zipfile

    workdir, args = micro_run
    page = (workdir / "results/report.html").read_text()
    for key in (
        "ppl",
        "attention",
        "attention_js",
        "needle",
        "entropy_failure",
        "cpt",
        "provenance",
    ):
        assert f'data-section="{key}"' in page
    assert (workdir / "logs/report/html.log").exists()
    snakemake(workdir, *args, "--report", "report.zip")
    names = {n.rsplit("/", 1)[-1] for n in zipfile.ZipFile(workdir / "report.zip").namelist()}
    expected = {"ppl.md", "ppl.png", "attention_js.md", "needle.md", "needle_cpt.md", "report.html"}
    assert expected <= names

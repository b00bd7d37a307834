"""Task cells through the workflow on a micro config: one cell file per task x method, the
aggregate tables and heatmaps, the cell files verify, and a rerun is a no-op."""

import pyarrow.parquet as pq
import pytest

from ropelens import schemas
from ropelens.io import check_cell

from .conftest import REPO, job_counts
from .test_workflow import MICRO, write_config

pytestmark = pytest.mark.workflow

TASKS_MICRO = {
    **MICRO,
    "lengths": [64, 320],
    "needle": {"lengths": [320]},  # 64 tokens cannot hold a needle prompt
    "tasks": {
        "lengths": [320],
        "depths": [50],
        "passkey": {},
        "multi_key": {"distractors": 2},
        "multi_value": {"values": 2},
        "variable_tracking": {"hops": 3},
    },
}
TARGETS = ["results/tables/tasks.parquet", "results/figures/tasks_multi_key_micro.png"]


@pytest.fixture(scope="module")
def tasks_run(tmp_path_factory, snakemake):
    workdir = tmp_path_factory.mktemp("tasks")
    args = write_config(workdir, TASKS_MICRO)
    counts = job_counts(snakemake(workdir, *args, "--cores", "2", *TARGETS))
    return workdir, args, counts


def test_task_cells_and_tables(tasks_run):
    workdir, _, counts = tasks_run
    assert counts["task"] == 4 * 2 and counts["task_report"] == 1
    cells = sorted((workdir / "results/tasks").rglob("*.parquet"))
    rel = [c.relative_to(workdir / "results/tasks").as_posix() for c in cells]
    one = "task=multi_key/model=micro/method=pi/length=320/depth=50.parquet"
    assert one in rel
    assert len(cells) == 8
    for c in cells:
        table, problem = check_cell(c)
        assert problem is None, problem
        assert table.schema.names == schemas.TASKS.names
        df = table.to_pandas()
        assert set(df["status"]) == {"ok"} and len(df) == 1 * 2  # layers x heads
        assert df["span_mass"].map(len).eq(df["span_kind"].map(len)).all()
    mk = pq.read_table(cells[rel.index(one)])
    assert mk.column("span_kind")[0].as_py() == ["needle", "distractor", "distractor"]
    passes = pq.read_table(workdir / "results/tables/tasks.parquet").to_pandas()
    assert len(passes) == 4 * 2 and set(passes["task"]) == {
        "passkey",
        "multi_key",
        "multi_value",
        "variable_tracking",
    }
    hops = pq.read_table(workdir / "results/tables/tasks_hops.parquet").to_pandas()
    assert sorted(set(hops["hop"])) == [0, 1, 2]
    dis = pq.read_table(workdir / "results/tables/tasks_distractors.parquet").to_pandas()
    assert set(dis["method"]) == {"rope", "pi", "(all methods)"}
    for name in ("tables/tasks_entropy.md", "figures/tasks_passkey_micro.png"):
        assert (workdir / "results" / name).stat().st_size > 0


def test_rerun_is_a_noop(tasks_run, snakemake):
    workdir, args, _ = tasks_run
    assert job_counts(snakemake(workdir, *args, "-n", *TARGETS)) == {}


def test_report_shows_the_task_sections(tasks_run, tmp_path):
    from ropelens import cli

    workdir, _, _ = tasks_run
    files = sorted(str(p) for p in (workdir / "results/tables").glob("tasks*.parquet"))
    files += sorted(str(p) for p in (workdir / "results/figures").glob("tasks_*.html"))
    out = tmp_path / "report.html"
    captions = str(REPO / "report")
    assert cli.main(["report", *files, "--out", str(out), "--captions", captions]) == 0
    page = out.read_text()
    assert "Passkey, multi-key, multi-value and variable tracking" in page
    assert "Synthetic tasks: entropy, distractors and hops" in page
    assert "Other results" not in page  # every task file has its section

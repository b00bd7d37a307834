"""The workflow end to end on a micro config: cells, aggregates, incremental reruns, bad input."""

import re

import pyarrow.parquet as pq
import pytest
import yaml

from ropelens import schemas

pytestmark = pytest.mark.workflow

MICRO = {
    "models": {
        "micro": {
            "tiny": {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1},
            "pretrained_length": 32,
        }
    },
    "methods": {"rope": {}, "pi": {"factor": 2}},
    "lengths": [16, 32],
    "corpora": {"code": {"builtin": "stdlib", "max_documents": 12}},
    "ppl": {"corpus": "code", "max_documents": 2, "position_bins": 4},
}


def job_counts(proc) -> dict:
    """Parse the 'Job stats' table of a snakemake (dry-)run."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    block = text.split("Job stats:")[1]
    counts = {}
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    counts.pop("total", None)
    return counts


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
        "model=micro/method=pi/length=16.parquet",
        "model=micro/method=pi/length=32.parquet",
        "model=micro/method=rope/length=16.parquet",
        "model=micro/method=rope/length=32.parquet",
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
    assert (workdir / "logs/ppl/model=micro/method=pi/length=16.log").exists()


def test_rerun_is_a_noop_and_deleted_cell_is_recomputed(micro_run, snakemake):
    workdir, args = micro_run
    assert job_counts(snakemake(workdir, *args, "-n")) == {}
    (workdir / "results/ppl/model=micro/method=rope/length=32.parquet").unlink()
    assert job_counts(snakemake(workdir, *args, "-n")) == {"ppl": 1, "ppl_table": 1, "all": 1}
    snakemake(workdir, *args, "--cores", "2")
    assert job_counts(snakemake(workdir, *args, "-n")) == {}


def test_changed_method_params_rerun_only_that_method(micro_run, snakemake, tmp_path):
    workdir, _ = micro_run
    cfg = yaml.safe_load((workdir / "micro.yaml").read_text())
    cfg["methods"]["pi"]["factor"] = 3
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir, "--configfile", str(path), "-n")
    assert job_counts(proc) == {"ppl": 2, "ppl_table": 1, "all": 1}
    assert "method=rope" not in proc.stdout.split("rule ppl_table")[0]


@pytest.mark.parametrize(
    "change,expect",
    [
        ({"methods": {"x": {"method": "longlora"}}}, "methods.x.method: unknown method 'longlora'"),
        ({"methods": {"pi": {}}}, "methods.pi.factor: method 'pi' requires 'factor'"),
        ({"lengths": [16, -3]}, "lengths[1]: -3 is out of range"),
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
    assert not list((tmp_path / "results").rglob("*.tmp"))


def test_paper_sized_grid_builds_its_dag(tmp_path, snakemake):
    cfg = yaml.safe_load(yaml.safe_dump(MICRO))
    cfg["models"] = {
        f"m{i}": {"hub": f"org/model-{i}", "pretrained_length": 4096} for i in range(4)
    }
    cfg["methods"] = {f"pi-{f}": {"method": "pi", "factor": f} for f in (2, 4, 8, 16)}
    cfg["methods"].update({f"yarn-{f}": {"method": "yarn", "factor": f} for f in (2, 4, 8, 16)})
    cfg["lengths"] = [2**k for k in range(10, 22)]
    args = write_config(tmp_path, cfg)
    counts = job_counts(snakemake(tmp_path, *args, "-n"))
    assert counts["ppl"] == 4 * 8 * 12

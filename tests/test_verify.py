"""Cells are verifiable: `ropelens verify` (and the aggregates) check every cell against its
declared schema and its own coordinates, name each bad one, and can delete it so the next run
recomputes exactly those; a truncated cell whose mtime did not change stops the plan."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from ropelens import schemas
from ropelens.io import write_cell

from .test_incremental import MICRO, planned_cells
from .test_user_errors import cli, one_line

pytestmark = pytest.mark.workflow

KIND_SCHEMA = {"ppl": schemas.PPL, "attention": schemas.ATTENTION, "needle": schemas.NEEDLE}


def fake_cell(root: Path, rel: str, schema=None, **override) -> Path:
    """A one-row cell at ``root/rel`` with the grid columns its path gives (or ``override``)."""
    kind = rel.split("/")[1]
    schema = schema or KIND_SCHEMA[kind]
    coords = dict(p.removesuffix(".parquet").split("=", 1) for p in rel.split("/") if "=" in p)
    values = {pa.string(): "x", pa.int64(): 1, pa.int32(): 0, pa.float64(): 1.0, pa.bool_(): True}
    rows = {}
    for f in schema:
        rows[f.name] = [[1] if pa.types.is_list(f.type) else values[f.type]]
    rows.update(model=[coords["model"]], method=[coords["method"]], length=[int(coords["length"])])
    if "depth" in schema.names and "depth" in coords:
        rows["depth"] = [float(coords["depth"])]
    rows.update({k: [v] for k, v in override.items()})
    spec = {"model": coords["model"], "method": coords["method"]}
    return write_cell(rows, schema, root / rel, {"ropelens.spec": json.dumps(spec)})


GRID = [
    *(
        f"results/ppl/model=micro/method={x}/length={n}.parquet"
        for x in ("rope", "pi")
        for n in (64, 128)
    ),
    *(f"results/attention/model=micro/method={x}/length=64.parquet" for x in ("rope", "pi")),
    *(f"results/needle/model=micro/method={x}/length=128/depth=0.parquet" for x in ("rope", "pi")),
]


def test_verify_names_and_deletes_exactly_the_bad_cells(tmp_path, snakemake):
    (tmp_path / "resources/models/micro").mkdir(parents=True)  # the built model, older than cells
    for rel in GRID:
        fake_cell(tmp_path, rel)
    ppl = GRID[0]
    bad = {
        GRID[1]: "its path says length=128 but its rows say 64",
        GRID[4]: "missing columns",  # a needle cell where an attention cell belongs
        GRID[6]: "not a readable Parquet cell",  # truncated, same mtime
        GRID[3]: "computed for rope",  # metadata from another method
    }
    fake_cell(tmp_path, GRID[1], length=64)
    fake_cell(tmp_path, GRID[4].replace("attention", "needle"))
    os.replace(tmp_path / GRID[4].replace("attention", "needle"), tmp_path / GRID[4])
    fake_cell(tmp_path, GRID[3])
    meta_cell = tmp_path / GRID[3]
    import pyarrow.parquet as pq

    t = pq.read_table(meta_cell)
    spec = json.dumps({"model": "micro", "method": "rope"})
    pq.write_table(t.replace_schema_metadata({b"ropelens.spec": spec.encode()}), meta_cell)
    trunc = tmp_path / GRID[6]
    stat = trunc.stat()
    trunc.write_bytes(trunc.read_bytes()[:-16])
    os.utime(trunc, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(MICRO))
    args = ["--configfile", str(cfg)]
    # the truncated cell stops the plan (Snakemake alone would call it up to date)
    line = one_line(snakemake(tmp_path, *args, "-n", check=False))
    assert f"(first: {GRID[6]})" in line and "ropelens verify results --delete" in line
    # an aggregate reading a bad cell names it
    line = one_line(cli(tmp_path, "aggregate-ppl", ppl, GRID[1], "--prefix", "t/ppl"))
    assert GRID[1] in line and bad[GRID[1]] in line

    proc = cli(tmp_path, "verify", "results")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    named = dict(re.findall(r"^bad cell (\S+): (.*)$", proc.stderr, re.M))
    assert set(named) == set(bad), proc.stderr
    for rel, why in bad.items():
        assert why in named[rel], (rel, named[rel])
    assert "4 of 8 cells ok, 4 bad" in proc.stderr

    proc = cli(tmp_path, "verify", "results", "--delete")
    assert proc.returncode == 0 and "deleted 4 bad cell(s)" in proc.stderr
    assert sorted(p for p in GRID if (tmp_path / p).exists()) == sorted(set(GRID) - set(bad))
    plan = snakemake(tmp_path, *args, "-n")
    assert planned_cells(plan) == set(bad)  # exactly the deleted cells, nothing finished
    assert cli(tmp_path, "verify", "results").returncode == 0

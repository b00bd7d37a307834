"""Atomic Parquet cells and schema-checked reading."""

from __future__ import annotations

import os
from pathlib import Path

from ropelens.atomic import atomic_path
from ropelens.errors import DataError


def write_table(table, out: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``table`` to ``out`` atomically (:mod:`ropelens.atomic`)."""
    import pyarrow.parquet as pq

    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return Path(out)


def write_cell(rows: dict, schema, out: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Build a table from column lists, cast to the declared ``schema``, write atomically."""
    import pyarrow as pa

    table = pa.table({name: rows[name] for name in schema.names}, schema=schema)
    return write_table(table, out, metadata)


def read_cells(paths, schema):
    """Concatenate cell files, checking each against the declared ``schema`` and its own path."""
    import pyarrow as pa

    tables = []
    for p in paths:
        table, problem = check_cell(p, schema)
        if problem:
            raise DataError(f"{p}: {problem}; delete it (ropelens verify --delete) and rerun")
        tables.append(table)
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


CELL_KINDS = ("ppl", "attention", "needle", "tasks")


def cell_schema(path: str | os.PathLike):
    """The declared schema of a cell from its path (``.../ppl/model=.../...``,
    ``.../tasks/task=.../model=...``), or None."""
    from ropelens import schemas

    parts = Path(path).parts
    kinds = [
        p
        for p, nxt in zip(parts, parts[1:])
        if p in CELL_KINDS and nxt.startswith("task=" if p == "tasks" else "model=")
    ]
    return getattr(schemas, kinds[-1].upper()) if kinds else None


def check_cell(path: str | os.PathLike, schema=None):
    """(table cast to the schema, None) or (None, what is wrong): unreadable, other columns or
    types, no rows, or grid columns / metadata that disagree with the cell's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = schema if schema is not None else cell_schema(path)
    if schema is None:
        return None, "not under a ppl/, attention/, needle/ or tasks/ cell folder"
    try:
        t = pq.read_table(path, partitioning=None)
    except (OSError, pa.ArrowException) as e:
        return None, f"not a readable Parquet cell ({str(e).splitlines()[0]})"
    missing = [f.name for f in schema if f.name not in t.column_names]
    if missing:
        return None, f"missing columns {', '.join(missing)} (written by another version or kind)"
    meta = t.schema.metadata or {}
    try:
        t = t.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        return None, f"column types differ from the schema ({e})"
    if t.num_rows == 0:
        return None, "has no rows"
    problem = _grid_problem(Path(path), t, meta)
    return (None, problem) if problem else (t, None)


def _grid_problem(path: Path, table, meta: dict) -> str | None:
    """The cell's coordinates in its path vs its columns and its recorded spec."""
    import json

    coords = dict(p.removesuffix(".parquet").split("=", 1) for p in path.parts if "=" in p)
    for key, value in coords.items():
        if key not in table.column_names:
            continue
        found = set(table.column(key).to_pylist())
        want = float(value) if key == "depth" else int(value) if key == "length" else value
        if found != {want}:
            shown = ", ".join(sorted(map(str, found)))
            return f"its path says {key}={value} but its rows say {shown}"
    spec = json.loads(meta.get(b"ropelens.spec", b"{}") or b"{}")
    for key in ("model", "method"):
        if key in spec and key in coords and spec[key] != coords[key]:
            return f"its path says {key}={coords[key]} but it was computed for {spec[key]}"
    return None


def verify(root: str | os.PathLike, delete: bool = False) -> tuple[int, list[tuple[Path, str]]]:
    """Check every cell under ``root``: (number of cells, [(bad cell, why)]); ``delete`` removes
    the bad ones so the next run recomputes exactly those."""
    root = Path(root)
    paths = sorted(p for p in root.rglob("*.parquet") if cell_schema(p) is not None)
    bad = [(p, problem) for p in paths for _, problem in [check_cell(p)] if problem]
    if delete:
        for p, _ in bad:
            p.unlink(missing_ok=True)
    return len(paths), bad


def dataset(root: str | os.PathLike):
    """The cells under ``root`` (e.g. ``results/needle``) as one ``pyarrow.dataset.Dataset``.

    The hive partition fields get the types the cells themselves declare (strings, int64 length),
    so they merge with the identical columns stored in every file.
    """
    import pyarrow.dataset as ds

    from ropelens.schemas import PARTITIONING

    return ds.dataset(
        str(root), format="parquet", partitioning=ds.partitioning(PARTITIONING, flavor="hive")
    )

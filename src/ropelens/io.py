"""Atomic Parquet cells and schema-checked reading."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ropelens.errors import DataError


def write_table(table, out: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``table`` to ``out`` atomically: a temp file in the same folder, then rename."""
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; cells are shared results
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_cell(rows: dict, schema, out: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Build a table from column lists, cast to the declared ``schema``, write atomically."""
    import pyarrow as pa

    table = pa.table({name: rows[name] for name in schema.names}, schema=schema)
    return write_table(table, out, metadata)


def read_cells(paths, schema):
    """Concatenate cell files, checking each against the declared ``schema``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for p in paths:
        try:
            t = pq.read_table(p)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(
                f"{p}: not a readable Parquet cell ({e}); delete it and rerun"
            ) from None
        missing = [f.name for f in schema if f.name not in t.column_names]
        if missing:
            raise DataError(
                f"{p}: missing columns {', '.join(missing)}; "
                "it was written by another version; delete it and rerun"
            )
        try:
            tables.append(t.select(schema.names).cast(schema))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{p}: column types differ from the schema ({e})") from None
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


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

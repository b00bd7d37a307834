"""Aggregate tables: read cells, reduce, write Parquet + CSV + Markdown (one :class:`Shown` list
for the Markdown and the HTML report)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ropelens import schemas
from ropelens.atomic import atomic_path, write_text
from ropelens.io import read_cells, write_table

if TYPE_CHECKING:
    import pandas as pd


def ppl_table(cell_paths):
    """Token-weighted corpus perplexity per (model, method, length)."""
    import pyarrow as pa

    df = read_cells(cell_paths, schemas.PPL).to_pandas()
    keys = [f.name for f in schemas.GRID + schemas.METHOD_INFO]
    if df.empty:
        return schemas.PPL_TABLE.empty_table()
    grouped = df.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(
        documents=("doc_id", "nunique"),
        tokens=("tokens", "sum"),
        nll_sum=("nll_sum", "sum"),
        mean_doc_ppl=("ppl", "mean"),
    ).reset_index()
    out["ppl"] = [math.exp(n / t) for n, t in zip(out["nll_sum"], out["tokens"])]
    out = out.drop(columns="nll_sum")
    return pa.Table.from_pandas(
        out[schemas.PPL_TABLE.names], schemas.PPL_TABLE, preserve_index=False
    )


# --- a table as shown: one DataFrame for the Markdown (.md) and the HTML report -----------------

SHOWN_KEY = "ropelens.shown"  # Parquet metadata of an aggregate: how it is shown (JSON)


@dataclass
class Shown:
    """One table as a reader sees it: ``frame`` holds text (numbers already formatted; its first
    column names the rows), under a ``title`` and a ``note``. :func:`write_shown` hands the same
    list to the ``.md`` file and, in the Parquet's metadata, to ``ropelens report``."""

    frame: pd.DataFrame
    title: str = ""
    note: str = ""


def text_frame(df, floats: str = "{:.3f}") -> pd.DataFrame:
    """``df`` with every cell as text: floats by ``floats`` (NaN: —), the rest by ``str``."""
    import pandas as pd

    def text(v) -> str:
        if isinstance(v, float):
            return "—" if v != v else floats.format(v)
        return str(v)

    return pd.DataFrame(
        [[text(v) for v in row] for row in df.itertuples(index=False)],
        columns=[str(c) for c in df.columns],
    )


def to_markdown(shown: list[Shown]) -> str:
    """Pipe tables, each under ``### title`` and its note."""
    parts = []
    for s in shown:
        lines = [f"### {s.title}", ""] if s.title else []
        lines += [s.note, ""] if s.note else []
        cols = list(s.frame.columns)
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row) + " |" for row in s.frame.itertuples(index=False)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def shown_metadata(shown: list[Shown]) -> dict:
    items = [
        {
            "title": s.title,
            "note": s.note,
            "columns": list(s.frame.columns),
            "rows": s.frame.values.tolist(),
        }
        for s in shown
    ]
    return {SHOWN_KEY: json.dumps(items, ensure_ascii=False)}


def read_shown(metadata: dict | None) -> list[Shown] | None:
    """The :class:`Shown` list a Parquet schema's metadata carries, or None."""
    import pandas as pd

    raw = (metadata or {}).get(SHOWN_KEY.encode())
    if raw is None:
        return None
    return [
        Shown(pd.DataFrame(i["rows"], columns=i["columns"]), i["title"], i["note"])
        for i in json.loads(raw)
    ]


def write_shown(table, prefix: str | Path, shown: list[Shown], csv=None) -> None:
    """``prefix``.parquet (``table``, with ``shown`` in its metadata), .csv (``table``; or by the
    function ``csv(path)``) and .md (``shown``)."""
    import pyarrow.csv as pacsv

    prefix = Path(prefix)
    write_table(table, prefix.with_suffix(".parquet"), shown_metadata(shown))
    with atomic_path(prefix.with_suffix(".csv")) as tmp:
        if csv is not None:
            csv(tmp)
        else:
            pacsv.write_csv(table, tmp)
    write_text(prefix.with_suffix(".md"), to_markdown(shown))


def write_frame(df, prefix: str | Path, floats: str = "{:.3f}", note: str = "") -> None:
    """A pandas table as ``prefix``.parquet, .csv (by pandas) and .md, shown as itself
    (:func:`text_frame`) under ``note`` (what the table lacks and why; a table without rows
    says it has none)."""
    import pyarrow as pa

    table = pa.Table.from_pandas(df, preserve_index=False)
    note = note or ("" if len(df) else "No rows: the grid has no cells to tabulate here.")
    shown = [Shown(text_frame(df, floats), note=note)]
    write_shown(table, prefix, shown, csv=lambda path: df.to_csv(path, index=False))


def pivots(table, value: str, fmt: str = "{:.2f}") -> list[Shown]:
    """One table per model: methods as rows, lengths as columns."""
    import pandas as pd

    df = table.to_pandas()
    shown = []
    for model, sub in df.groupby("model", sort=True):
        pivot = sub.pivot_table(index="method", columns="length", values=value, aggfunc="first")
        pretrained = int(sub["pretrained_length"].iloc[0])
        header = ["method"] + [f"{c}" + (" (pt)" if c == pretrained else "") for c in pivot.columns]
        rows = [
            [str(method)] + ["—" if (v != v) else fmt.format(v) for v in row.tolist()]
            for method, row in pivot.iterrows()
        ]
        title = f"{model} — {value} (pretrained length {pretrained})"
        shown.append(Shown(pd.DataFrame(rows, columns=header), title))
    return shown


def write_outputs(
    table, prefix: str | Path, value: str, fmt: str = "{:.2f}", note: str = ""
) -> None:
    """``prefix``.parquet, .csv and .md: the table, shown as :func:`pivots` of ``value`` (or,
    without rows, as an empty table) under ``note``: what the table lacks, if anything."""
    shown = pivots(table, value, fmt) or [empty_shown(note)]
    shown[0].note = shown[0].note or note
    write_shown(table, prefix, shown)


def empty_shown(note: str = "", columns=("method",)) -> Shown:
    """How a table without rows is shown: its header under ``note``."""
    import pandas as pd

    return Shown(pd.DataFrame(columns=list(columns)), note=note or "No cells in this grid.")

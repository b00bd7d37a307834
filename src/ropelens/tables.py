"""Aggregate tables: read cells, reduce, write Parquet + CSV + Markdown."""

from __future__ import annotations

import math
from pathlib import Path

from ropelens import schemas
from ropelens.atomic import atomic_path, write_text
from ropelens.io import read_cells, write_table


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


def markdown_pivot(table, value: str, fmt: str = "{:.2f}") -> str:
    """One Markdown table per model: methods as rows, lengths as columns."""
    df = table.to_pandas()
    parts = []
    for model, sub in df.groupby("model", sort=True):
        pivot = sub.pivot_table(index="method", columns="length", values=value, aggfunc="first")
        pretrained = int(sub["pretrained_length"].iloc[0])
        header = ["method"] + [f"{c}" + (" (pt)" if c == pretrained else "") for c in pivot.columns]
        lines = [f"### {model} — {value} (pretrained length {pretrained})", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for method, row in pivot.iterrows():
            cells = ["—" if (v != v) else fmt.format(v) for v in row.tolist()]
            lines.append("| " + " | ".join([str(method)] + cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_outputs(table, prefix: str | Path, value: str, fmt: str = "{:.2f}") -> None:
    """``prefix``.parquet, .csv and .md."""
    import pyarrow.csv as pacsv

    prefix = Path(prefix)
    write_table(table, prefix.with_suffix(".parquet"))
    with atomic_path(prefix.with_suffix(".csv")) as tmp:
        pacsv.write_csv(table, tmp)
    write_text(prefix.with_suffix(".md"), markdown_pivot(table, value, fmt))

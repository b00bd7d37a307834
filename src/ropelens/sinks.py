"""Attention sinks: the attention mass on the first tokens, per layer, and its chart.

Pretrained LLMs put much of their attention on the first few tokens whatever they say (Xiao et
al. 2023, "attention sinks"); a random or barely trained model does not. Every attention cell
records, per layer × head, the mean over its measured queries of the mass on keys
[0, ``attention.sink_tokens``) — one span of the streaming statistics
(:class:`ropelens.attention.StatsSpec`), so it is exact like the other statistics. This module
turns the cells into a table per (model, method, length, layer) and a chart of sink mass per
layer, a line per method, a panel per length (:func:`ropelens.charts.sink_chart`).
"""

from __future__ import annotations

import numpy as np


def with_sink_columns(stats, sink_tokens: int):
    """The statistics table with ``sink_tokens`` and ``sink_mass`` (its first span's mass)."""
    import pyarrow as pa

    mass = [m[0] if m else None for m in stats.column("span_mass").to_pylist()]
    stats = stats.append_column("sink_tokens", pa.array([sink_tokens] * stats.num_rows, pa.int64()))
    return stats.append_column("sink_mass", pa.array(mass, pa.float64()))


def sink_table(cell_paths):
    """Head-mean (and largest head's) sink mass per (model, method, length, layer), + a mean row."""
    import pyarrow as pa

    from ropelens import schemas
    from ropelens.io import read_cells

    df = read_cells(cell_paths, schemas.ATTENTION).to_pandas()
    keys = [f.name for f in schemas.GRID + schemas.METHOD_INFO] + ["sink_tokens"]
    rows = []
    for key, cell in df.groupby(keys, dropna=False, sort=True):
        base = dict(zip(keys, key))
        per_layer = cell.groupby("layer", sort=True)["sink_mass"]
        means, maxes = per_layer.mean(), per_layer.max()
        for layer in means.index:
            rows.append({**base, "layer": str(layer), "sink_mass": means[layer]})
            rows[-1]["sink_mass_max"] = maxes[layer]
        rows.append({**base, "layer": "mean", "sink_mass": float(np.mean(means))})
        rows[-1]["sink_mass_max"] = float(cell["sink_mass"].max())
    out = {f.name: [_plain(r[f.name]) for r in rows] for f in schemas.ATTENTION_SINKS}
    return pa.table(out, schema=schemas.ATTENTION_SINKS)


def _plain(v):
    """NaN (a missing cpt_length) as None, numpy scalars as Python values."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v.item() if hasattr(v, "item") else v

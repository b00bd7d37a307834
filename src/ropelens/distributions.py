"""Attention distributions: one cell per (model, method, length), Fig. 2/3 and Table 1 aggregates.

A cell runs the longest ``documents`` documents (first ``length`` tokens) through the model with the
streaming statistics engine (:mod:`ropelens.attention`) and keeps, per layer × head, the mean over
the measured queries (the last ``query_fraction`` of each document) of the attention mass per
normalised key-position bin (k / L), per log-distance bin, and the attention entropy.

The Jensen–Shannon table compares, per layer, the head-averaged key-position distribution of every
(method, length) with the reference method (plain RoPE) at the model's pretrained length.
"""

from __future__ import annotations

import math

import numpy as np

from ropelens.errors import DataError


def measure(model, token_table, length: int, settings: dict, progress=None):
    """Per-(layer, head) statistics table of one attention cell, and the documents used."""
    from ropelens.attention import StatsSpec, record_attention
    from ropelens.ppl import select_documents

    n_tokens = token_table.column("n_tokens").to_pylist()
    chosen = select_documents(n_tokens, length, settings["documents"])
    if not chosen:
        raise DataError(
            f"no document has {length} tokens (longest: {max(n_tokens, default=0)}); "
            f"remove length {length} from attention.lengths or use a corpus with longer documents"
        )
    window = query_window(length, settings["query_fraction"])
    sink = min(settings.get("sink_tokens", 4), length)
    spec = StatsSpec(
        position_bins=settings["position_bins"],
        distance_bins=settings["distance_bins"],
        spans=[(0, sink)],  # attention sinks: the mass on the first keys (ropelens.sinks)
        query_start=length - window,
        memory_budget_bytes=settings["memory_budget_mb"] * 2**20,
    )
    import torch

    decoder = model.get_decoder()
    device = next(model.parameters()).device
    input_ids = token_table.column("input_ids")
    with record_attention(model, spec) as rec, torch.no_grad():
        for i in progress(chosen) if progress else chosen:
            ids = np.asarray(input_ids[i].values.to_numpy()[:length])
            decoder(input_ids=torch.tensor(ids[None], dtype=torch.long, device=device))
    from ropelens.sinks import with_sink_columns

    return with_sink_columns(rec.table(), sink), len(chosen)


def query_window(length: int, fraction: float) -> int:
    """Number of measured queries: the last ceil(fraction * length), at least one."""
    return max(1, min(length, math.ceil(fraction * length - 1e-9)))


def js_divergence(p, q) -> float:
    from ropelens.attention import js_divergence as js

    return js(p, q)


def _layer_means(df):
    """Mean key-position distribution and entropy per (model, method, length, layer)."""
    rows = []
    keys = ["model", "method", "length", "layer"]
    for key, sub in df.groupby(keys, sort=True):
        rows.append(
            dict(
                zip(keys, key),
                pos=np.mean(np.stack(sub["pos_mass"].to_numpy()), axis=0),
                entropy=float(sub["entropy_mean"].mean()),
            )
        )
    return rows


def js_table(cell_paths, reference: str):
    """JS divergence of every (model, method, length) vs ``reference`` at the pretrained length."""
    import pyarrow as pa

    from ropelens import schemas
    from ropelens.io import read_cells

    df = read_cells(cell_paths, schemas.ATTENTION).to_pandas()
    info_cols = [f.name for f in schemas.METHOD_INFO]
    info = df.drop_duplicates(["model", "method", "length"]).set_index(
        ["model", "method", "length"]
    )
    layers = _layer_means(df)
    ref = {
        (r["model"], r["layer"]): r["pos"]
        for r in layers
        if r["method"] == reference
        and r["length"] == info.loc[(r["model"], r["method"], r["length"]), "pretrained_length"]
    }
    out = {name: [] for name in schemas.ATTENTION_JS.names}

    def emit(model, method, length, layer, js, entropy):
        meta = info.loc[(model, method, length)]
        out["model"].append(model)
        out["method"].append(method)
        out["length"].append(int(length))
        for c in info_cols:
            v = meta[c]
            out[c].append(None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
        out["layer"].append(layer)
        out["reference_method"].append(reference)
        out["reference_length"].append(int(meta["pretrained_length"]))
        out["js_divergence"].append(js)
        out["entropy_mean"].append(entropy)

    by_cell: dict = {}
    for r in layers:
        if (r["model"], r["layer"]) not in ref:
            raise DataError(
                f"attention cells of model '{r['model']}' lack the reference "
                f"'{reference}' at the pretrained length; rerun the workflow to compute it"
            )
        js = js_divergence(r["pos"], ref[(r["model"], r["layer"])])
        emit(r["model"], r["method"], r["length"], str(r["layer"]), js, r["entropy"])
        by_cell.setdefault((r["model"], r["method"], r["length"]), []).append((js, r["entropy"]))
    for (model, method, length), vals in sorted(by_cell.items()):
        emit(
            model,
            method,
            length,
            "mean",
            float(np.mean([v[0] for v in vals])),
            float(np.mean([v[1] for v in vals])),
        )
    return pa.table(out, schema=schemas.ATTENTION_JS)


def plot_lengths(df, pretrained: int, requested: list[int] | None) -> list[int]:
    available = sorted(set(df["length"]))
    if requested:
        return [x for x in requested if x in available]
    wanted = [pretrained, 4 * pretrained]
    chosen = [x for x in wanted if x in available]
    if len(chosen) < 2:
        longer = [x for x in available if x > pretrained]
        chosen = sorted(set(chosen + longer[-1:]))
    return chosen

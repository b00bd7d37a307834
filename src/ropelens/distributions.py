"""Attention distributions: one cell per (model, method, length), Fig. 2/3 and Table 1 aggregates.

A cell runs the longest ``documents`` documents (first ``length`` tokens) through the model with the
streaming statistics engine (:mod:`ropelens.attention`) and keeps, per layer × head, the mean over
the measured queries (the last ``query_fraction`` of each document) of the attention mass per
normalised key-position bin (k / L), per log-distance bin, and the attention entropy.

The Jensen–Shannon table (:func:`js_table`) compares every (method, length) with a reference cell,
layer by layer, in two coordinate systems (:data:`COORDINATES`):

- ``position``: mass over normalised key position k/L. A pure rescaling of positions (what PI does
  to a pattern learnt at L0) has zero divergence here: the shape is kept in k/L.
- ``distance``: mass over log2-spaced bins of the query–key distance q − k (absolute tokens). A
  rescaling moves mass to longer distances and shows here; so does a model attending locally.

Two averages: ``js_head_averaged`` is the divergence of the head-averaged distributions (heads
averaged first; the paper's Fig. 2 red line); ``js_per_head`` is the mean over heads of each head's
divergence from the same head of the reference (always >= the former's value at equal inputs, by
convexity of JS; NaN when the reference has other heads). JS is in nats, in [0, ln 2].

The reference (:func:`references`, config ``attention.reference``) is a method on a model at a
length: by default plain RoPE on the same model at its pretrained length; ``length: same`` takes
the reference at each cell's own length (each method vs RoPE at that length on the base), and
``model:`` another model (a natively long-context model, as the paper's 8K row).
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
    if not hasattr(decoder, "config"):  # ModernBERT decoder's get_decoder gives its head
        decoder = model.base_model
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


COORDINATES = {"position": "pos_mass", "distance": "dist_mass"}
COORDINATE_NAMES = {
    "position": "normalised key position k/L",
    "distance": "log2 query–key distance q − k",
}
LN2 = math.log(2)


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence (nats) of two non-negative vectors, each normalised to sum 1."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


# --- the reference ------------------------------------------------------------------------------


def references(setting) -> list[dict]:
    """``attention.reference`` as a list of ``{method, model, length}`` (see the module docstring).

    A string is a method label at the pretrained length of the same model (the default ``rope``);
    a mapping gives ``method`` (default rope), ``model`` (default: the cell's own) and ``length``
    (``pretrained`` - the reference model's -, ``same`` - the cell's -, or a number of tokens); a
    list gives several references, one set of rows each.
    """
    from ropelens.errors import ConfigError

    items = setting if isinstance(setting, list) else [setting]
    out = []
    for i, item in enumerate(items):
        where = "attention.reference" + (f"[{i}]" if isinstance(setting, list) else "")
        if isinstance(item, str):
            item = {"method": item}
        if not isinstance(item, dict) or set(item) - {"method", "model", "length"}:
            raise ConfigError(f"{where}: give a method label or a mapping of method, model, length")
        length = item.get("length", "pretrained")
        if not (length in ("pretrained", "same") or (isinstance(length, int) and length > 0)):
            raise ConfigError(f"{where}.length: {length!r}; use pretrained, same or a length")
        out.append(
            {"method": item.get("method", "rope"), "model": item.get("model"), "length": length}
        )
    if not out:
        raise ConfigError("attention.reference: empty list; give at least one reference")
    return out


def reference_label(ref: dict) -> str:
    """How tables and charts name a reference, e.g. 'rope at the pretrained length'."""
    where = {"pretrained": "the pretrained length", "same": "the same length"}
    at = where.get(ref["length"], f"{ref['length']} tokens")
    model = f"{ref['model']}/" if ref.get("model") else ""
    return f"{model}{ref['method']} at {at}"


def _reference_lengths(ref: dict, cfg: dict, model: str) -> list[int]:
    """Lengths at which ``ref`` is read for the cells of ``model``."""
    ref_model = ref["model"] or model
    if ref["length"] == "pretrained":
        return [cfg["models"][ref_model]["pretrained_length"]]
    if ref["length"] == "same":
        return list(cfg["attention"]["lengths"])
    return [ref["length"]]


def reference_cells(cfg: dict) -> list[tuple[str, str, int]]:
    """(model, method, length) attention cells the references read."""
    out = []
    for ref in references(cfg["attention"]["reference"]):
        for model in cfg["models"]:
            for n in _reference_lengths(ref, cfg, model):
                out.append((ref["model"] or model, ref["method"], n))
    return list(dict.fromkeys(out))


# --- the table ----------------------------------------------------------------------------------


def _head_stacks(df, column: str) -> dict:
    """(model, method, length) -> {layer: heads x bins array (rows in head order)}."""
    out: dict = {}
    df = df.sort_values(["model", "method", "length", "layer", "head"])
    for (model, method, length, layer), sub in df.groupby(
        ["model", "method", "length", "layer"], sort=True
    ):
        stack = np.stack(sub[column].to_numpy()).astype(np.float64)
        out.setdefault((model, method, int(length)), {})[int(layer)] = stack
    return out


def _layer_js(cell: dict, ref: dict | None) -> dict:
    """{layer: (head-averaged JS, per-head JS)} of one cell against its reference cell."""
    out = {}
    for layer, heads in cell.items():
        other = None if ref is None else ref.get(layer)
        if other is None:
            out[layer] = (math.nan, math.nan)
            continue
        averaged = js_divergence(heads.mean(axis=0), other.mean(axis=0))
        per_head = (
            float(np.mean([js_divergence(a, b) for a, b in zip(heads, other)]))
            if heads.shape == other.shape
            else math.nan
        )
        out[layer] = (averaged, per_head)
    return out


def _reference_key(ref: dict, model: str, length: int, pretrained: dict) -> tuple:
    ref_model = ref["model"] or model
    at = ref["length"]
    at = pretrained.get(ref_model, 0) if at == "pretrained" else length if at == "same" else at
    return ref_model, ref["method"], int(at)


def js_table(cell_paths, reference="rope"):
    """JS divergence of every (model, method, length) vs each reference of ``reference``
    (:func:`references`), per layer and coordinate system, plus a ``mean`` row over layers."""
    import pyarrow as pa

    from ropelens import schemas
    from ropelens.io import read_cells

    refs = references(reference)
    df = read_cells(cell_paths, schemas.ATTENTION).to_pandas()
    info = df.drop_duplicates(["model", "method", "length"]).set_index(
        ["model", "method", "length"]
    )
    pretrained = {m: int(g["pretrained_length"].iloc[0]) for m, g in df.groupby("model")}
    entropy = df.groupby(["model", "method", "length", "layer"])["entropy_mean"].mean()
    rows = []
    for coords, column in COORDINATES.items():
        stacks = _head_stacks(df, column)
        for ref in refs:
            found: dict = {}
            for (model, method, length), cell in sorted(stacks.items()):
                key = _reference_key(ref, model, length, pretrained)
                found[model] = found.get(model, False) or key in stacks
                per_layer = _layer_js(cell, stacks.get(key))
                base = dict(model=model, method=method, length=length, coordinates=coords)
                base |= dict(reference=reference_label(ref), reference_model=key[0])
                base |= dict(reference_method=key[1], reference_length=key[2])
                base |= _method_info(info.loc[(model, method, length)])
                for layer, (avg, per) in sorted(per_layer.items()):
                    ent = float(entropy.loc[(model, method, length, layer)])
                    rows.append(base | _js_values(str(layer), avg, per, ent))
                vals = np.array(list(per_layer.values()), dtype=float)
                ent = float(entropy.loc[(model, method, length)].mean())
                rows.append(base | _js_values("mean", *vals.mean(axis=0), ent))
            for model, ok in found.items():
                if not ok:
                    raise DataError(
                        f"attention cells of model '{model}' lack the reference "
                        f"{reference_label(ref)}; rerun the workflow to compute it or change "
                        "attention.reference"
                    )
    return pa.Table.from_pylist(rows, schema=schemas.ATTENTION_JS)


def _method_info(meta) -> dict:
    from ropelens import schemas

    out = {}
    for f in schemas.METHOD_INFO:
        v = meta[f.name]
        out[f.name] = None if v is None or (isinstance(v, float) and np.isnan(v)) else v
    return out


def _js_values(layer: str, averaged: float, per_head: float, entropy: float) -> dict:
    return dict(
        layer=layer,
        js_head_averaged=float(averaged),
        js_per_head=float(per_head),
        entropy_mean=entropy,
    )


def js_shown(table) -> list:
    """One pivot per (model, coordinates, reference): methods × lengths, both averages, the mean
    over layers; each title names the coordinates, the reference and the unit
    (:class:`ropelens.tables.Shown`)."""
    import pandas as pd

    from ropelens.tables import Shown

    df = table.to_pandas()
    df = df[df["layer"] == "mean"]
    df = df.assign(order=df["coordinates"].map(list(COORDINATES).index))
    shown = []
    keys = ["model", "order", "coordinates", "reference"]
    for (model, _, coords, ref), sub in df.groupby(keys, sort=True):
        pretrained = int(sub["pretrained_length"].iloc[0])
        lengths = sorted(sub["length"].unique())
        header = ["method"]
        for n in lengths:
            tag = f"{n}" + (" (pt)" if n == pretrained else "")
            header += [f"{tag} avg", f"{tag} per-head"]
        by = sub.set_index(["method", "length"])
        rows = []
        for method in sorted(sub["method"].unique(), key=list(sub["method"]).index):
            cells = [method]
            for n in lengths:
                for col in ("js_head_averaged", "js_per_head"):
                    v = by[col].get((method, n), math.nan)
                    cells.append("—" if v != v else f"{v:.4f}")
            rows.append(cells)
        title = (
            f"{model} — JS divergence over {COORDINATE_NAMES[coords]} "
            f"(nats, 0 … ln 2 = {LN2:.3f}); reference: {ref}"
        )
        note = (
            "Mean over layers. *avg*: heads averaged, then JS; *per-head*: mean over heads of "
            "each head's JS."
        )
        shown.append(Shown(pd.DataFrame(rows, columns=header), title, note))
    return shown


def js_markdown(table) -> str:
    """:func:`js_shown` as Markdown."""
    from ropelens.tables import to_markdown

    return to_markdown(js_shown(table))


def write_js_outputs(table, prefix, note: str = "") -> None:
    """``prefix``.parquet/.csv/.md (the ``mean`` rows; ``note``: what the table lacks) and
    ``prefix``_layers.parquet (all)."""
    from pathlib import Path

    import pyarrow.compute as pc

    from ropelens.io import write_table
    from ropelens.tables import empty_shown, write_shown

    prefix = Path(prefix)
    mean = table.filter(pc.equal(table.column("layer"), "mean"))
    shown = js_shown(mean) or [empty_shown("No attention cells in this grid.")]
    if note not in shown[0].note:
        shown[0].note = f"{note} {shown[0].note}"
    write_shown(mean, prefix, shown)
    write_table(table, prefix.with_name(prefix.name + "_layers.parquet"))


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

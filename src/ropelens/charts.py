"""Altair charts, saved as HTML and PNG (PNG through vl-convert)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

MAX_FAINT_LINES = 256


def _no_row_limit():
    import altair as alt

    alt.data_transformers.disable_max_rows()


def note_chart(title: str, note: str):
    """A chart that says why there is nothing to draw (no cells of a kind, none with a result,
    no failure to predict): the note, wrapped, in place of the marks. Its files are written
    like any chart's, so the workflow's outputs exist and the report shows the reason."""
    import textwrap

    import altair as alt
    import pandas as pd

    lines = textwrap.wrap(note, 88) or [""]
    return (
        alt.Chart(pd.DataFrame({"note": ["\n".join(lines)]}))
        .mark_text(lineBreak="\n", align="left", baseline="top", fontSize=13, color="#424242")
        .encode(text="note:N", x=alt.value(8), y=alt.value(8))
        .properties(width=600, height=20 * len(lines) + 16, title=title)
    )


def ppl_chart(table, note: str = ""):
    """PPL vs length (log x): a line per method, a panel per model, a rule at pretrained length;
    ``note`` (what the grid lacks, e.g. a model without cells) under the title."""
    import altair as alt

    if table.num_rows == 0:
        return note_chart("Perplexity", note or "No perplexity cells in this grid.")
    df = table.to_pandas()
    df["training"] = [
        "training-free" if c != c or c is None else "continual pretraining"
        for c in df["cpt_length"]
    ]
    base = alt.Chart(df)
    # more than 10 methods (the default zoo has 12): 20 colours, so no two lines share one
    scheme = "tableau20" if df["method"].nunique() > 10 else "tableau10"
    lines = base.mark_line(point=True).encode(
        x=alt.X("length:Q", scale=alt.Scale(type="log", base=2), title="context length (tokens)"),
        y=alt.Y("ppl:Q", scale=alt.Scale(type="log"), title="perplexity"),
        color=alt.Color("method:N", title="method", scale=alt.Scale(scheme=scheme)),
        strokeDash=alt.StrokeDash(
            "training:N",
            legend=None,  # said in the title
            scale=alt.Scale(
                domain=["training-free", "continual pretraining"], range=[[1, 0], [6, 3]]
            ),
        ),
        tooltip=["model", "method", "length", alt.Tooltip("ppl:Q", format=".3f"), "documents"],
    )
    rule = base.mark_rule(strokeDash=[4, 4], color="gray").encode(
        x="pretrained_length:Q", tooltip=["pretrained_length"]
    )
    return (
        alt.layer(lines, rule)
        .properties(width=320, height=240)
        .facet(column=alt.Column("model:N", title=None))
        .resolve_scale(y="independent")
        .properties(
            title=alt.TitleParams(
                "Perplexity vs context length (grey rule: pretrained length; "
                "dashed lines: continually pretrained)",
                subtitle=_wrapped(note),
            )
        )
    )


def save(chart, html: str | Path, png: str | Path | None = None, scale: float = 2.0) -> None:
    """Write the chart as self-contained HTML (and PNG), each atomically.

    The Vega-Lite spec goes next to the HTML as ``<stem>.vl.json``: ``ropelens report`` embeds it.
    """
    from ropelens.atomic import atomic_path, write_text

    spec = chart.to_dict()  # once: serialising a chart with its data is the costly part
    write_text(html, _page(spec))
    write_text(Path(html).with_suffix(".vl.json"), json.dumps(spec, sort_keys=True))  # = to_json
    if png is not None:
        with atomic_path(png) as tmp:
            chart.save(str(tmp), format="png", scale_factor=scale)


def _page(spec: dict) -> str:
    """A self-contained HTML page that draws ``spec`` with the inlined Vega-Embed bundle."""
    data = _no_close_script(json.dumps(spec))
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="UTF-8">\n'
        f"<script>{vega_bundle(vegalite_version([spec]))}</script>\n</head>\n<body>\n"
        '<div class="vega-visualization" id="vis"></div>\n'
        f'<script>vegaEmbed(\'#vis\', {data}, {{"mode": "vega-lite"}})'
        ".catch(console.error);</script>\n</body>\n</html>\n"
    )


def vegalite_version(specs: list[dict]) -> str | None:
    """The Vega-Lite version (``"6.4"``) the specs' ``$schema`` names, if vl-convert has it."""
    import vl_convert as vlc

    known = vlc.get_vegalite_versions()
    for spec in specs:
        m = re.search(r"/v(\d+)\.(\d+)", str(spec.get("$schema", "")))
        if m and f"{m.group(1)}.{m.group(2)}" in known:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def vega_bundle(vl_version: str | None) -> str:
    """vl-convert's Vega-Embed JavaScript bundle (Vega, Vega-Lite ``vl_version``), safe inside a
    ``<script>`` element. Building it takes vl-convert seconds of CPU in every process (each
    aggregate job draws charts), so it is kept in ``$XDG_CACHE_HOME/ropelens`` (default
    ``~/.cache/ropelens``) under the vl-convert version and ``vl_version``: the bundle is a pure
    function of the two. An unwritable cache only costs the rebuild."""
    import vl_convert as vlc

    from ropelens.atomic import write_text

    version = getattr(vlc, "__version__", None)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ropelens"
    path = cache / f"vega-embed-vlc{version}-vl{vl_version or 'default'}.js"
    if version:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            pass
    js = _no_close_script(vlc.javascript_bundle(vl_version=vl_version))
    if version:
        with contextlib.suppress(OSError):
            write_text(path, js)
    return js


def _no_close_script(text: str) -> str:
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)


def attention_chart(df, model: str, lengths: list[int], coordinates: str = "position"):
    """Fig. 2/3: attention mass per bin, a panel per (method, length), over normalised key
    position k/L (``coordinates="position"``) or log2 query–key distance q − k (``"distance"``;
    bins a length cannot reach are left out).

    Each (layer, head) is a faint line (each layer's head mean when a cell has more than
    ``MAX_FAINT_LINES`` heads in all); the mean over layers, heads and documents is bold red.
    """
    import altair as alt
    import pandas as pd

    column = "pos_mass" if coordinates == "position" else "dist_mass"
    sub = df[(df["model"] == model) & (df["length"].isin(lengths))]
    if sub.empty:
        shown = f" at lengths {', '.join(map(str, lengths))}" if lengths else ""
        return note_chart(
            f"{model}: attention distribution",
            f"No attention cells of model '{model}'{shown} in this grid.",
        )
    per_cell = sub.groupby(["method", "length"]).size().max() if len(sub) else 0
    by_layer = per_cell > MAX_FAINT_LINES  # 7B-sized models: one faint line per layer
    rows = []
    for r in sub.itertuples():
        masses = getattr(r, column)
        n = len(masses)
        series = f"layer {r.layer}" if by_layer else f"{r.layer}/{r.head}"
        for b, mass in enumerate(masses):
            if coordinates == "position":
                rows.append((r.method, r.length, series, (b + 0.5) / n, mass))
            elif b == 0 or 2 ** (b - 1) <= r.length - 1:
                rows.append((r.method, r.length, series, b, mass))
    heads = pd.DataFrame(rows, columns=["method", "length", "series", "position", "mass"])
    heads = heads.groupby(["method", "length", "series", "position"], as_index=False)["mass"].mean()
    mean = heads.groupby(["method", "length", "position"], as_index=False)["mass"].mean()
    data = pd.concat([heads.assign(kind="head"), mean.assign(kind="mean", series="mean")])
    data["mass"] = data["mass"].clip(lower=1e-6)
    if coordinates == "position":
        x = alt.X("position:Q", title="key position / length (k/L)", scale=alt.Scale(domain=[0, 1]))
        what = "over normalised key position k/L"
    else:
        x = alt.X(
            "position:Q",
            title="bin i of d = q − k: 2^(i−1) ≤ d < 2^i",
            axis=alt.Axis(tickMinStep=1),
        )
        what = "over log2 query–key distance q − k"
    y = alt.Y("mass:Q", title="attention mass per bin", scale=alt.Scale(type="log"))
    base = alt.Chart().encode(x=x, y=y, detail="series:N")
    faint = base.mark_line(opacity=0.2, strokeWidth=0.8, color="#4c78a8").transform_filter(
        alt.datum.kind == "head"
    )
    bold = (
        base.mark_line(strokeWidth=2.5, color="#d62728")
        .encode(tooltip=["method", "length", "position", alt.Tooltip("mass:Q", format=".4f")])
        .transform_filter(alt.datum.kind == "mean")
    )
    _no_row_limit()
    return (
        alt.layer(faint, bold, data=data)
        .properties(width=200, height=140)
        .facet(row=alt.Row("method:N", title=None), column=alt.Column("length:O", title="length"))
        .properties(
            title=f"{model}: attention distribution {what} "
            "(red: mean over layers, heads, documents)"
        )
    )


def js_chart(js, model: str):
    """JS divergence (mean over layers) vs context length: a panel per coordinate system (and per
    reference), a line per method; solid = heads averaged first, dashed = mean of per-head JS."""
    import altair as alt
    import pandas as pd

    from ropelens.distributions import COORDINATE_NAMES

    sub = js[(js["model"] == model) & (js["layer"] == "mean")]
    if sub.empty:
        return note_chart(
            f"{model}: JS divergence from the reference",
            f"No attention cells of model '{model}' in this grid.",
        )
    data = pd.concat(
        [
            sub.assign(average="heads averaged", js=sub["js_head_averaged"]),
            sub.assign(average="per head", js=sub["js_per_head"]),
        ]
    )
    data["coordinates"] = data["coordinates"].map(COORDINATE_NAMES)
    scheme = "tableau20" if data["method"].nunique() > 10 else "tableau10"
    lines = (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("length:Q", scale=alt.Scale(type="log", base=2), title="context length"),
            y=alt.Y("js:Q", title="JS divergence (nats, ≤ ln 2)"),
            color=alt.Color("method:N", scale=alt.Scale(scheme=scheme)),
            strokeDash=alt.StrokeDash(
                "average:N",
                title="average",
                scale=alt.Scale(domain=["heads averaged", "per head"], range=[[1, 0], [5, 3]]),
            ),
            tooltip=["method", "length", "coordinates", "reference", "average"]
            + [alt.Tooltip("js:Q", format=".4f")],
        )
        .properties(width=260, height=200)
    )
    return lines.facet(
        column=alt.Column("coordinates:N", title=None, sort=list(COORDINATE_NAMES.values())),
        row=alt.Row("reference:N", title="reference"),
    ).properties(title=f"{model}: JS divergence from the reference, mean over layers")


def sink_chart(table, model: str):
    """Sink mass per layer (head mean, :func:`ropelens.sinks.sink_table`), a line per method, a
    panel per length; a model without attention cells gets a :func:`note_chart`."""
    import altair as alt

    df = table.to_pandas()
    df = df[(df["model"] == model) & (df["layer"] != "mean")].copy()
    if df.empty:
        return note_chart(
            f"{model}: attention sinks", f"No attention cells of model '{model}' in this grid."
        )
    df["layer"] = df["layer"].astype(int)
    sink = int(df["sink_tokens"].iloc[0])
    scheme = "tableau20" if df["method"].nunique() > 10 else "tableau10"
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("sink_mass:Q", title=f"attention mass on the first {sink} tokens"),
            color=alt.Color("method:N", title="method", scale=alt.Scale(scheme=scheme)),
            tooltip=[
                "method",
                "length",
                "layer",
                alt.Tooltip("sink_mass:Q", format=".3f", title="head mean"),
                alt.Tooltip("sink_mass_max:Q", format=".3f", title="largest head"),
            ],
        )
        .properties(width=260, height=200)
        .facet(column=alt.Column("length:O", title="context length (tokens)"))
        .properties(title=f"{model}: attention sinks — mass on keys [0, {sink}) per layer")
    )


def needle_heatmap(cells, model: str, what: str = "needle retrieval", kind: str = "needle"):
    """Fig. 4/5: length × depth per method; green pass / red fail (grey: no result, counted with
    the first error under the title), each cell annotated with its mean attention entropy, a
    dashed rule at the continual-pretraining length. ``what`` names the task in the title and
    ``kind`` the cells (task cells: :func:`task_heatmap`); a model without cells gets a
    :func:`note_chart`."""
    import altair as alt
    import pandas as pd

    from ropelens.retrieval import FAR_DEPTH, depth_note, status_summary

    df = cells[cells["model"] == model].copy()
    if df.empty:
        return note_chart(f"{model}: {what}", f"No {kind} cells of model '{model}' in this grid.")
    df["outcome"] = [
        ("pass" if p else "fail") if s == "ok" else s for p, s in zip(df["passed"], df["status"])
    ]
    df["label"] = [f"{e:.2f}" if e == e and e is not None else "" for e in df["mean_entropy"]]
    if "actual_depth" in df:  # * where the needle landed far from the row's depth
        far = (df["actual_depth"] - df["depth"]).abs() > FAR_DEPTH
        df["label"] = [lab + ("*" if f else "") for lab, f in zip(df["label"], far)]
    notes = [n for n in (status_summary(df), depth_note(df)) if n]
    df["depth"] = [f"{d:g}" for d in df["depth"]]
    lengths = set(df["length"])
    # the rule sits on the right edge of the continual-pretraining length's column (when that
    # length is shown): trained lengths on its left, extrapolation on its right
    df["cpt_rule"] = pd.Series(
        [
            int(c) if c == c and c is not None and int(c) in lengths else None
            for c in df["cpt_length"]
        ],
        index=df.index,
        dtype=object,
    )
    depth_order = sorted(df["depth"].unique(), key=float)
    rules = sorted({p for p in df.get("placement", []) if isinstance(p, str)})
    placed = f", placed by the {' / '.join(rules)} rule" if rules else ""
    x = alt.X("length:O", title="context length (tokens)")
    # a short axis title: a long one overlaps the next facet row when there are few depths
    y = alt.Y("depth:O", title="depth (%)", sort=depth_order)
    colors = alt.Scale(
        domain=["pass", "fail", "oom", "prompt_error"],
        range=["#4caf50", "#e53935", "#9e9e9e", "#bdbdbd"],
    )
    base = alt.Chart().encode(x=x)
    heat = base.mark_rect(stroke="white").encode(
        y=y,
        color=alt.Color("outcome:N", scale=colors, title="retrieval"),
        tooltip=["method", "length", "depth", alt.Tooltip("actual_depth:Q", format=".1f")]
        + ["outcome", "predicted", "answer", "mean_entropy"],
    )
    text = base.mark_text(fontSize=9, color="black").encode(y=y, text="label:N")
    rule = (
        alt.Chart()
        .mark_rule(strokeDash=[5, 4], color="#212121", strokeWidth=2)
        .encode(x=alt.X("cpt_rule:O", bandPosition=1))
        .transform_filter("isValid(datum.cpt_rule)")
    )
    return (
        alt.layer(heat, text, rule, data=df)
        .properties(
            width=max(150, 34 * df["length"].nunique()), height=max(60, 18 * len(depth_order))
        )
        .facet(facet=alt.Facet("method:N", title=None), columns=3)
        .properties(
            title=alt.TitleParams(
                f"{model}: {what} by requested depth{placed} (cell text: mean "
                "attention entropy; dashed: right edge of the continual-pretraining length)",
                subtitle=_wrapped(". ".join(notes)),
            )
        )
    )


def _wrapped(text: str, width: int = 110) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def task_heatmap(cells, model: str, task: str):
    """The needle heatmap of one synthetic task's cells (:mod:`ropelens.taskcells`): pass/fail
    per method over length × depth of the first planted span, annotated with mean entropy."""
    df = cells[cells["task"] == task]
    name = task.replace("_", "-")
    return needle_heatmap(df, model, what=name, kind=name)


def strata_chart(summary, strata, model: str, note: str = ""):
    """AUROC of mean entropy for failure within each context length (bold line: all methods;
    points: method × length strata with both outcomes), against the pooled AUROC (dashed) and the
    AUROC of length alone (dotted); 0.5 = no signal. Without both outcomes among the model's
    cells there is no AUROC: a :func:`note_chart` says so (``note``: why, when the caller knows,
    e.g. :func:`ropelens.retrieval.no_result_note`)."""
    import altair as alt

    st = strata[strata["model"] == model]
    pooled = summary[(summary["model"] == model) & (summary["method"] == "(all methods)")]
    if note or pooled["auroc_entropy_failure"].isna().all():
        why = f"No AUROC to draw: the needle cells of model '{model}' lack passes or failures."
        return note_chart(f"{model}: AUROC of entropy for failure", note or why)
    x = alt.X("length:O", title="context length (tokens)")
    y = alt.Y(
        "auroc_entropy_failure:Q",
        title="AUROC of mean entropy for failure",
        scale=alt.Scale(domain=[0, 1]),
    )
    tip = ["method", "length", "cells", "failures"]
    tip += [alt.Tooltip("auroc_entropy_failure:Q", format=".3f")]
    per_method = (
        alt.Chart(st[st["method"] != "(all methods)"])
        .mark_point(filled=True, size=45, opacity=0.8)
        .encode(
            x=x,
            xOffset=alt.XOffset("method:N"),
            y=y,
            color=alt.Color("method:N", title="one method at that length"),
            tooltip=tip,
        )
    )
    by_length = (
        alt.Chart(st[st["method"] == "(all methods)"])
        .mark_line(point=alt.OverlayMarkDef(color="black", size=70), color="black", strokeWidth=3)
        .encode(x=x, y=y, tooltip=tip)
    )
    lines = _reference_rules(pooled)
    return (
        alt.layer(lines, per_method, by_length)
        .resolve_scale(color="independent")
        .properties(
            width=max(220, 70 * st["length"].nunique()),
            height=220,
            title=f"{model}: AUROC of entropy for failure within each length "
            "(black line: all methods at that length)",
        )
    )


def _reference_rules(pooled):
    """The horizontal rules of :func:`strata_chart`: the pooled AUROCs (one row of
    :func:`ropelens.retrieval.summary_table`) and 0.5, no signal."""
    import altair as alt
    import pandas as pd

    refs = pd.DataFrame(
        [
            ("entropy, pooled over lengths", float(pooled["auroc_entropy_failure"].iloc[0])),
            (
                "entropy, within lengths (pair-weighted)",
                float(pooled["auroc_within_length"].iloc[0]),
            ),
            ("length alone", float(pooled["auroc_length_failure"].iloc[0])),
            ("no signal", 0.5),
        ],
        columns=["what", "auroc"],
    )
    ref_colors = ["#d62728", "#000000", "#1f77b4", "#9e9e9e"][: len(refs)]
    lines = (
        alt.Chart(refs)
        .mark_rule(strokeWidth=1.5)
        .encode(
            y="auroc:Q",
            color=alt.Color(
                "what:N",
                title="over all lengths",
                scale=alt.Scale(domain=list(refs["what"]), range=ref_colors),
                legend=alt.Legend(labelLimit=320),
            ),
            strokeDash=alt.StrokeDash(
                "what:N",
                scale=alt.Scale(
                    domain=list(refs["what"]), range=[[6, 3], [2, 2], [8, 2], [1, 3]][: len(refs)]
                ),
                legend=None,
            ),
            tooltip=["what", alt.Tooltip("auroc:Q", format=".3f")],
        )
    )
    return lines

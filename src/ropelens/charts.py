"""Altair charts, saved as HTML and PNG (PNG through vl-convert)."""

from __future__ import annotations

from pathlib import Path


def ppl_chart(table):
    """PPL vs length (log x): a line per method, a panel per model, a rule at pretrained length."""
    import altair as alt

    df = table.to_pandas()
    base = alt.Chart(df)
    lines = base.mark_line(point=True).encode(
        x=alt.X("length:Q", scale=alt.Scale(type="log", base=2), title="context length (tokens)"),
        y=alt.Y("ppl:Q", scale=alt.Scale(type="log"), title="perplexity"),
        color=alt.Color("method:N", title="method"),
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
        .properties(title="Perplexity vs context length (dashed: pretrained length)")
    )


def save(chart, html: str | Path, png: str | Path | None = None, scale: float = 2.0) -> None:
    """Write the chart as self-contained HTML (and PNG), each atomically."""
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    tmp = html.with_name(f".{html.name}.tmp")
    chart.save(str(tmp), format="html", inline=True)
    tmp.replace(html)
    if png is not None:
        png = Path(png)
        tmp = png.with_name(f".{png.name}.tmp")
        chart.save(str(tmp), format="png", scale_factor=scale)
        tmp.replace(png)

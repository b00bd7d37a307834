"""One self-contained HTML report from the aggregate tables and charts.

``ropelens report FILES... --out results/report.html`` sorts the aggregate files it is given into
sections with one registry (:data:`SECTIONS`: title, caption, table and figure name patterns); a
section whose files are absent is omitted, and a file no section claims lands in "Other results",
so a new kind of aggregate shows up without touching this module (and gets its own section by
adding one :class:`Section`).

- **Tables**: a ``.parquet`` table is shown as the tables its aggregate chose for it
  (:class:`ropelens.tables.Shown` in its metadata, the same its ``.md`` sibling holds), or as an
  HTML table of its rows when it has none; every table also has a collapsed view of all its columns
  and links to its CSV / Parquet files.
- **Charts**: a chart ``X.html`` (written by :func:`ropelens.charts.save`) is embedded as its
  Vega-Lite spec ``X.vl.json``, rendered by Vega-Embed inlined in the page (no network needed), over
  its ``X.png`` as a base64 fallback that stays visible when JavaScript is off or a chart fails.
- **Provenance**: config hash, package versions, hardware, the git commit of the checkout, and wall
  time per stage, gathered by :mod:`ropelens.provenance`.
- **The page**: template, CSS and JavaScript are package data (``ropelens/assets/report.*``).

This module never imports Snakemake.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import html
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from ropelens import __version__, provenance, tables
from ropelens.atomic import write_text
from ropelens.errors import DataError

# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One report section: which aggregate files it shows and how it is introduced.

    ``tables``/``figures``/``details`` are file-name patterns (fnmatch, matched on the base name);
    ``details`` tables are shown collapsed only. ``caption`` names a file in the captions folder
    (``report/*.rst``, shared with ``snakemake --report``); ``summary`` is used when it is absent.
    """

    key: str
    title: str
    caption: str = ""
    summary: str = ""
    tables: tuple[str, ...] = ()
    figures: tuple[str, ...] = ()
    details: tuple[str, ...] = ()


SECTIONS: list[Section] = [
    Section(
        "ppl",
        "Perplexity vs context length",
        caption="ppl.rst",
        summary="Corpus perplexity per model, method and context length.",
        tables=("ppl.parquet",),
        figures=("ppl.html",),
    ),
    Section(
        "attention",
        "Attention distributions",
        caption="attention.rst",
        summary="Attention mass over normalised key position k/L and over log2 query–key "
        "distance, per method and length.",
        figures=("attention_*.html",),
    ),
    Section(
        "attention_js",
        "Jensen–Shannon divergence of attention distributions",
        caption="attention_js.rst",
        summary="JS divergence (nats, at most ln 2) of each method's attention distribution from "
        "the reference's, in k/L and in q − k coordinates.",
        tables=("attention_js.parquet",),
        figures=("attention_js_*.html",),
        details=("attention_js_layers.parquet",),
    ),
    Section(
        "sinks",
        "Attention sinks",
        caption="sinks.rst",
        summary="Attention mass on the first tokens per layer (head mean), a line per method.",
        tables=("sinks.parquet",),
        figures=("sinks_*.html",),
        details=("sinks_layers.parquet",),
    ),
    Section(
        "needle",
        "Needle in a haystack",
        caption="needle.rst",
        summary="Retrieval pass/fail over document length × needle depth, annotated with the "
        "mean attention entropy; the dashed line: right edge of the continual-pretraining length.",
        figures=("needle_*.html",),
        details=("needle_cells*.parquet", "needle_*layers*.parquet"),
    ),
    Section(
        "entropy_failure",
        "Attention entropy and retrieval failure",
        caption="needle_table.rst",
        summary="Pass rate and mean attention entropy of passing and failing needle cells.",
        tables=("needle.parquet", "needle_entropy*.parquet"),
        figures=("needle_entropy*.html",),
    ),
    Section(
        "cpt",
        "Longer continual pretraining",
        caption="needle_cpt.rst",
        summary="The same method continually pretrained at different lengths.",
        tables=("needle_cpt*.parquet", "cpt*.parquet"),
        figures=("needle_cpt*.html", "cpt*.html"),
    ),
]

SECTIONS.append(
    Section(
        "tasks",
        "Passkey, multi-key, multi-value and variable tracking",
        caption="tasks.rst",
        summary="Synthetic long-context tasks: pass/fail over length × depth per method, "
        "annotated with the mean attention entropy.",
        figures=("tasks_*.html",),
    )
)
SECTIONS.append(
    Section(
        "tasks_tables",
        "Synthetic tasks: entropy, distractors and hops",
        caption="tasks_table.rst",
        summary="Pass rates, entropy of passing vs failing task cells, attention mass on "
        "distractors (multi-key) and on each hop (variable tracking).",
        tables=("tasks.parquet", "tasks_*.parquet"),
    )
)

OTHER = Section("other", "Other results", summary="Aggregates no section above claims.")

# Files that belong to a table or chart named elsewhere (siblings), never shown on their own.
_SIBLING_SUFFIXES = (".csv", ".md", ".png", ".vl.json")
MAX_ROWS = 200
PNG_SCALE = 2  # charts.save renders PNGs at scale 2: show them at their chart size


@dataclass
class Figure:
    name: str
    html: Path | None = None
    png: Path | None = None
    spec: Path | None = None


@dataclass
class Table:
    name: str
    parquet: Path
    detail: bool = False


@dataclass
class Assigned:
    section: Section
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".vl.json")] if name.endswith(".vl.json") else path.stem


def _specificity(pattern: str) -> int:
    return len(pattern.replace("*", "").replace("?", ""))


def _claim(name: str, kind: str) -> tuple[Section, bool]:
    """The section claiming a file name (most specific pattern wins), and whether as a detail."""
    best, best_score, detail = OTHER, -1, False
    for section in SECTIONS:
        groups = (
            [(section.tables, False), (section.details, True)]
            if kind == "table"
            else [(section.figures, False)]
        )
        for patterns, is_detail in groups:
            for pattern in patterns:
                if fnmatch.fnmatchcase(name, pattern) and _specificity(pattern) > best_score:
                    best, best_score, detail = section, _specificity(pattern), is_detail
    return best, detail


def assign(files) -> list[Assigned]:
    """Sort aggregate files into sections, in registry order; sections without files are omitted.

    ``.parquet`` files are tables; ``.html`` files are charts (with ``.png`` / ``.vl.json`` siblings
    found next to them); a ``.png`` without an HTML chart is a static figure; ``.csv`` / ``.md`` are
    siblings of a table.
    """
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such file; build the aggregates first (snakemake) or drop it")
    figures: dict[tuple[Path, str], Figure] = {}
    tables: list[Table] = []
    for p in paths:
        name = p.name
        if name.endswith(".parquet"):
            tables.append(Table(p.stem, p))
        elif name.endswith((".html", ".png", ".vl.json")):
            fig = figures.setdefault((p.parent, _stem(p)), Figure(_stem(p)))
            if name.endswith(".html"):
                fig.html = p
            elif name.endswith(".png"):
                fig.png = p
            else:
                fig.spec = p
        elif not name.endswith(_SIBLING_SUFFIXES):
            raise DataError(
                f"{p}: not a table (.parquet) or chart (.html/.png/.vl.json); drop it from the list"
            )
    for (folder, stem), fig in figures.items():
        for attr, suffix in (("png", ".png"), ("spec", ".vl.json"), ("html", ".html")):
            if getattr(fig, attr) is None and (folder / f"{stem}{suffix}").exists():
                setattr(fig, attr, folder / f"{stem}{suffix}")
    by_key: dict[str, Assigned] = {}
    for t in tables:
        section, t.detail = _claim(t.parquet.name, "table")
        by_key.setdefault(section.key, Assigned(section)).tables.append(t)
    for fig in figures.values():
        section, _ = _claim(f"{fig.name}.html", "figure")
        by_key.setdefault(section.key, Assigned(section)).figures.append(fig)
    order = [s.key for s in SECTIONS] + [OTHER.key]
    out = [by_key[k] for k in order if k in by_key]
    for a in out:
        a.tables.sort(key=lambda t: (t.detail, t.name))
        a.figures.sort(key=lambda f: f.name)
    return out


# --- rendering helpers -----------------------------------------------------------------------


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _inline_rst(text: str) -> str:
    """The little reStructuredText the captions use: ``literal``, *emphasis*, paragraphs."""
    out = _esc(text)
    out = re.sub(r"``(.+?)``", r"<code>\1</code>", out)
    out = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", out)
    return out


def caption_html(section: Section, captions_dir: Path | None) -> str:
    text = ""
    if captions_dir is not None and section.caption:
        path = Path(captions_dir) / section.caption
        if path.exists():
            text = path.read_text(encoding="utf-8")
    text = text.strip() or section.summary
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(f'<p class="caption">{_inline_rst(" ".join(p.split()))}</p>' for p in paras)


def shown_html(shown) -> str:
    """The tables an aggregate is shown as (:class:`ropelens.tables.Shown`, the same the ``.md``
    file holds): a heading and note each, the first column as row headers."""
    parts = []
    for s in shown:
        if s.title:
            parts.append(f"<h4>{_esc(s.title)}</h4>")
        if s.note:
            parts.append(f"<p>{_esc(s.note)}</p>")
        thead = "".join(f"<th>{_esc(c)}</th>" for c in s.frame.columns)
        tbody = "".join(
            "<tr>"
            + "".join(
                f"<th>{_esc(c)}</th>" if j == 0 else _td(_esc(c), c) for j, c in enumerate(row)
            )
            + "</tr>"
            for row in s.frame.itertuples(index=False)
        )
        parts.append(
            f'<table class="data"><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>'
        )
    return "\n".join(parts)


_NUMBER = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?%?|—|nan|inf")


def _td(html_text: str, raw: str) -> str:
    """A cell; text (not a number) is left-aligned."""
    return (
        f"<td>{html_text}</td>"
        if _NUMBER.fullmatch(raw.strip())
        else f'<td class="t">{html_text}</td>'
    )


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:
            return "—"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_fmt(v) for v in value[:8])
        return f"[{inner}{', …' if len(value) > 8 else ''}]"
    if hasattr(value, "tolist"):
        return _fmt(value.tolist())
    return str(value)


def arrow_table_html(table, max_rows: int = MAX_ROWS) -> str:
    """An HTML table of the first ``max_rows`` rows of a pyarrow table, every column."""
    cols = table.column_names
    rows = table.slice(0, max_rows).to_pylist()
    thead = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    tbody = "".join(
        "<tr>" + "".join(_td(_esc(_fmt(r[c])), _fmt(r[c])) for c in cols) + "</tr>" for r in rows
    )
    note = ""
    if table.num_rows > max_rows:
        note = f'<p class="note">First {max_rows} of {table.num_rows} rows.</p>'
    return (
        f'<div class="scroll"><table class="data"><thead><tr>{thead}</tr></thead>'
        f"<tbody>{tbody}</tbody></table></div>{note}"
    )


def _link(path: Path, base: Path) -> str:
    rel = os.path.relpath(path.resolve(), base.resolve())
    return f'<a href="{_esc(Path(rel).as_posix())}">{_esc(path.name)}</a>'


def table_html(t: Table, base: Path) -> str:
    import pyarrow.parquet as pq

    try:
        data = pq.read_table(t.parquet)
    except Exception as e:
        raise DataError(f"{t.parquet}: not a readable Parquet table ({e}); rebuild it") from None
    csv = t.parquet.with_suffix(".csv")
    links = " · ".join(_link(p, base) for p in (csv, t.parquet) if p.exists())
    summary = f"All columns of <code>{_esc(t.parquet.name)}</code> ({data.num_rows} rows)" + (
        f" — {links}" if links else ""
    )
    full = f"<details><summary>{summary}</summary>{arrow_table_html(data)}</details>"
    if t.detail:
        return f'<div class="table detail" data-table="{_esc(t.name)}">{full}</div>'
    shown = tables.read_shown(data.schema.metadata)
    main = shown_html(shown) if shown is not None else arrow_table_html(data)
    return f'<div class="table" data-table="{_esc(t.name)}">{main}{full}</div>'


def _json_script(obj) -> str:
    """JSON safe inside a <script> element."""
    text = json.dumps(obj, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def figure_html(fig: Figure, index: int, base: Path) -> tuple[str, str | None]:
    """The <figure> and, when the chart has a Vega-Lite spec, the <script> holding it."""
    parts, script = [], None
    spec_id = f"spec-{index}"
    if fig.spec is not None:
        try:
            spec = json.loads(fig.spec.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{fig.spec}: not a Vega-Lite JSON spec ({e}); rebuild it") from None
        parts.append(f'<div class="vega-chart" data-spec-id="{spec_id}"></div>')
        script = f'<script type="application/json" id="{spec_id}">{_json_script(spec)}</script>'
    if fig.png is not None:
        data = fig.png.read_bytes()
        b64 = base64.b64encode(data).decode("ascii")
        size = ""
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:  # IHDR: width, height
            width = int.from_bytes(data[16:20], "big") // PNG_SCALE
            size = f' width="{width}"'
        parts.append(
            f'<img class="fallback" alt="{_esc(fig.name)} (static image)"{size} '
            f'src="data:image/png;base64,{b64}">'
        )
    if not parts:
        parts.append(
            f'<p class="note">No spec or PNG next to {_esc(fig.name)}.html; rerun its rule.</p>'
        )
    cls = "chart" + (" interactive" if script else "")
    body = "".join(parts)
    files = " · ".join(_link(p, base) for p in (fig.html, fig.png, fig.spec) if p is not None)
    figure = (
        f'<figure class="{cls}" data-figure="{_esc(fig.name)}">{body}'
        f"<figcaption>{_esc(fig.name)}{' — ' + files if files else ''}</figcaption></figure>"
    )
    return figure, script


# --- provenance (gathered by ropelens.provenance) --------------------------------------------


def gguf_sources_html(models: Path | None) -> str:
    """Models converted from GGUF files (``ropelens_gguf.json`` under ``models``), if any."""
    rows = provenance.gguf_sources(models)
    if not rows:
        return ""
    head = "".join(
        f"<th>{h}</th>" for h in ("model", "GGUF file", "package", "sha256", "convert s")
    )
    body = "".join(
        f"<tr><th>{_esc(m)}</th><td>{_esc(f)}</td><td>{_esc(pkg)}</td>"
        f"<td><code>{_esc(sha)}</code></td><td>{_seconds(sec)}</td></tr>"
        for m, f, pkg, sha, sec in rows
    )
    return (
        "<h3>Models converted from GGUF</h3>"
        f'<table class="data" id="gguf-sources"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _kv_table(pairs: dict) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs.items())
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _seconds(s) -> str:
    return "—" if s is None else f"{s:,.1f}"


def packages_html(results: Path | None, lock: Path | None) -> str:
    """Library versions of this machine and of the cells, against the lock CI passed with."""
    rows = provenance.lock_check(
        lock, provenance.package_versions(), provenance.cell_packages(results)
    )
    differ = [r[0] for r in rows if r[4] == "differs"]
    if lock is None or not Path(lock).is_file():
        verdict = "No lock given (<code>--lock</code>): versions are not compared."
    elif differ:
        verdict = (
            f"<strong>{len(differ)} package(s) differ from {_esc(Path(lock).name)}</strong>: "
            f"{_esc(', '.join(differ))} — these results were not computed with the tested versions."
        )
    else:
        verdict = (
            f"Every locked package matches {_esc(Path(lock).name)} (the versions CI passed with)."
        )
    head = "".join(f"<th>{h}</th>" for h in ("package", "lock", "this machine", "cells", ""))
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (
        f'<h3>Packages</h3><p class="note" id="lock-verdict">{verdict} torch is installed by its '
        "own line (a CPU or CUDA build), not from the lock.</p>"
        f'<table class="data" id="packages"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        "</table>"
    )


def provenance_html(
    config: dict | None,
    results: Path | None,
    models: Path | None,
    source: Path | None,
    lock: Path | None = None,
) -> str:
    parts = ["<h3>Run</h3>"]
    run = {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "ropelens": __version__,
    }
    if config is not None:
        run["config hash (sha256)"] = provenance.config_hash(config)
    commit = provenance.git_commit(source) if source is not None else None
    if commit:
        run["source (git)"] = commit
    parts.append(_kv_table(run))
    times = provenance.stage_times(results, models)
    parts.append("<h3>Wall time per stage</h3>")
    if times:
        head = "".join(
            f"<th>{h}</th>" for h in ("stage", "items", "load s", "compute s", "total s", "devices")
        )
        body = "".join(
            f"<tr><th>{_esc(r['stage'])}</th><td>{r['items']}</td><td>{_seconds(r['load_s'])}</td>"
            f"<td>{_seconds(r['compute_s'])}</td><td>{_seconds(r['total_s'])}</td>"
            f"<td>{_esc(r['devices'])}</td></tr>"
            for r in times
        )
        total = sum(r["total_s"] for r in times)
        blank = "<td></td>"
        body += f'<tr class="total"><th>all</th>{blank * 3}<td>{_seconds(total)}</td>{blank}</tr>'
        parts.append(
            f'<table class="data" id="stage-times"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
            '<p class="note">Summed over cells from each cell\'s metadata '
            "(<code>ropelens.load_seconds</code>, <code>ropelens.compute_seconds</code>) and over "
            "toy training runs (<code>ropelens_train.json</code>); jobs may have run in parallel "
            "and on other machines (devices column).</p>"
        )
    else:
        parts.append('<p class="note">No cell metadata found.</p>')
    parts.append(gguf_sources_html(models))
    parts.append(packages_html(results, lock))
    parts.append("<h3>Hardware (machine that built this report)</h3>")
    parts.append(_kv_table(provenance.hardware()))
    if config is not None:
        pretty = json.dumps(config, indent=2, sort_keys=True, default=str)
        parts.append(
            f"<details><summary>Resolved config</summary><pre>{_esc(pretty)}</pre></details>"
        )
    return "\n".join(parts)


# --- the page --------------------------------------------------------------------------------


def asset(name: str) -> str:
    """A file of the report's page, shipped as package data (``ropelens/assets``)."""
    from importlib.resources import files

    return (files("ropelens") / "assets" / name).read_text(encoding="utf-8")


def _bundle(specs: list[dict]) -> str:
    from ropelens import charts

    return charts.vega_bundle(charts.vegalite_version(specs))


def render(
    files,
    out: str | os.PathLike,
    captions_dir: str | os.PathLike | None = None,
    config: dict | None = None,
    results_dir: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    title: str = "ropelens report",
    source_dir: str | os.PathLike | None = None,
    lock: str | os.PathLike | None = None,
) -> Path:
    """Write the report for ``files`` to ``out`` atomically; returns ``out``."""
    out = Path(out)
    base = out.parent
    sections = assign(files)
    captions = Path(captions_dir) if captions_dir else None
    body, scripts, specs, nav = [], [], [], []
    index = 0
    for a in sections:
        s = a.section
        nav.append(f'<a href="#{s.key}">{_esc(s.title)}</a>')
        parts = [f'<section id="{s.key}" data-section="{s.key}">', f"<h2>{_esc(s.title)}</h2>"]
        parts.append(caption_html(s, captions))
        for fig in a.figures:
            index += 1
            figure, script = figure_html(fig, index, base)
            parts.append(figure)
            if script:
                scripts.append(script)
                specs.append(json.loads(fig.spec.read_text(encoding="utf-8")))
        for t in a.tables:
            parts.append(table_html(t, base))
        parts.append("</section>")
        body.append("\n".join(parts))
    nav.append('<a href="#provenance">Provenance</a>')
    body.append(
        '<section id="provenance" data-section="provenance"><h2>Provenance</h2>'
        + provenance_html(
            config,
            Path(results_dir) if results_dir else None,
            Path(models_dir) if models_dir else None,
            Path(source_dir) if source_dir else Path(__file__).resolve().parent,
            Path(lock) if lock else None,
        )
        + "</section>"
    )
    cfg_line = f" · config {provenance.config_hash(config)[:12]}" if config is not None else ""
    bundle = f"<script>{_bundle(specs)}</script>" if specs else ""
    page = string.Template(asset("report.html")).substitute(
        version=_esc(__version__),
        title=_esc(title),
        css=asset("report.css"),
        bundle=bundle,
        config_line=cfg_line,
        nav=" ".join(nav),
        body="".join(body),
        scripts="".join(scripts),
        js=asset("report.js"),
    )
    return write_text(out, page)

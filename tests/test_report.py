"""The HTML report, the results as one dataset, and the CLI's self-explanation.

- `ropelens report` on synthetic aggregate files: every section, self-contained, tables rendered,
  provenance; a missing kind is omitted; bad input is one line.
- The page in a real headless Chromium (Chrome DevTools Protocol over websocket-client): no console
  errors, every chart rendered as SVG, PNG fallbacks without JavaScript, a screenshot.
- A micro run (the CLI the rules call, in-process) read back as one dataset by duckdb, polars and
  pyarrow with hive partitioning, as docs/results.md says.
- `ropelens --help` and every subcommand's `--help`; every rule writes a log under logs/.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ropelens import charts, distributions, provenance, report, schemas, tables
from ropelens.cli import build_parser, main
from ropelens.io import write_table

REPO = Path(__file__).resolve().parents[1]
ALL_SECTIONS = [
    "ppl",
    "attention",
    "attention_js",
    "needle",
    "entropy_failure",
    "cpt",
    "other",
    "provenance",
]
INTERACTIVE = ["attention_m", "needle_m", "ppl"]  # charts with a .vl.json spec

# --- synthetic aggregates --------------------------------------------------------------------


def _method_info(n, method="rope"):
    return dict(
        rope_type=["default" if method == "rope" else "linear"] * n,
        factor=[None if method == "rope" else 2.0] * n,
        pretrained_length=[32] * n,
        cpt_length=[None] * n,
    )


def _ppl_table():
    rows = []
    for method in ("rope", "pi"):
        for length, ppl in ((16, 11.5), (32, 12.25), (64, 480.0 if method == "rope" else 13.0)):
            rows.append(
                dict(
                    model="m",
                    method=method,
                    length=length,
                    **{k: v[0] for k, v in _method_info(1, method).items()},
                    documents=2,
                    tokens=2 * length,
                    ppl=ppl,
                    mean_doc_ppl=ppl,
                )
            )
    return pa.Table.from_pylist(rows, schema=schemas.PPL_TABLE)


def test_ppl_chart_distinct_colours_and_dashed_checkpoints():
    """Twelve methods (the default zoo's count) get twelve colours; checkpoints are dashed."""
    methods = [f"m{i}" for i in range(12)]
    rows = [
        dict(model="m", method=x, length=n, rope_type="linear", factor=2.0)
        | dict(pretrained_length=32, cpt_length=64 if i % 2 else None, documents=1, tokens=n)
        | dict(ppl=10.0 + i, mean_doc_ppl=10.0 + i)
        for i, x in enumerate(methods)
        for n in (32, 64)
    ]
    spec = charts.ppl_chart(pa.Table.from_pylist(rows, schema=schemas.PPL_TABLE)).to_dict()
    enc = spec["spec"]["layer"][0]["encoding"]
    assert enc["color"]["scale"]["scheme"] == "tableau20"  # 20 distinct colours
    dash = enc["strokeDash"]["scale"]
    assert dash["domain"] == ["training-free", "continual pretraining"]
    assert dash["range"][0] == [1, 0] and dash["range"][1] != [1, 0]
    two = [r for r in rows if r["method"] in ("m0", "m1")]
    spec = charts.ppl_chart(pa.Table.from_pylist(two, schema=schemas.PPL_TABLE)).to_dict()
    assert spec["spec"]["layer"][0]["encoding"]["color"]["scale"]["scheme"] == "tableau10"


def _attention_df():
    import pandas as pd

    rows = []
    for method in ("rope", "pi"):
        for length in (32, 64):
            for layer in range(2):
                for head in range(2):
                    mass = [0.1, 0.1, 0.2, 0.6] if method == "rope" else [0.2, 0.2, 0.2, 0.4]
                    rows.append(
                        dict(model="m", method=method, length=length, layer=layer, head=head)
                        | dict(pos_mass=mass, pretrained_length=32, entropy_mean=1.0)
                    )
    return pd.DataFrame(rows)


def _js_table():
    rows = []
    for method in ("rope", "pi"):
        for length in (32, 64):
            for coords in ("position", "distance"):
                for layer in ["0", "1", "mean"]:
                    js = 0.0 if (method, length) == ("rope", 32) else 0.0123
                    rows.append(
                        dict(model="m", method=method, length=length)
                        | {k: v[0] for k, v in _method_info(1, method).items()}
                        | dict(layer=layer, coordinates=coords)
                        | dict(reference="rope at the pretrained length", reference_model="m")
                        | dict(reference_method="rope", reference_length=32)
                        | dict(js_head_averaged=js, js_per_head=2 * js, entropy_mean=1.5)
                    )
    return pa.Table.from_pylist(rows, schema=schemas.ATTENTION_JS)


def _needle_chart(df):
    import altair as alt

    return (
        alt.Chart(df)
        .mark_rect()
        .encode(x="length:O", y="depth:O", color="passed:N", tooltip=["entropy:Q"])
        .properties(title="needle heatmap")
    )


def _cell_meta(load, compute, device="cpu"):
    return {
        "ropelens.load_seconds": f"{load:.3f}",
        "ropelens.compute_seconds": f"{compute:.3f}",
        "ropelens.device": device,
    }


@pytest.fixture(scope="module")
def aggregates(tmp_path_factory):
    """A results tree with one aggregate of every kind, cells with timing metadata, a toy run."""
    import pandas as pd

    root = tmp_path_factory.mktemp("agg")
    res, t, f = root / "results", root / "results/tables", root / "results/figures"
    ppl = _ppl_table()
    tables.write_outputs(ppl, t / "ppl", "ppl")
    charts.save(charts.ppl_chart(ppl), f / "ppl.html", f / "ppl.png")
    # the attention chart gets no PNG here: a chart with only its spec
    charts.save(charts.attention_chart(_attention_df(), "m", [32, 64]), f / "attention_m.html")
    distributions.write_js_outputs(_js_table(), t / "attention_js")
    needle = pa.table(
        dict(model=["m"] * 2, method=["rope", "pi"], length=[64, 64], pretrained_length=[32, 32])
        | dict(accuracy=[0.25, 0.75], mean_entropy=[3.5, 2.0])
    )
    tables.write_outputs(needle, t / "needle", "accuracy")
    grid = pd.DataFrame(
        dict(length=[16, 16, 64, 64], depth=[0, 100, 0, 100], passed=[True, True, False, True])
        | dict(entropy=[1.0, 1.1, 3.2, 2.0])
    )
    charts.save(_needle_chart(grid), f / "needle_m.html", f / "needle_m.png")
    write_table(
        pa.table(dict(outcome=["pass", "fail"], mean_entropy=[1.25, 3.75], cells=[3, 1])),
        t / "needle_entropy.parquet",
    )
    write_table(
        pa.table(dict(method=["pi-64", "pi-128"], cpt_length=[64, 128], accuracy=[0.5, 0.875])),
        t / "needle_cpt.parquet",
    )
    write_table(pa.table(dict(unclaimed=[42])), t / "surprise.parquet")
    (f / "static_only.png").write_bytes((f / "ppl.png").read_bytes())
    ppl_cells = res / "ppl/model=m/method=rope"
    write_table(pa.table({"x": [1]}), ppl_cells / "length=16.parquet", _cell_meta(1.5, 3.0))
    write_table(pa.table({"x": [1]}), ppl_cells / "length=32.parquet", _cell_meta(2.0, 4.0))
    write_table(
        pa.table({"x": [1]}),
        res / "attention/model=m/method=rope/length=32.parquet",
        _cell_meta(0.5, 0.25, "cuda:0"),
    )
    zoo = root / "resources/zoo/m/base"
    zoo.mkdir(parents=True)
    (zoo / "ropelens_train.json").write_text(json.dumps({"seconds": 12.5, "steps": 3}))
    files = sorted(str(p) for p in [*t.iterdir(), *f.iterdir()])
    config = {"models": {"m": {"pretrained_length": 32}}, "lengths": [16, 32, 64]}
    out = report.render(
        files,
        res / "report.html",
        captions_dir=REPO / "report",
        config=config,
        results_dir=res,
        models_dir=root / "resources",
    )
    return dict(root=root, files=files, out=out, html=out.read_text(), config=config)


def sections(page: str) -> list[str]:
    return re.findall(r'<section id="[^"]+" data-section="([^"]+)"', page)


def section(page: str, key: str) -> str:
    return page.split(f'data-section="{key}"')[1].split("</section>")[0]


def test_every_section_in_registry_order(aggregates):
    page = aggregates["html"]
    assert sections(page) == ALL_SECTIONS
    for key in ALL_SECTIONS:
        assert f'href="#{key}"' in page, f"no navigation link to {key}"
    other = section(page, "other")
    assert 'data-table="surprise"' in other and 'data-figure="static_only"' in other


def test_a_missing_kind_is_omitted(aggregates, tmp_path):
    t = aggregates["root"] / "results/tables"
    out = report.render([t / "ppl.parquet", t / "needle_entropy.parquet"], tmp_path / "r.html")
    assert sections(out.read_text()) == ["ppl", "entropy_failure", "provenance"]


def test_page_is_self_contained(aggregates):
    page = aggregates["html"]
    assert not re.search(r"<script[^>]*\bsrc=", page), "scripts must be inline"
    assert not re.search(r"<link[^>]*href=\"(?!data:)", page), "no external stylesheets"
    assert not re.search(r"\bsrc=\"https?:", page)
    assert "window.vegaEmbed=" in page, "Vega-Embed bundle is not inlined"
    figures = re.findall(r'<figure class="([^"]+)" data-figure="([^"]+)">', page)
    assert sorted(name for _, name in figures) == sorted([*INTERACTIVE, "static_only"])
    specs = re.findall(r'<script type="application/json" id="(spec-\d+)">', page)
    assert len(specs) == len(INTERACTIVE)
    assert sorted(n for c, n in figures if "interactive" in c) == INTERACTIVE
    # every chart but the PNG-less attention one carries its PNG inline
    pngs = re.findall(
        r'<img class="fallback" alt="([^"]+) \(static image\)"[^>]*src="data:image/png;', page
    )
    assert sorted(pngs) == ["needle_m", "ppl", "static_only"]


def test_tables_and_captions_rendered(aggregates):
    page = aggregates["html"]
    ppl = section(page, "ppl")
    assert "<th>pi</th>" in ppl and "<td>480.00</td>" in ppl and "64" in ppl
    caption = (REPO / "report/ppl.rst").read_text().split()[:6]
    assert " ".join(caption) in ppl, "ppl.rst caption missing"
    js = section(page, "attention_js")
    assert "<td>0.0123</td>" in js and "<td>0.0246</td>" in js  # heads averaged, per head
    assert "attention_js_layers.parquet" in js
    assert "normalised key position k/L (nats, 0 … ln 2 = 0.693); reference: rope at the" in js
    assert "log2 query–key distance q − k" in js
    assert '<div class="table detail" data-table="attention_js_layers">' in js
    assert "<code>attention_js_layers.parquet</code>" in section(page, "attention_js")
    needle = section(page, "needle")
    assert 'data-figure="needle_m"' in needle and "<table" not in needle
    entropy = section(page, "entropy_failure")  # needle.parquet (+ .md) and needle_entropy.parquet
    assert "<td>0.75</td>" in entropy and 'data-table="needle"' in entropy
    assert '<td class="t">fail</td><td>3.75</td><td>1</td>' in entropy
    cpt = section(page, "cpt")
    assert '<td class="t">pi-128</td><td>128</td><td>0.875</td>' in cpt
    assert 'href="tables/ppl.csv"' in ppl and 'href="figures/ppl.png"' in ppl


def test_a_table_is_one_frame_for_its_markdown_and_the_page(aggregates, tmp_path):
    t = aggregates["root"] / "results/tables"
    for name in ("ppl", "attention_js", "needle"):
        shown = tables.read_shown(pq.read_schema(t / f"{name}.parquet").metadata)
        assert shown and tables.to_markdown(shown) == (t / f"{name}.md").read_text(encoding="utf-8")
    alone = tmp_path / "ppl.parquet"  # the page reads the Parquet only, never the Markdown
    shutil.copy(t / "ppl.parquet", alone)
    ppl = section(report.render([alone], tmp_path / "r.html").read_text(), "ppl")
    assert "<h4>m — ppl (pretrained length 32)</h4>" in ppl
    assert "<th>pi</th>" in ppl and "<td>480.00</td>" in ppl


def test_provenance(aggregates):
    prov = section(aggregates["html"], "provenance")
    canonical = json.dumps(aggregates["config"], sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest() in prov
    times = {r["stage"]: r for r in provenance.stage_times(aggregates["root"] / "results")}
    assert set(times) == {"ppl cells", "attention cells"}
    assert times["ppl cells"]["items"] == 2
    assert times["ppl cells"]["total_s"] == pytest.approx(10.5)
    assert times["attention cells"]["devices"] == "cuda:0 ×1"
    assert "<th>toy training</th><td>1</td><td>—</td><td>12.5</td><td>12.5</td>" in prov
    assert "<th>ppl cells</th><td>2</td><td>3.5</td><td>7.0</td><td>10.5</td>" in prov
    assert "<td>23.8</td>" in prov  # 10.5 + 0.75 + 12.5
    import torch

    assert f"<td>torch</td><td>—</td><td>{torch.__version__}</td>" in prov  # not in the lock
    for key in ("cpu", "logical cores", "memory", "gpus", "config hash (sha256)"):
        assert f"<th>{key}</th>" in prov


def test_bad_input_is_one_line(tmp_path, aggregates):
    out = tmp_path / "r.html"
    (aggregates["root"] / "notes.txt").write_text("not an aggregate")
    for bad, expect in [
        (str(tmp_path / "missing.parquet"), "missing.parquet: no such file"),
        (str(aggregates["root"] / "notes.txt"), "notes.txt: not a table (.parquet) or chart"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "ropelens", "report", bad, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ropelens: error: "), proc.stderr
        assert expect in lines[0]
        assert not out.exists()


# --- in a real browser -------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page, events collected)."""

    def __init__(self, exe: str, workdir: Path):
        import websocket

        profile = workdir / "profile"
        self.log = open(workdir / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
            + ["about:blank"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 120  # a hang guard, not a speed check
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"chromium did not start: {(workdir / 'chromium.log').read_text()}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], suppress_origin=True, timeout=120
        )
        self.next_id, self.events = 0, []

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]
            self.events.append(msg)

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")

    def open(self, url: str, scripts: bool = True, ready: str | None = None) -> None:
        """Load ``url`` and wait until the report's charts are done (``ready``: until this
        expression is true instead)."""
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        if not scripts:
            self.send("Emulation.setScriptExecutionDisabled", value=True)
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + 120
        if ready is None and scripts:
            ready, want = "document.body.getAttribute('data-charts')", "done"
        elif ready is None:
            ready, want = "document.readyState", "complete"
        else:
            ready, want = f"Boolean({ready})", True
        while self.eval(f"document.body && {ready}") != want:
            assert time.monotonic() < deadline, "page never finished rendering its charts"
            time.sleep(0.2)

    def errors(self) -> list[dict]:
        bad = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if (
                m == "Runtime.exceptionThrown"
                or (m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"))
                or (m == "Log.entryAdded" and p["entry"]["level"] == "error")
            ):
                bad.append(e)
        return bad

    def screenshot(self, path: Path, max_height: int = 6000) -> None:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = dict(x=0, y=0, width=size["width"], height=min(size["height"], max_height), scale=1)
        shot = self.send(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def browser(tmp_path):
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip: .[dev])")
    b = Browser(exe, tmp_path)
    yield b
    b.close()


COUNTS = """JSON.stringify({
  ok: Number(document.body.dataset.chartsOk), failed: Number(document.body.dataset.chartsFailed),
  live: Array.from(document.querySelectorAll("figure.live")).map(f => f.dataset.figure).sort(),
  svgs: document.querySelectorAll("figure .vega-embed svg.marks").length,
  marks: Array.from(document.querySelectorAll("figure .vega-embed svg.marks")).map(
    s => s.querySelectorAll("g.mark-line path, g.mark-rect path, g.mark-symbol path").length),
  visiblePngs: Array.from(document.querySelectorAll("img.fallback"))
    .filter(i => i.offsetHeight > 0 && i.naturalWidth > 0)
    .map(i => i.closest("figure").dataset.figure).sort(),
  sections: Array.from(document.querySelectorAll("section[data-section]"))
    .map(s => s.dataset.section)
})"""


def test_report_renders_in_chromium(aggregates, browser, tmp_path):
    browser.open(aggregates["out"].as_uri())
    got = json.loads(browser.eval(COUNTS))
    shot = tmp_path / "report.png"
    browser.screenshot(shot)
    assert browser.errors() == [], json.dumps(browser.errors())[:3000]
    assert got["sections"] == ALL_SECTIONS
    assert (got["ok"], got["failed"]) == (len(INTERACTIVE), 0)
    assert got["live"] == INTERACTIVE
    assert got["svgs"] == len(INTERACTIVE)
    assert all(n > 0 for n in got["marks"]), got["marks"]
    assert got["visiblePngs"] == ["static_only"], "PNG fallbacks must hide once a chart renders"
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    print(f"screenshot: {shot}")


def test_png_fallbacks_show_without_javascript(aggregates, browser):
    browser.open(aggregates["out"].as_uri(), scripts=False)
    got = json.loads(browser.eval(COUNTS))
    assert got["svgs"] == 0
    assert got["visiblePngs"] == ["needle_m", "ppl", "static_only"]


def test_a_chart_page_draws_on_its_own(aggregates, browser):
    """A chart's own HTML (results/figures/X.html) is self-contained: it draws without the
    report, from the cached Vega-Embed bundle."""
    lines = "document.querySelectorAll('#vis svg.marks g.mark-line path').length"
    browser.open((aggregates["root"] / "results/figures/ppl.html").as_uri(), ready=lines)
    assert browser.errors() == [], json.dumps(browser.errors())[:3000]
    assert browser.eval(lines) > 0


def test_the_vega_bundle_is_built_once_then_read(tmp_path, monkeypatch):
    import vl_convert as vlc

    built = []
    real = vlc.javascript_bundle
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(vlc, "javascript_bundle", lambda **kw: built.append(kw) or real(**kw))
    first = charts.vega_bundle("6.4")
    second = charts.vega_bundle("6.4")
    assert built == [{"vl_version": "6.4"}] and first == second
    assert "</script" not in first.lower() and "vegaEmbed" in first
    assert [p.name for p in (tmp_path / "ropelens").iterdir()] == [
        f"vega-embed-vlc{vlc.__version__}-vl6.4.js"
    ]


# --- the results as one dataset ----------------------------------------------------------------

MICRO = {
    "models": {
        "micro": {
            "tiny": {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1},
            "pretrained_length": 32,
        }
    },
    "methods": {"rope": {}, "pi": {"factor": 2}},
    "lengths": [16, 32],
    "corpora": {"code": {"builtin": "stdlib", "max_documents": 12}},
    "ppl": {"corpus": "code", "max_documents": 2, "position_bins": 4},
    "needle": {"lengths": []},  # 16 and 32 tokens cannot hold a needle prompt
}


def _run(*argv):
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def micro_results(tmp_path_factory):
    """The cells a micro workflow writes, made with the same CLI calls as the rules."""
    import os

    from ropelens import config as rlconfig

    work = tmp_path_factory.mktemp("dataset")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = rlconfig.prepare(json.loads(json.dumps(MICRO)))
        model = rlconfig.model_dir(cfg, "micro")
        spec = json.dumps(cfg["models"]["micro"]["tiny"])
        _run("make-tiny", "--out", model, "--pretrained-length", 32, "--spec", spec)
        corpus, tokens = "results/data/corpora/code.parquet", "results/data/tokens/code/m.parquet"
        _run("corpus", "--spec", json.dumps(cfg["corpora"]["code"]), "--out", corpus)
        _run(
            "tokenize", "--corpus", corpus, "--source", json.dumps({"path": model}), "--out", tokens
        )
        grid = {
            "ppl": [(m, x, n) for m, x in rlconfig.model_method_pairs(cfg) for n in cfg["lengths"]],
            "attention": rlconfig.attention_cells(cfg),
        }
        for kind, cells in grid.items():
            for m, x, n in cells:
                _run(
                    kind,
                    "--spec",
                    json.dumps(rlconfig.cell_spec(cfg, m, x)),
                    "--settings",
                    json.dumps(cfg[kind]),
                    "--tokens",
                    tokens,
                    "--length",
                    n,
                    "--out",
                    f"results/{kind}/model={m}/method={x}/length={n}.parquet",
                )
    finally:
        os.chdir(cwd)
    return work, {k: sorted(v) for k, v in grid.items()}


@pytest.mark.parametrize("kind", ["ppl", "attention"])
def test_cells_show_progress_on_stderr(micro_results, kind, capfd, tmp_path, monkeypatch):
    """What a rule's log (`2> {log}`) gets: a tqdm bar that reaches 100 %, then one summary line."""
    from ropelens import config as rlconfig

    work, grid = micro_results
    monkeypatch.chdir(work)
    cfg = rlconfig.prepare(json.loads(json.dumps(MICRO)))
    m, x, n = grid[kind][0]
    spec = json.dumps(rlconfig.cell_spec(cfg, m, x))
    out = tmp_path / "cell.parquet"
    argv = ["--spec", spec, "--settings", json.dumps(cfg[kind]), "--length", n, "--out", out]
    capfd.readouterr()
    _run(kind, *argv, "--tokens", "results/data/tokens/code/m.parquet")
    err = capfd.readouterr().err
    assert re.search(rf"{kind} L={n}: 100%\|", err), err
    assert err.rstrip().splitlines()[-1].startswith(f"{out}: ")


QUERIES = {
    "duckdb": lambda path: (
        __import__("duckdb")
        .sql(f"SELECT * FROM read_parquet('{path}/**/*.parquet', hive_partitioning = true)")
        .arrow()
    ),
    "polars": lambda path: (
        __import__("polars").read_parquet(f"{path}/**/*.parquet", hive_partitioning=True).to_arrow()
    ),
    "pyarrow": lambda path: (
        __import__("pyarrow.dataset")
        .dataset.dataset(path, format="parquet", partitioning="hive")
        .to_table()
    ),
}


@pytest.mark.parametrize("reader", sorted(QUERIES))
@pytest.mark.parametrize("kind,schema", [("ppl", schemas.PPL), ("attention", schemas.ATTENTION)])
def test_cells_read_as_one_dataset(micro_results, reader, kind, schema):
    pytest.importorskip(reader, reason=f"{reader} is not installed (pip install -e '.[dev]')")
    work, grid = micro_results
    table = QUERIES[reader](work / "results" / kind)
    if hasattr(table, "read_all"):  # duckdb may hand back a record batch reader
        table = table.read_all()
    assert set(schema.names) <= set(table.column_names)
    df = table.to_pandas()
    keys = sorted({(r.model, r.method, int(r.length)) for r in df.itertuples()})
    assert keys == grid[kind], "the dataset is not the whole grid"
    cells = sorted((work / "results" / kind).rglob("*.parquet"))
    assert len(df) == sum(pq.read_metadata(c).num_rows for c in cells)
    assert df["length"].dtype.kind == "i" and df["model"].map(type).eq(str).all()


NEEDLE_READERS = {
    **{k: v for k, v in QUERIES.items() if k != "pyarrow"},
    # `length=` is a folder in the needle tree: pyarrow needs the partition types (docs/results.md)
    "pyarrow": lambda path: (
        __import__("pyarrow.dataset")
        .dataset.dataset(
            path,
            format="parquet",
            partitioning=__import__("pyarrow.dataset").dataset.partitioning(
                pa.schema([f for f in schemas.GRID]), flavor="hive"
            ),
        )
        .to_table()
    ),
}


@pytest.mark.parametrize("reader", sorted(NEEDLE_READERS))
def test_depth_grid_reads_as_one_dataset(tmp_path, reader):
    """A tree shaped like the needle cells (length is a folder, depth the file), model '7b'."""
    pytest.importorskip(reader, reason=f"{reader} is not installed (pip install -e '.[dev]')")
    want = []
    for model in ("7b", "tiny"):
        for length in (16, 32):
            for depth in (0, 50, 100):
                want.append((model, "pi", length, depth))
                write_table(
                    pa.table(
                        dict(model=[model], method=["pi"], length=pa.array([length], pa.int64()))
                        | dict(depth=pa.array([depth], pa.int64()), passed=[depth < 100])
                    ),
                    tmp_path
                    / f"needle/model={model}/method=pi/length={length}/depth={depth}.parquet",
                )
    table = NEEDLE_READERS[reader](tmp_path / "needle")
    if hasattr(table, "read_all"):
        table = table.read_all()
    df = table.to_pandas()
    got = sorted((r.model, r.method, int(r.length), int(r.depth)) for r in df.itertuples())
    assert got == sorted(want)


# --- the CLI explains itself; every rule logs --------------------------------------------------


def _subcommands():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return p, sub


def test_top_level_help_lists_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "ropelens", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0
    _, sub = _subcommands()
    for choice in sub._choices_actions:
        assert re.search(rf"^\s+{re.escape(choice.dest)}\s", proc.stdout, re.M), choice.dest
        assert choice.help, f"{choice.dest} has no one-line summary"
    assert "COMMAND --help" in proc.stdout


@pytest.mark.parametrize("command", sorted(_subcommands()[1].choices))
def test_every_subcommand_help_explains_itself(command, capsys):
    parser = _subcommands()[1].choices[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert parser.description and " ".join(parser.description.split()[:4]) in " ".join(out.split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.dest}: no help"


def test_every_rule_writes_a_log_under_logs():
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for m in re.finditer(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.M):
            rules[m.group(1)] = m.group(2)
    assert "html_report" in rules and "ppl" in rules
    for name, body in rules.items():
        if "shell:" not in body and "run:" not in body:  # a target (rule zoo): runs nothing
            continue
        log = re.search(r"^    log:\n\s+(?:\w+=)?\"([^\"]+)\"", body, re.M)
        assert log, f"rule {name} has no log"
        assert log.group(1).startswith("logs/"), f"rule {name} logs to {log.group(1)}"
        assert "2> {log}" in body or "{log}" in body, f"rule {name} does not write its log"

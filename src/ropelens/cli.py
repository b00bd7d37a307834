"""The ``ropelens`` command line. Snakemake rules are thin shells over these subcommands.

Every error a user can fix is one line on stderr (``ropelens: error: ...``) and a non-zero exit;
no subcommand leaves a partial output file behind.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from ropelens import __version__
from ropelens.errors import RopelensError, is_out_of_memory
from ropelens.grid import ZOO


class JsonObject(dict):
    """A mapping of a JSON argument (``--spec``, ``--settings``, ...): looking up a key it lacks
    raises :class:`MissingJsonKey`, so :func:`explain` blames the JSON arguments for exactly
    those KeyErrors and no other."""

    def __missing__(self, key):
        raise MissingJsonKey(key, self)


class MissingJsonKey(KeyError):
    def __init__(self, key, mapping: dict):
        super().__init__(key)
        self.mapping = mapping


def _json(text: str) -> dict:
    try:
        return json.loads(text, object_hook=JsonObject)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value:g} is not a percentage (0 to 100)")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): what is wrong and where help is."""

    def error(self, message: str):
        self.exit(2, f"ropelens: error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _reference(text: str):
    """``--reference``: a method label, or JSON (a mapping or a list; see attention.reference)."""
    return _json(text) if text.lstrip()[:1] in ("{", "[", '"') else text


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _progress(desc: str, **tqdm_kwargs):
    """A progress wrapper for a job's log (stderr); ``tqdm_kwargs`` override the defaults."""
    from tqdm.auto import tqdm

    kwargs = {"mininterval": 2.0, **tqdm_kwargs}
    return lambda it: tqdm(it, desc=desc, file=sys.stderr, **kwargs)


# --- subcommands -----------------------------------------------------------------------------


def cmd_check_config(args) -> int:
    from ropelens import config, grid

    cfg = config.prepare(config.load_yaml(args.config), args.base_dir)
    pairs = grid.model_method_pairs(cfg)
    n_len = len(cfg["lengths"])
    print(
        f"{args.config}: ok — {len(cfg['models'])} models, {len(cfg['methods'])} methods, "
        f"{n_len} lengths, {len(pairs) * n_len} perplexity cells"
    )
    return 0


def cmd_ship_zoo(args) -> int:
    from ropelens import config, zoo

    cfg = config.load_yaml(args.config)
    for rel, record in zoo.ship_all(cfg, args.source, args.out):
        size = record["bytes"] / 2**20
        print(f"shipped {Path(args.out) / rel}: {size:.1f} MiB, sha256 {record['sha256']}")
    return 0


def cmd_verify(args) -> int:
    from ropelens.io import verify

    if not Path(args.root).is_dir():
        raise RopelensError(f"verify: '{args.root}' is not a folder; give the results folder")
    n, bad = verify(args.root, delete=args.delete)
    for path, problem in bad:
        print(f"bad cell {path}: {problem}", file=sys.stderr)
    if bad and args.delete:
        print(
            f"{n - len(bad)} of {n} cells ok; deleted {len(bad)} bad cell(s): rerun snakemake "
            "to recompute exactly those",
            file=sys.stderr,
        )
        return 0
    if bad:
        print(
            f"{n - len(bad)} of {n} cells ok, {len(bad)} bad; `ropelens verify {args.root} "
            "--delete` removes them so the next run recomputes exactly those",
            file=sys.stderr,
        )
        return 1
    print(f"{n} cells ok", file=sys.stderr)
    return 0


def cmd_make_tiny(args) -> int:
    from ropelens.models import make_tiny

    spec = args.spec or {}
    make_tiny(args.out, pretrained_length=args.pretrained_length, **spec)
    print(f"wrote tiny LLaMA to {args.out}", file=sys.stderr)
    return 0


def cmd_convert_gguf(args) -> int:
    from ropelens import gguf

    prov = gguf.convert(args.source, args.out, args.base_dir)
    print(
        f"converted {prov['file']} (sha256 {prov['sha256'][:12]}) to {args.out} "
        f"in {prov['seconds']:.0f} s",
        file=sys.stderr,
    )
    return 0


def cmd_corpus(args) -> int:
    from ropelens import corpora

    prov = corpora.build(args.spec, args.out, args.base_dir)
    print(f"wrote {prov['documents']} documents to {args.out}: {json.dumps(prov)}", file=sys.stderr)
    return 0


def cmd_tokenize(args) -> int:
    from ropelens import corpora

    n = corpora.tokenize(args.corpus, args.source, args.out)
    print(f"tokenised {n} documents to {args.out}", file=sys.stderr)
    return 0


def cmd_ppl(args) -> int:
    import pyarrow.parquet as pq

    from ropelens import ppl, schemas

    _threads(args.threads)
    settings = args.settings
    tokens = pq.read_table(args.tokens)
    loaded, t0, load_s = _load_timed(args.spec, args.length)
    rows = ppl.evaluate(
        loaded.model, tokens, args.length, settings, _progress(f"ppl L={args.length}")
    )
    n = len(rows["doc_id"])
    rows.update(protocol=[settings["protocol"]] * n)
    _write_cell(rows, n, schemas.PPL, args, loaded, t0, load_s)
    total = sum(rows["nll_sum"]) / max(1, sum(rows["tokens"]))
    print(f"{args.out}: {n} documents, mean NLL {total:.4f}", file=sys.stderr)
    return 0


def _load_timed(spec: dict, length: int):
    """The cell's model (at the cell's length: ``factor: auto``), the time loading started and
    the seconds it took."""
    from ropelens import models

    t0 = time.perf_counter()
    loaded = models.load(models.at_length(spec, length))
    return loaded, t0, time.perf_counter() - t0


def _write_cell(rows: dict, n: int, schema, args, loaded, t0: float, load_s: float) -> None:
    """Add the grid columns to ``n`` rows and write the cell atomically with its timings."""
    from ropelens.io import write_cell

    rope = {**loaded.rope_parameters, "factor": _factor_used(loaded)}
    rows.update(_grid_columns(args.spec, rope, args.length, n))
    meta = _cell_metadata(args.spec, loaded, load_s, time.perf_counter() - t0 - load_s)
    write_cell(rows, schema, args.out, meta)


def _factor_used(loaded) -> float | None:
    """The scale factor of the cell: the one the method used where it has one (``factor:
    auto`` resolved at the cell's length), else that of the model's own RoPE parameters."""
    used = loaded.rope.get("factor")
    return loaded.rope_parameters.get("factor") if used is None else used


def _grid_columns(spec: dict, rope: dict, length: int, n: int) -> dict:
    return dict(
        model=[spec["model"]] * n,
        method=[spec["method"]] * n,
        length=[length] * n,
        rope_type=[rope.get("rope_type", "default")] * n,
        factor=[rope.get("factor")] * n,  # the factor used (factor: auto at this length)
        pretrained_length=[spec["pretrained_length"]] * n,
        cpt_length=[spec.get("cpt_length")] * n,
    )


def _cell_metadata(spec: dict, loaded, load_s: float, compute_s: float) -> dict:
    return {
        "ropelens.spec": json.dumps(spec),
        "ropelens.rope_parameters": json.dumps(loaded.rope_parameters),
        "ropelens.rope_layer_types": json.dumps(loaded.rope),  # the layer types the method rewrote
        "ropelens.device": loaded.device,
        "ropelens.load_seconds": f"{load_s:.3f}",
        "ropelens.compute_seconds": f"{compute_s:.3f}",
        "ropelens.version": __version__,
        "ropelens.packages": _packages(),  # the report compares them with the lock
    }


@functools.cache
def _packages() -> str:
    """JSON of the library versions this process computes with (once per process: a warm
    runner's forks inherit it)."""
    from ropelens.provenance import package_versions

    return json.dumps(package_versions())


def cmd_attention(args) -> int:
    import pyarrow.parquet as pq

    from ropelens import distributions, schemas

    _threads(args.threads)
    settings = args.settings
    tokens = pq.read_table(args.tokens)
    loaded, t0, load_s = _load_timed(args.spec, args.length)
    stats, n_docs = distributions.measure(
        loaded.model, tokens, args.length, settings, _progress(f"attention L={args.length}")
    )
    n = stats.num_rows
    rows = {name: stats.column(name).to_pylist() for name in stats.column_names}
    window = distributions.query_window(args.length, settings["query_fraction"])
    rows.update(documents=[n_docs] * n, query_window=[window] * n)
    _write_cell(rows, n, schemas.ATTENTION, args, loaded, t0, load_s)
    print(f"{args.out}: {n_docs} documents, {n} layer x head rows", file=sys.stderr)
    return 0


def cmd_aggregate_attention(args) -> int:
    from ropelens import charts, distributions, schemas
    from ropelens.io import read_cells

    table = distributions.js_table(args.cells, args.reference)
    note = _missing_note("attention", args.models, table.column("model").to_pylist())
    distributions.write_js_outputs(table, args.prefix, note)
    df = read_cells(args.cells, schemas.ATTENTION).to_pandas()
    js = table.to_pandas()
    for i, model in enumerate(args.models):
        sub = df[df["model"] == model]  # none: each chart says so
        pretrained = int(sub["pretrained_length"].iloc[0]) if len(sub) else 0
        lengths = distributions.plot_lengths(sub, pretrained, args.plot_lengths)
        charts.save(charts.attention_chart(sub, model, lengths), args.html[i], args.png[i])
        for coords, html, png in (
            ("distance", args.distance_html, args.distance_png),
            (None, args.js_html, args.js_png),
        ):
            if i < len(html):
                chart = (
                    charts.js_chart(js, model)
                    if coords is None
                    else charts.attention_chart(sub, model, lengths, coords)
                )
                charts.save(chart, html[i], png[i] if i < len(png) else None)
    print(f"aggregated {len(args.cells)} attention cells", file=sys.stderr)
    return 0


def cmd_aggregate_sinks(args) -> int:
    from ropelens import charts, sinks, tables

    table = sinks.sink_table(args.cells)
    note = _missing_note("attention", args.models, table.column("model").to_pylist())
    tables.write_outputs(table.filter(_is_mean(table)), args.prefix, "sink_mass", "{:.3f}", note)
    from ropelens.io import write_table

    write_table(table, f"{args.prefix}_layers.parquet")
    for model, html, png in zip(args.models, args.html, args.png):
        charts.save(charts.sink_chart(table, model), html, png)
    print(f"aggregated the sink mass of {len(args.cells)} attention cells", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from ropelens import report

    out = report.render(
        args.files,
        args.out,
        captions_dir=args.captions,
        config=args.config_json,
        results_dir=args.results,
        models_dir=args.models,
        title=args.title,
        lock=args.lock,
    )
    kb = out.stat().st_size / 1024
    print(f"wrote {out} ({kb:,.0f} KiB) from {len(args.files)} aggregate files", file=sys.stderr)
    return 0


def cmd_needle(args) -> int:
    import pyarrow.parquet as pq

    from ropelens import retrieval, schemas

    _threads(args.threads)
    settings = {"format": "auto", **args.settings}
    haystack = pq.read_table(args.haystack).column("text").to_pylist()
    loaded, t0, load_s = _load_timed(args.spec, args.length)
    rows = retrieval.run_cell(
        loaded.model, loaded.tokenizer, haystack, args.length, args.depth, settings
    )
    _write_answer_cell(rows, schemas.NEEDLE, settings, args, loaded, t0, load_s)
    return 0


def _write_answer_cell(rows, schema, settings, args, loaded, t0: float, load_s: float) -> None:
    """Write a needle or task cell with its method and prompt format; print its verdict."""
    from ropelens import needle

    n = len(rows["depth"])
    rows["registry_method"] = [args.spec["registry"]] * n
    rows["prompt_format"] = [needle.resolve_format(loaded.tokenizer, settings["format"])] * n
    _write_cell(rows, n, schema, args, loaded, t0, load_s)
    status = rows["status"][0]
    verdict = ("pass" if rows["passed"][0] else "fail") if status == "ok" else ""
    print(
        f"{args.out}: {status} {verdict} answer={rows['answer'][0]} "
        f"generated={rows['generated'][0]!r} mean entropy={rows['mean_entropy'][0]}",
        file=sys.stderr,
    )


def cmd_aggregate_needle(args) -> int:
    from ropelens import charts, retrieval, tables

    cells = retrieval.cell_frame(args.cells)
    prefix = Path(args.prefix)
    summary, strata = retrieval.summary_table(cells), retrieval.strata_table(cells)
    notes = {m: retrieval.no_result_note(cells, m) for m in _models(args.models, cells)}
    note = " ".join(filter(None, notes.values())) or retrieval.no_result_note(cells)
    note = " ".join(filter(None, [note, retrieval.depth_note(cells)]))
    for name, df in (
        ("", summary),
        ("_entropy_strata", strata),
        ("_cpt", retrieval.cpt_table(cells)),
    ):
        tables.write_frame(df, prefix.with_name(prefix.name + name), note=note)
    for model, html, png in zip(args.models, args.html, args.png):
        charts.save(charts.needle_heatmap(cells, model), html, png)
    for model, html, png in zip(args.models, args.strata_html, args.strata_png):
        charts.save(charts.strata_chart(summary, strata, model, notes[model]), html, png)
    print(f"aggregated {len(args.cells)} needle cells", file=sys.stderr)
    return 0


def cmd_task(args) -> int:
    import pyarrow.parquet as pq

    from ropelens import schemas, taskcells

    _threads(args.threads)
    settings = {"format": "auto", **args.settings}
    haystack = pq.read_table(args.haystack).column("text").to_pylist() if args.haystack else None
    loaded, t0, load_s = _load_timed(args.spec, args.length)
    rows = taskcells.run_cell(
        loaded.model, loaded.tokenizer, args.task, haystack, args.length, args.depth, settings
    )
    _write_answer_cell(rows, schemas.TASKS, settings, args, loaded, t0, load_s)
    return 0


def cmd_aggregate_tasks(args) -> int:
    from ropelens import charts, tables, taskcells
    from ropelens.retrieval import no_result_note

    cells = taskcells.cell_frame(args.cells)
    prefix = Path(args.prefix)
    tasks = list(dict.fromkeys([*args.tasks, *cells["task"]]))
    notes = [
        no_result_note(cells[cells["task"] == task], model, task.replace("_", "-"))
        for model in _models(args.models, cells)
        for task in tasks
    ]
    note = " ".join(filter(None, notes)) or no_result_note(cells, what="task")
    for name, df in taskcells.tables(cells).items():
        tables.write_frame(df, prefix.with_name(prefix.name + name), note=note)
    for (model, task), html, png in zip(_pairs(args.models, args.tasks), args.html, args.png):
        charts.save(charts.task_heatmap(cells, model, task), html, png)
    print(f"aggregated {len(args.cells)} task cells", file=sys.stderr)
    return 0


def _missing_note(kind: str, models, present) -> str:
    """What an aggregate of ``kind`` cells lacks: none at all, or none of some ``models``."""
    if not present:
        return f"No {kind} cells in this grid."
    missing = [m for m in models if m not in set(present)]
    return " ".join(f"No {kind} cells of model '{m}' in this grid." for m in missing)


def _models(charted, cells) -> list[str]:
    """The models to account for: those charted (``--models``), then any other with cells."""
    return list(dict.fromkeys([*charted, *cells["model"]]))


def _pairs(models, tasks):
    """(model, task) in the order the workflow lists chart files: models outer, tasks inner."""
    return [(m, t) for m in models for t in tasks]


def _is_mean(table):
    import pyarrow.compute as pc

    return pc.equal(table.column("layer"), "mean")


def cmd_aggregate_ppl(args) -> int:
    from ropelens import charts, tables

    table = tables.ppl_table(args.cells)
    note = _missing_note("perplexity", args.models, table.column("model").to_pylist())
    tables.write_outputs(table, args.prefix, "ppl", note=note)
    if args.html:
        charts.save(charts.ppl_chart(table, note), args.html, args.png)
    print(f"aggregated {len(args.cells)} cells into {args.prefix}.*", file=sys.stderr)
    return 0


# --- parser ----------------------------------------------------------------------------------


def _with_threads(settings: dict, threads: int | None) -> dict:
    return {**settings, "threads": threads} if threads else settings


def _train_progress(desc: str):
    return _progress(desc, mininterval=5.0, ascii=True)  # long runs: fewer, plain-ASCII updates


def cmd_pretrain(args) -> int:
    s = _train(args, "pretrain", f"pretrain L={args.length}")
    _trained(args, f"{s['parameters']} parameters, {s['steps']} steps", s)
    return 0


def cmd_continual(args) -> int:
    s = _train(args, "continual", f"continual {args.spec.get('method')} L={args.length}")
    _trained(args, f"{s['steps']} steps at {args.length}", s)
    return 0


def _train(args, role: str, desc: str) -> dict:
    """Check ``--settings`` as a ``role`` train block, then train (:mod:`ropelens.toytrain`)."""
    from ropelens import config, toytrain

    config.check_train(args.settings, "--settings", role)
    args.settings = _with_threads(args.settings, args.threads)
    run = dict(device=args.device, progress=_train_progress(desc))
    data = (args.corpus, args.haystack, args.out)
    if role == "pretrain":
        return toytrain.pretrain(args.settings, args.length, *data, **run)
    return toytrain.continual(args.spec, args.settings, args.length, *data, **run)


def _trained(args, what: str, s: dict) -> None:
    print(
        f"wrote {args.out}: {what} in {s['seconds']:.1f} s, "
        f"final LM loss {s['final']['lm_loss']:.4f}, answer loss {s['final']['answer_loss']:.4f}",
        file=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ropelens",
        description="Benchmark RoPE context-extension methods from an attention perspective. "
        "The Snakemake workflow calls these subcommands, one per cell; you can run any of them "
        "by hand.",
    )
    p.add_argument("--version", action="version", version=f"ropelens {__version__}")
    p.add_argument(
        "--debug", action="store_true", help="full tracebacks on errors (or ROPELENS_DEBUG=1)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add in (
        _setup_commands,
        _ppl_commands,
        _attention_commands,
        _report_command,
        _needle_commands,
        _task_commands,
        _toy_commands,
    ):
        add(sub)
    for choice in sub._choices_actions:  # `ropelens CMD --help` opens with what CMD does
        parser = sub.choices[choice.dest]
        parser.description = parser.description or f"ropelens {choice.dest}: {choice.help}."
    p.epilog = "Run `ropelens COMMAND --help` for what a command reads, writes and takes."
    return p


def _setup_commands(sub) -> None:
    """Commands that check a config or prepare inputs: models, corpora, tokens."""
    s = sub.add_parser("check-config", help="validate a workflow config and summarise its grid")
    s.add_argument("config", help="path to a YAML config (e.g. config.yaml)")
    s.add_argument("--base-dir", default=".", help="folder that relative paths start from")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser(
        "ship-zoo",
        help="write a trained zoo in half precision with provenance (make zoo; docs/zoo.md)",
    )
    s.add_argument("--config", default="configs/zoo.yaml", help="the zoo's recipe")
    s.add_argument("--source", default=ZOO, help="where the workflow trained it")
    s.add_argument("--out", default="zoo", help="the shipped zoo's folder")
    s.set_defaults(func=cmd_ship_zoo)

    s = sub.add_parser(
        "verify",
        help="check every cell under a folder against its schema and its path",
        description="Read every cell (results/{ppl,attention,needle}/...parquet), check it against "
        "its declared schema (ropelens.schemas) and its own coordinates (model/method/length/depth "
        "in its path vs its rows and metadata), and name each bad one. Exit 1 if any is bad.",
    )
    s.add_argument("root", nargs="?", default="results", help="results folder (default: results)")
    s.add_argument("--delete", action="store_true", help="delete bad cells (the next run redoes)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("make-tiny", help="write a tiny random-init LLaMA + byte tokenizer")
    s.add_argument("--out", required=True, help="output model directory")
    s.add_argument(
        "--pretrained-length", type=_positive_int, required=True, help="max_position_embeddings"
    )
    s.add_argument("--spec", type=_json, help="JSON of shape options (hidden_size, layers, ...)")
    s.set_defaults(func=cmd_make_tiny)

    s = sub.add_parser(
        "convert-gguf", help="convert a GGUF model once into a Hugging Face directory"
    )
    s.add_argument(
        "--source",
        type=_json,
        required=True,
        help='JSON {"package": ..., "file": ...} or {"path": ...} (the config\'s gguf entry)',
    )
    s.add_argument("--out", required=True, help="output model directory")
    s.add_argument("--base-dir", default=".", help="folder that relative paths start from")
    s.set_defaults(func=cmd_convert_gguf)

    s = sub.add_parser("corpus", help="materialise a corpus (builtin, local file, dataset)")
    s.add_argument("--spec", type=_json, required=True, help="JSON corpus entry from the config")
    s.add_argument("--out", required=True, help="output Parquet (doc_id, split, text)")
    s.add_argument("--base-dir", default=".", help="folder that relative paths start from")
    s.set_defaults(func=cmd_corpus)

    s = sub.add_parser("tokenize", help="tokenise a materialised corpus with a model's tokenizer")
    s.add_argument("--corpus", required=True, help="corpus Parquet from `ropelens corpus`")
    s.add_argument("--source", type=_json, required=True, help='JSON {"path": ...} or {"hub": ...}')
    s.add_argument("--out", required=True, help="output Parquet (doc_id, n_tokens, input_ids)")
    s.set_defaults(func=cmd_tokenize)


def _ppl_commands(sub) -> None:
    s = sub.add_parser("ppl", help="compute one perplexity cell (model, method, length)")
    s.add_argument("--spec", type=_json, required=True, help="JSON cell spec (model + method)")
    s.add_argument("--settings", type=_json, required=True, help="JSON ppl settings from config")
    s.add_argument("--tokens", required=True, help="tokenised corpus Parquet")
    s.add_argument("--length", type=_positive_int, required=True, help="context length in tokens")
    s.add_argument("--out", required=True, help="output cell Parquet")
    s.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    s.set_defaults(func=cmd_ppl)

    s = sub.add_parser("aggregate-ppl", help="perplexity table (+ chart) from PPL cells")
    s.add_argument("cells", nargs="*", help="PPL cell Parquet files")
    s.add_argument("--prefix", required=True, help="writes PREFIX.parquet/.csv/.md")
    s.add_argument("--models", nargs="*", default=[], help="models of the grid (named if absent)")
    s.add_argument("--html", help="chart HTML path")
    s.add_argument("--png", help="chart PNG path")
    s.set_defaults(func=cmd_aggregate_ppl)


def _attention_commands(sub) -> None:
    s = sub.add_parser("attention", help="compute one attention-statistics cell")
    s.add_argument("--spec", type=_json, required=True, help="JSON cell spec (model + method)")
    s.add_argument("--settings", type=_json, required=True, help="JSON attention settings")
    s.add_argument("--tokens", required=True, help="tokenised corpus Parquet")
    s.add_argument("--length", type=_positive_int, required=True, help="context length in tokens")
    s.add_argument("--out", required=True, help="output cell Parquet")
    s.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    s.set_defaults(func=cmd_attention)

    s = sub.add_parser(
        "aggregate-attention", help="JS-divergence table + distribution charts from attention cells"
    )
    s.add_argument("cells", nargs="*", help="attention cell Parquet files")
    s.add_argument("--prefix", required=True, help="writes PREFIX.parquet/.csv/.md (+ _layers)")
    s.add_argument(
        "--reference",
        type=_reference,
        default="rope",
        help="JS reference: a method label (at the pretrained length) or JSON "
        '(e.g. \'{"method": "rope", "length": "same"}\', or a list); see attention.reference',
    )
    s.add_argument("--models", nargs="*", default=[], help="models to chart")
    s.add_argument("--html", nargs="*", default=[], help="k/L distribution chart HTML per model")
    s.add_argument("--png", nargs="*", default=[], help="k/L distribution chart PNG per model")
    s.add_argument("--distance-html", nargs="*", default=[], help="q-k chart HTML per model")
    s.add_argument("--distance-png", nargs="*", default=[], help="q-k chart PNG per model")
    s.add_argument("--js-html", nargs="*", default=[], help="JS-vs-length chart HTML per model")
    s.add_argument("--js-png", nargs="*", default=[], help="JS-vs-length chart PNG per model")
    s.add_argument("--plot-lengths", type=_json, help="JSON list of lengths to chart")
    s.set_defaults(func=cmd_aggregate_attention)

    s = sub.add_parser(
        "aggregate-sinks", help="attention-sink table + chart (mass on the first tokens per layer)"
    )
    s.add_argument("cells", nargs="*", help="attention cell Parquet files")
    s.add_argument("--prefix", required=True, help="writes PREFIX.parquet/.csv/.md (+ _layers)")
    s.add_argument("--models", nargs="*", default=[], help="models to chart")
    s.add_argument("--html", nargs="*", default=[], help="chart HTML per model")
    s.add_argument("--png", nargs="*", default=[], help="chart PNG per model")
    s.set_defaults(func=cmd_aggregate_sinks)


def _report_command(sub) -> None:
    s = sub.add_parser(
        "report",
        help="one self-contained HTML page with every table, chart and provenance",
        description="Write one self-contained HTML report (interactive charts with PNG "
        "fallbacks, every table, provenance: config hash, package versions, hardware, wall time "
        "per stage) from aggregate files. Each file goes to the section of the registry in "
        "ropelens.report.SECTIONS that claims its name; sections without files are omitted.",
        epilog="example: ropelens report results/tables/*.parquet results/figures/*.html "
        "--out results/report.html --captions report --results results --models resources",
    )
    s.add_argument(
        "files",
        nargs="*",
        help="aggregate files: tables (.parquet, with .md/.csv next to them) "
        "and charts (.html, with .vl.json/.png next to them)",
    )
    s.add_argument("--out", required=True, help="output HTML path (e.g. results/report.html)")
    s.add_argument("--captions", help="folder of section captions (report/*.rst)")
    s.add_argument("--config-json", type=_json, help="resolved workflow config as JSON (hashed)")
    s.add_argument("--results", help="results folder whose cells' metadata give wall times")
    s.add_argument("--models", help="folder searched for toy training summaries (wall time)")
    s.add_argument("--title", default="ropelens report", help="page title")
    s.add_argument("--lock", help="requirements lock the package versions are compared with")
    s.set_defaults(func=cmd_report)


def _needle_commands(sub) -> None:
    s = sub.add_parser(
        "needle", help="compute one needle-in-a-haystack cell with attention entropy"
    )
    s.add_argument("--spec", type=_json, required=True, help="JSON cell spec (model + method)")
    s.add_argument("--settings", type=_json, required=True, help="JSON needle settings")
    s.add_argument("--haystack", required=True, help="haystack corpus Parquet (column text)")
    s.add_argument("--length", type=_positive_int, required=True, help="prompt length in tokens")
    s.add_argument("--depth", type=_depth, required=True, help="needle depth in percent (0-100)")
    s.add_argument("--out", required=True, help="output cell Parquet")
    s.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    s.set_defaults(func=cmd_needle)

    s = sub.add_parser(
        "aggregate-needle",
        help="needle heatmaps, entropy-failure table and continual-pretraining comparison",
    )
    s.add_argument("cells", nargs="*", help="needle cell Parquet files")
    s.add_argument(
        "--prefix", required=True, help="writes PREFIX.*, PREFIX_entropy_strata.* and PREFIX_cpt.*"
    )
    s.add_argument("--models", nargs="*", default=[], help="models to chart")
    s.add_argument("--html", nargs="*", default=[], help="heatmap HTML per model")
    s.add_argument("--png", nargs="*", default=[], help="heatmap PNG per model")
    s.add_argument("--strata-html", nargs="*", default=[], help="AUROC-by-length HTML per model")
    s.add_argument("--strata-png", nargs="*", default=[], help="AUROC-by-length PNG per model")
    s.set_defaults(func=cmd_aggregate_needle)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("ROPELENS_DEBUG", "0") not in ("", "0")
    try:
        check_arguments(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("ropelens: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as e:  # one line; the traceback only when asked for
        if debug:
            import traceback

            traceback.print_exc()
        print(f"ropelens: error: {explain(e, args)}", file=sys.stderr)
        return 2 if isinstance(e, RopelensError) else 3 if is_out_of_memory(e) else 1


# errors of ropelens' own code, never of what it was given (a KeyError of a JSON argument aside)
INTERNAL_ERRORS = (
    LookupError,
    AttributeError,
    TypeError,
    NameError,
    ArithmeticError,
    AssertionError,
)
DEBUG_HINT = "`ropelens --debug COMMAND ...` or ROPELENS_DEBUG=1 shows the traceback"


def explain(e: Exception, args) -> str:
    """One line for an exception of a subcommand: what failed, for which output, what to do."""
    if isinstance(e, RopelensError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    out = getattr(args, "out", None) or getattr(args, "prefix", None)
    cell = f" for {out}" if out else ""
    if is_out_of_memory(e):
        return f"out of memory{cell}: {first}; give the job more memory or a shorter length"
    if isinstance(e, MissingJsonKey):
        return (
            f"{args.command}{cell}: the JSON argument {_json_flag(args, e.mapping)} lacks the key "
            f"{first}; pass it as the workflow does (the command is in the cell's log, or "
            "`snakemake -p -n <cell>`)"
        )
    if isinstance(e, INTERNAL_ERRORS):
        return (
            f"{args.command}: internal error{cell}: {type(e).__name__}: {first} — a bug in "
            f"ropelens, not in its input; {DEBUG_HINT} (please report it with the command)"
        )
    return f"{args.command} failed{cell}: {type(e).__name__}: {first}; {DEBUG_HINT}"


def _json_flag(args, mapping: dict) -> str:
    """The option whose JSON holds ``mapping`` (``--spec``), else 'of the command'."""

    def holds(value) -> bool:
        if value is mapping:
            return True
        items = value.values() if isinstance(value, dict) else value
        return isinstance(value, (dict, list)) and any(holds(v) for v in items)

    names = [k for k, v in vars(args).items() if k != "func" and holds(v)]
    return f"--{names[0].replace('_', '-')}" if names else "of the command"


# --- arguments checked before any work: inputs exist and have the right columns, outputs can be
# written, cell specs are complete -----------------------------------------------------------------

INPUT_COLUMNS = {  # argument -> columns its Parquet must have, and what it is
    "tokens": (("doc_id", "n_tokens", "input_ids"), "a tokenised corpus (`ropelens tokenize`)"),
    "corpus": (("doc_id", "text"), "a materialised corpus (`ropelens corpus`)"),
    "haystack": (("text",), "a materialised corpus (`ropelens corpus`)"),
}
SPEC_KEYS = ("model", "method", "source", "pretrained_length", "registry", "params")
CELL_COMMANDS = ("ppl", "attention", "needle", "task")


def _task_commands(sub) -> None:
    from ropelens.tasks import TASKS

    s = sub.add_parser(
        "task", help="compute one synthetic task cell (passkey, multi-key, ...) with attention"
    )
    s.add_argument("--task", choices=TASKS, required=True, help="which task")
    s.add_argument("--spec", type=_json, required=True, help="JSON cell spec (model + method)")
    s.add_argument("--settings", type=_json, required=True, help="JSON task settings")
    s.add_argument("--haystack", help="haystack corpus Parquet (column text); none: the filler")
    s.add_argument("--length", type=_positive_int, required=True, help="prompt length in tokens")
    s.add_argument("--depth", type=_depth, required=True, help="depth of the first planted span")
    s.add_argument("--out", required=True, help="output cell Parquet")
    s.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    s.set_defaults(func=cmd_task)

    s = sub.add_parser(
        "aggregate-tasks", help="task pass rates, entropy-failure, distractor and hop tables"
    )
    s.add_argument("cells", nargs="*", help="task cell Parquet files")
    s.add_argument("--prefix", required=True, help="writes PREFIX.*, PREFIX_entropy.*, ...")
    s.add_argument("--models", nargs="*", default=[], help="models to chart")
    s.add_argument("--tasks", nargs="*", default=[], help="tasks to chart")
    s.add_argument("--html", nargs="*", default=[], help="heatmap HTML per model x task")
    s.add_argument("--png", nargs="*", default=[], help="heatmap PNG per model x task")
    s.set_defaults(func=cmd_aggregate_tasks)


def _toy_commands(sub) -> None:
    """The toy zoo's training (:mod:`ropelens.toytrain`, rules/toy.smk)."""
    s = sub.add_parser("pretrain", help="pretrain a toy LLaMA (plain RoPE) from scratch")
    s.add_argument("--length", type=int, required=True, help="pretraining length L0 in tokens")
    _train_args(s)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("continual", help="continually pretrain a base model with a RoPE method")
    s.add_argument("--spec", type=_json, required=True, help="JSON cell spec; source = the base")
    s.add_argument("--length", type=int, required=True, help="continual-pretraining length")
    _train_args(s)
    s.set_defaults(func=cmd_continual)


def _train_args(s) -> None:
    """Arguments both training commands take, after their own."""
    s.add_argument("--settings", type=_json, required=True, help="JSON train block from config")
    s.add_argument("--corpus", required=True, help="LM corpus Parquet from `ropelens corpus`")
    s.add_argument("--haystack", help="haystack corpus Parquet (needed when needle_fraction > 0)")
    s.add_argument("--out", required=True, help="output model directory")
    s.add_argument("--device", default="cpu", help="cpu (default, deterministic), cuda or auto")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: settings' threads)")


def check_arguments(args) -> None:
    for name, (columns, what) in INPUT_COLUMNS.items():
        if getattr(args, name, None):
            _check_input(getattr(args, name), f"--{name}", columns, what)
    for cell in getattr(args, "cells", None) or []:
        if not Path(cell).is_file():
            raise RopelensError(f"{args.command}: cell '{cell}' does not exist; run its rule first")
    outs = [getattr(args, k, None) for k in ("out", "prefix")]
    for key in ("html", "png"):
        value = getattr(args, key, None)
        outs += value if isinstance(value, list) else [value]
    for out in filter(None, outs):
        _check_output(Path(out))
    spec = getattr(args, "spec", None)
    if isinstance(spec, dict) and args.command in CELL_COMMANDS + ("continual",):
        missing = [k for k in SPEC_KEYS if k not in spec]
        source = spec.get("source")
        if not missing and not (isinstance(source, dict) and ("path" in source or "hub" in source)):
            missing = ["source.path or source.hub"]
        if missing:
            raise RopelensError(
                f"--spec: missing {', '.join(missing)}; pass the cell spec the workflow gives "
                "(the command is in the cell's log, or `snakemake -p -n <cell>`)"
            )
    settings = getattr(args, "settings", None)
    if isinstance(settings, dict) and args.command in CELL_COMMANDS:
        from ropelens import config, grid

        section = "tasks" if args.command == "task" else args.command
        props = config.schema()["properties"][section]["properties"]
        keys = grid.TASK_GRID_KEYS if section == "tasks" else grid.GRID_KEYS.get(section, ())
        missing = [k for k, p in props.items() if "default" in p and k not in keys]
        missing = [k for k in missing if k not in settings]
        if missing:
            raise RopelensError(
                f"--settings: missing {', '.join(missing)}; pass the {args.command} settings the "
                "workflow gives (the command is in the cell's log, or `snakemake -p -n <cell>`)"
            )


def _check_input(path: str, flag: str, columns, what: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise RopelensError(f"{flag}: '{path}' does not exist; give {what}")
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        raise RopelensError(f"{flag}: '{path}' is not a Parquet file; give {what}") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise RopelensError(
            f"{flag}: '{path}' is not {what}: it lacks {', '.join(missing)} "
            f"(it has {', '.join(names)})"
        )


def _check_output(out: Path) -> None:
    """The output's folder exists or can be made (no file in the way) and is writable."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RopelensError(
            f"cannot write '{out}': '{parent}' is a file, not a folder; choose another output path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RopelensError(f"cannot write '{out}': no write permission in '{parent}'")
    if out.is_dir() and out.suffix:
        raise RopelensError(f"cannot write '{out}': it is a folder; choose another output path")


if __name__ == "__main__":
    sys.exit(main())

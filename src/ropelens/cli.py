"""The ``ropelens`` command line. Snakemake rules are thin shells over these subcommands.

Every error a user can fix is one line on stderr (``ropelens: error: ...``) and a non-zero exit;
no subcommand leaves a partial output file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ropelens import __version__
from ropelens.errors import RopelensError


def _json(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _progress(desc: str):
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, file=sys.stderr, mininterval=2.0)


# --- subcommands -----------------------------------------------------------------------------


def cmd_check_config(args) -> int:
    from ropelens import config

    cfg = config.prepare(config.load_yaml(args.config), args.base_dir)
    pairs = config.model_method_pairs(cfg)
    n_len = len(cfg["lengths"])
    print(
        f"{args.config}: ok — {len(cfg['models'])} models, {len(cfg['methods'])} methods, "
        f"{n_len} lengths, {len(pairs) * n_len} perplexity cells"
    )
    return 0


def cmd_make_tiny(args) -> int:
    from ropelens.models import make_tiny

    spec = args.spec or {}
    make_tiny(args.out, pretrained_length=args.pretrained_length, **spec)
    print(f"wrote tiny LLaMA to {args.out}", file=sys.stderr)
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

    from ropelens import models, ppl, schemas
    from ropelens.io import write_cell

    _threads(args.threads)
    spec, settings = args.spec, args.settings
    tokens = pq.read_table(args.tokens)
    t0 = time.perf_counter()
    loaded = models.load(spec)
    load_s = time.perf_counter() - t0
    rows = ppl.evaluate(
        loaded.model, tokens, args.length, settings, _progress(f"ppl L={args.length}")
    )
    n = len(rows["doc_id"])
    rope = loaded.rope_parameters
    rows.update(
        model=[spec["model"]] * n,
        method=[spec["method"]] * n,
        length=[args.length] * n,
        rope_type=[rope.get("rope_type", "default")] * n,
        factor=[rope.get("factor")] * n,
        pretrained_length=[spec["pretrained_length"]] * n,
        cpt_length=[spec.get("cpt_length")] * n,
        protocol=[settings["protocol"]] * n,
    )
    meta = {
        "ropelens.spec": json.dumps(spec),
        "ropelens.rope_parameters": json.dumps(rope),
        "ropelens.device": loaded.device,
        "ropelens.load_seconds": f"{load_s:.3f}",
        "ropelens.compute_seconds": f"{time.perf_counter() - t0 - load_s:.3f}",
        "ropelens.version": __version__,
    }
    write_cell(rows, schemas.PPL, args.out, meta)
    total = sum(rows["nll_sum"]) / max(1, sum(rows["tokens"]))
    print(f"{args.out}: {n} documents, mean NLL {total:.4f}", file=sys.stderr)
    return 0


def cmd_aggregate_ppl(args) -> int:
    from ropelens import charts, tables

    table = tables.ppl_table(args.cells)
    tables.write_outputs(table, args.prefix, "ppl")
    if args.html:
        charts.save(charts.ppl_chart(table), args.html, args.png)
    print(f"aggregated {len(args.cells)} cells into {args.prefix}.*", file=sys.stderr)
    return 0


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ropelens",
        description="Benchmark RoPE context-extension methods from an attention perspective. "
        "The Snakemake workflow calls these subcommands, one per cell; you can run any of them "
        "by hand.",
    )
    p.add_argument("--version", action="version", version=f"ropelens {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("check-config", help="validate a workflow config and summarise its grid")
    s.add_argument("config", help="path to a YAML config (e.g. config.yaml)")
    s.add_argument("--base-dir", default=".", help="folder that relative paths start from")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("make-tiny", help="write a tiny random-init LLaMA + byte tokenizer")
    s.add_argument("--out", required=True, help="output model directory")
    s.add_argument("--pretrained-length", type=int, required=True, help="max_position_embeddings")
    s.add_argument("--spec", type=_json, help="JSON of shape options (hidden_size, layers, ...)")
    s.set_defaults(func=cmd_make_tiny)

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

    s = sub.add_parser("ppl", help="compute one perplexity cell (model, method, length)")
    s.add_argument("--spec", type=_json, required=True, help="JSON cell spec (model + method)")
    s.add_argument("--settings", type=_json, required=True, help="JSON ppl settings from config")
    s.add_argument("--tokens", required=True, help="tokenised corpus Parquet")
    s.add_argument("--length", type=int, required=True, help="context length in tokens")
    s.add_argument("--out", required=True, help="output cell Parquet")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.set_defaults(func=cmd_ppl)

    s = sub.add_parser("aggregate-ppl", help="perplexity table (+ chart) from PPL cells")
    s.add_argument("cells", nargs="*", help="PPL cell Parquet files")
    s.add_argument("--prefix", required=True, help="writes PREFIX.parquet/.csv/.md")
    s.add_argument("--html", help="chart HTML path")
    s.add_argument("--png", help="chart PNG path")
    s.set_defaults(func=cmd_aggregate_ppl)

    from ropelens import toy

    toy.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RopelensError as e:
        print(f"ropelens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ropelens: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as e:  # torch OOM and other runtime failures: one line, no partial file
        if "out of memory" in str(e).lower():
            first = str(e).strip().splitlines()[0]
            print(f"ropelens: error: out of memory: {first}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())

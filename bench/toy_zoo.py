"""Time the toy model zoo's training and check what the default run shows (issue 3).

    python bench/toy_zoo.py --cores 2 --out bench/results/toy_zoo.md

1. ``snakemake --cores N`` on the zoo's model directories only (corpora, pretrain, continual
   pretraining) in a fresh work directory: wall time (goal: <= 10 min on 2 cores).
2. The rest of the default workflow (every cell and report), unless ``--zoo-only``: wall time.
3. The must-show figures, measured on that run:
   - rope: PPL at 4·L0 is at least 2x its PPL at L0;
   - each method continually pretrained at L1 = 4·L0: PPL at L1 at most 15 % above the base's PPL
     at L0 (the L2 = 8·L0 variants are listed too);
   - the base (rope) retrieves the needle at >= 90 % of depths for every length <= L0 in
     ``lengths``: the prompts of the needle cells (same seeds, same haystack, same greedy
     decoding), and the pass rate over ``--seeds`` more answers per (length, depth);
   - with the whole workflow (issue 5): the pooled AUROC of mean attention entropy as a predictor of
     needle failure, and per method the longer continual-pretraining variant's mean entropy and
     pass rate on needle cells longer than L1, from ``results/tables/needle*.parquet``.

Writes a Markdown report (``--out``) with the command, the machine and every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def snakemake_bin() -> str:
    exe = Path(sys.executable).with_name("snakemake")
    return str(exe) if exe.exists() else "snakemake"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_snakemake(workdir: Path, configfile, cores: int, targets, log: Path) -> float:
    files = [configfile] if isinstance(configfile, (str, Path)) else list(configfile)
    cmd = [
        snakemake_bin(),
        "-s",
        str(REPO / "Snakefile"),
        "--configfile",
        *map(str, files),
        "--directory",
        str(workdir),
        "--cores",
        str(cores),
        *targets,
    ]
    t0 = time.perf_counter()
    with log.open("a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"snakemake failed ({proc.returncode}); see {log}")
    return seconds


def logged_elapsed(log: Path, runs: int) -> tuple[float, float | None]:
    """Seconds of the first ``runs`` Snakemake runs from their ``Elapsed time: H:MM:SS`` lines."""
    import re

    found = re.findall(r"Elapsed time: (\d+):(\d+):([\d.]+)", log.read_text())
    if len(found) < runs:
        sys.exit(f"{log}: {len(found)} finished Snakemake run(s), need {runs}; rerun it whole")
    seconds = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in found[:runs]]
    return seconds[0], (seconds[1] if runs == 2 else None)


def zoo_targets(cfg) -> list[tuple[str, str, str]]:
    """(label, role, directory) of every model the config trains."""
    from ropelens import config

    out = []
    for model, entry in cfg["models"].items():
        if "train" in entry:
            out.append((f"{model} base", "pretrain", config.model_dir(cfg, model)))
    for method, entry in cfg["methods"].items():
        for model, ckpt in (entry.get("checkpoints") or {}).items():
            if "train" in ckpt:
                out.append(
                    (f"{model} {method}", "continual", config.checkpoint_dir(cfg, model, method))
                )
    return out


def load_base(cfg, workdir: Path, model: str):
    """The trained base of ``model`` in ``workdir`` with plain RoPE, as its rope cells load it."""
    import torch

    from ropelens import config, models

    torch.set_num_threads(cfg["runtime"]["threads"])
    spec = config.cell_spec(cfg, model, "rope")
    spec["source"] = {"path": str(workdir / spec["source"]["path"])}
    return models.load(spec)


def needle_check(cfg, workdir: Path, model: str, seeds: int) -> list[dict]:
    """Base model: the needle cells' prompts at every length <= L0, plus ``seeds`` more answers."""
    import pyarrow.parquet as pq

    from ropelens import config, needle

    loaded = load_base(cfg, workdir, model)
    settings = config.cell_settings(cfg, "needle")
    template = needle.Template(**settings.get("template", {}))
    placement = settings.get("placement", needle.DEFAULT_PLACEMENT)
    corpus = workdir / f"results/data/corpora/{cfg['needle']['haystack']}.parquet"
    haystack = pq.read_table(corpus).column("text").to_pylist()
    l0 = cfg["models"][model]["pretrained_length"]
    fmt = needle.resolve_format(loaded.tokenizer, settings.get("format", "auto"))
    rows = []
    for length in [n for n in cfg["lengths"] if n <= l0]:
        for depth in cfg["depths"]:
            base_seed = settings.get("seed", 0)
            results = []
            for k in range(seeds + 1):
                seed = needle.cell_seed(length, depth, base_seed + k)
                prompt = needle.build_prompt(
                    loaded.tokenizer,
                    haystack,
                    length,
                    depth,
                    seed,
                    template,
                    fmt=fmt,
                    placement=placement,
                )
                max_new = settings.get("max_new_tokens") or len(prompt.target_ids) + 4
                results.append(needle.run(loaded.model, loaded.tokenizer, prompt, max_new))
            rows.append(
                {
                    "length": length,
                    "depth": depth,
                    "cell_passed": results[0]["exact"],
                    "cell_generated": results[0]["generated"],
                    "rate": sum(r["exact"] for r in results) / len(results),
                    "score": sum(r["score"] for r in results) / len(results),
                }
            )
    return rows


def task_check(cfg, workdir: Path, model: str, seeds: int) -> list[dict]:
    """Base model at L0: every task's cell prompts (the overlay's seeds) plus ``seeds`` more."""
    import pyarrow.parquet as pq

    from ropelens import grid, taskcells, tasks

    loaded = load_base(cfg, workdir, model)
    l0 = cfg["models"][model]["pretrained_length"]
    rows = []
    for task in grid.enabled_tasks(cfg):
        entry, settings = grid.task_entry(cfg, task), grid.task_settings(cfg, task)
        haystack = None
        if entry["haystack"] != tasks.FILLER:
            corpus = workdir / f"results/data/corpora/{entry['haystack']}.parquet"
            haystack = pq.read_table(corpus).column("text").to_pylist()
        for depth in entry["depths"]:
            results = [
                taskcells.run_cell(
                    loaded.model,
                    loaded.tokenizer,
                    task,
                    haystack,
                    l0,
                    depth,
                    {**settings, "seed": settings.get("seed", 0) + k},
                )
                for k in range(seeds + 1)
            ]
            ran = [r for r in results if r["status"][0] == "ok"]
            rows.append(
                {
                    "task": task,
                    "depth": depth,
                    "cell_passed": bool(results[0]["passed"][0]),
                    "cell_generated": results[0]["generated"][0],
                    "rate": sum(bool(r["passed"][0]) for r in ran) / max(1, len(ran)),
                    "prompts": len(ran),
                    "failed_like": failed_like([r for r in ran if not r["passed"][0]]),
                }
            )
    return rows


def failed_like(failed) -> str:
    """Multi-key failures by the planted value whose leading digits the answer shares most
    (none shared: "neither"; a tie goes to the needle), e.g. "needle 3, distractor 5, neither 0"."""
    if not failed or not failed[0]["distractor_answers"][0]:
        return ""
    counts = {"needle": 0, "distractor": 0, "neither": 0}
    for r in failed:
        got = r["predicted"][0].split(",")[0]
        needle = len(os.path.commonprefix([got, r["answer"][0]]))
        other = max(
            len(os.path.commonprefix([got, v])) for v in r["distractor_answers"][0].split(", ")
        )
        kind = "neither" if needle == other == 0 else "needle" if needle >= other else "distractor"
        counts[kind] += 1
    return ", ".join(f"{k} {n}" for k, n in counts.items())


def task_figures(workdir: Path, model: str) -> list[str]:
    """Issue 18's figures from the task tables: pass rates, entropy vs failure, distractors."""
    import pandas as pd

    from ropelens.retrieval import ALL_METHODS

    t = workdir / "results/tables"
    passes = pd.read_parquet(t / "tasks.parquet")
    entropy = pd.read_parquet(t / "tasks_entropy.parquet")
    dis = pd.read_parquet(t / "tasks_distractors.parquet")
    passes, entropy = passes[passes.model == model], entropy[entropy.model == model]
    lengths = sorted(passes.length.unique())
    lines = ["Pass rate per task × method × length (cells):", ""]
    lines += ["| task | method | " + " | ".join(map(str, lengths)) + " |"]
    lines += ["|---|---|" + "---:|" * len(lengths)]
    for (task, method), g in passes.groupby(["task", "method"], sort=False):
        rate = {int(r.length): f"{r.pass_rate:.0%} ({r.cells})" for r in g.itertuples()}
        lines.append(
            f"| {task} | {method} | " + " | ".join(rate.get(n, "—") for n in lengths) + " |"
        )
    lines += ["", "Entropy against failure, all methods pooled, per task:", ""]
    lines += [
        "| task | cells | pass rate | entropy passed | entropy failed | AUROC pooled | "
        "AUROC within length | AUROC length alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in entropy[entropy.method == ALL_METHODS].itertuples():
        lines.append(
            f"| {r.task} | {r.cells} | {r.pass_rate:.0%} | {r.entropy_passed:.3f} | "
            f"{r.entropy_failed:.3f} | {r.auroc_entropy_failure:.3f} | "
            f"{r.auroc_within_length:.3f} | {r.auroc_length_failure:.3f} |"
        )
    lines += ["", "Multi-key: attention mass of the answering queries, passed vs failed cells:", ""]
    lines += [
        "| method | cells | failures | needle mass passed / failed | distractor mass passed / "
        "failed | distractor share passed / failed | AUROC distractor mass (within length) | "
        "failures answering a distractor |",
        "|---|---:|---:|---|---|---|---|---:|",
    ]
    for r in dis[dis.model == model].itertuples():
        lines.append(
            f"| {r.method} | {r.cells} | {r.failures} | {r.needle_mass_passed:.3f} / "
            f"{r.needle_mass_failed:.3f} | {r.distractor_mass_passed:.3f} / "
            f"{r.distractor_mass_failed:.3f} | {r.distractor_share_passed:.3f} / "
            f"{r.distractor_share_failed:.3f} | {r.auroc_distractor_failure:.3f} "
            f"({r.auroc_distractor_within_length:.3f}) | {r.failures_answering_a_distractor:.0%} |"
        )
    return lines


def needle_entropy_checks(workdir: Path, model: str, l0: int) -> list[tuple]:
    """Issue 5's figures from the workflow's own needle tables (results/tables/needle*.parquet)."""
    import pandas as pd

    summary = pd.read_parquet(workdir / "results/tables/needle.parquet")
    cpt = pd.read_parquet(workdir / "results/tables/needle_cpt.parquet")
    pooled = summary[(summary.model == model) & (summary.method == "(all methods)")].iloc[0]
    out = [
        (
            "needle: AUROC of mean entropy as a predictor of failure, pooled over methods "
            f"({pooled.cells} cells, pass rate {pooled.pass_rate:.0%})",
            f"{pooled.auroc_entropy_failure:.3f} (entropy passed {pooled.entropy_passed:.3f}, "
            f"failed {pooled.entropy_failed:.3f})",
            ">= 0.7",
            pooled.auroc_entropy_failure >= 0.7,
        ),
        (
            "needle: the same AUROC within each length (pairs of one length only), and the "
            "AUROC of context length alone",
            f"{pooled.auroc_within_length:.3f}; length alone {pooled.auroc_length_failure:.3f}",
            "within > 0.5",
            pooled.auroc_within_length > 0.5,
        ),
    ]
    for base, g in cpt[cpt.model == model].groupby("registry_method", sort=True):
        trained = g[g.cpt_length > 0].sort_values("cpt_length")
        if len(trained) < 2:
            continue
        short, long = trained.iloc[0], trained.iloc[-1]
        beyond = int(short.beyond_length)
        out.append(
            (
                f"{base}: continual at {long.cpt_length} vs {short.cpt_length}, needle cells "
                f"longer than L1 = {beyond}: mean entropy",
                f"{long.mean_entropy_beyond:.3f} vs {short.mean_entropy_beyond:.3f}",
                "lower",
                bool(long.mean_entropy_beyond < short.mean_entropy_beyond),
            )
        )
        out.append(
            (
                f"{base}: continual at {long.cpt_length} vs {short.cpt_length}, needle cells "
                f"longer than L1 = {beyond}: pass rate",
                f"{long.pass_rate_beyond:.0%} vs {short.pass_rate_beyond:.0%}",
                "not lower",
                bool(long.pass_rate_beyond >= short.pass_rate_beyond),
            )
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "config.yaml"), help="workflow config")
    p.add_argument("--workdir", help="work directory (default: a new temporary one)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--zoo-only", action="store_true", help="train the zoo, skip the cells")
    p.add_argument("--seeds", type=int, default=9, help="extra needle answers per (length, depth)")
    p.add_argument("--out", default=str(REPO / "bench/results/toy_zoo.md"))
    p.add_argument(
        "--tasks",
        help="a tasks overlay (e.g. configs/tasks.yaml): after the default run, run it too (timed "
        "apart) and report the base's tasks at L0 and the task tables",
    )
    p.add_argument(
        "--figures-only",
        action="store_true",
        help="measure the figures of a finished run in --workdir; its wall times are read from "
        "the Elapsed time lines Snakemake wrote to that run's bench_toy_zoo.log",
    )
    args = p.parse_args(argv)
    if args.figures_only and not args.workdir:
        p.error("--figures-only needs the --workdir of a finished run")

    import torch
    import transformers

    from ropelens import config

    configfile = Path(args.config).resolve()
    cfg = config.prepare(config.load_yaml(configfile), configfile.parent)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="toy_zoo_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "bench_toy_zoo.log"
    load_before = load_average()

    targets = zoo_targets(cfg)
    if args.figures_only:
        zoo_s, full_s = logged_elapsed(log, 1 if args.zoo_only else 2)
        load_after_zoo = "n/a (figures of an earlier run)"
    else:
        zoo_s = run_snakemake(workdir, configfile, args.cores, [d for _, _, d in targets], log)
        load_after_zoo = load_average()
        full_s = None
        if not args.zoo_only:
            full_s = run_snakemake(workdir, configfile, args.cores, [], log)
    tasks_s = None
    if args.tasks and full_s is not None:
        overlay = Path(args.tasks).resolve()
        tasks_s = run_snakemake(workdir, [configfile, overlay], args.cores, [], log)
        from snakemake.utils import update_config  # Snakemake's own merge of config files

        merged = config.load_yaml(configfile)
        update_config(merged, config.load_yaml(overlay))
        cfg_tasks = config.prepare(merged, configfile.parent)

    trained = []
    for label, role, d in targets:
        s = json.loads((workdir / d / "ropelens_train.json").read_text())
        trained.append((label, role, s))

    # --- must-show figures --------------------------------------------------------------------
    import pandas as pd

    if full_s is None:
        cells = [
            f"results/ppl/model={m}/method={x}/length={n}.parquet"
            for m, x in config.model_method_pairs(cfg)
            for n in cfg["lengths"]
            if x == "rope" or n == cfg["methods"][x].get("cpt_length")
        ]
        run_snakemake(workdir, configfile, args.cores, cells, log)
        from ropelens import tables

        ppl = tables.ppl_table([workdir / c for c in cells]).to_pandas()
    else:
        ppl = pd.read_parquet(workdir / "results/tables/ppl.parquet")
    model = next(m for m, e in cfg["models"].items() if "train" in e)
    l0 = cfg["models"][model]["pretrained_length"]

    def ppl_at(method, length):
        hit = ppl[(ppl.model == model) & (ppl.method == method) & (ppl.length == length)]
        return float(hit.ppl.iloc[0]) if len(hit) else math.nan

    base_l0 = ppl_at("rope", l0)
    checks = []
    ratio = ppl_at("rope", 4 * l0) / base_l0
    checks.append(
        (
            f"rope: PPL at 4·L0 ({4 * l0}) / PPL at L0 ({l0})",
            f"{ppl_at('rope', 4 * l0):.3f} / {base_l0:.3f} = {ratio:.2f}",
            ">= 2",
            ratio >= 2,
        )
    )
    for method, entry in cfg["methods"].items():
        if (entry.get("checkpoints") or {}).get(model, {}).get("train") is None:
            continue
        length = entry["cpt_length"]
        value = ppl_at(method, length)
        rel = value / base_l0 - 1
        must = length == 4 * l0
        checks.append(
            (
                f"{method} (continual at {length}): PPL at {length} vs base PPL at L0",
                f"{value:.3f} vs {base_l0:.3f} = {rel:+.1%}",
                "at most +15 %" if must else "(L2: for reference)",
                rel <= 0.15 if must else None,
            )
        )
    needles = needle_check(cfg, workdir, model, args.seeds)
    cell_rate = sum(r["cell_passed"] for r in needles) / len(needles)
    seed_rate = sum(r["rate"] for r in needles) / len(needles)
    checks.append(
        (
            f"base: needle retrieved, lengths <= L0 × {len(cfg['depths'])} depths "
            f"({len(needles)} cells)",
            f"{cell_rate:.0%} of cells; {seed_rate:.1%} of {len(needles) * (args.seeds + 1)} "
            "prompts",
            ">= 90 % of depths",
            cell_rate >= 0.9,
        )
    )

    if full_s is not None:
        checks += needle_entropy_checks(workdir, model, l0)
    task_rows = []
    if tasks_s is not None:
        task_rows = task_check(cfg_tasks, workdir, model, args.seeds)
        for task in ("passkey", "multi_key"):
            mine = [r for r in task_rows if r["task"] == task]
            cells = sum(r["cell_passed"] for r in mine) / len(mine)
            rate = sum(r["rate"] * r["prompts"] for r in mine) / sum(r["prompts"] for r in mine)
            checks.append(
                (
                    f"base: {task} solved at L0 ({len(mine)} depths)",
                    f"{cells:.0%} of cells; {rate:.1%} of {sum(r['prompts'] for r in mine)} "
                    "prompts",
                    ">= 90 % of prompts",
                    rate >= 0.9,
                )
            )

    # --- report -------------------------------------------------------------------------------
    command = "python bench/toy_zoo.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# Toy model zoo: training time and what the default run shows",
        "",
        f"Command: `{command.strip()}` (config `{os.path.relpath(configfile, REPO)}`, "
        f"snakemake --cores {args.cores}, a fresh work directory).",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}. Load average "
        f"(1/5/15 min) before: {load_before}; after the zoo: {load_after_zoo}; at the end: "
        f"{load_average()}.",
        "",
        "## Wall time",
        "",
        "| stage | seconds | minutes |",
        "|---|---:|---:|",
        f"| zoo: corpora + pretrain + {len(targets) - 1} continual runs | {zoo_s:.0f} | "
        f"{zoo_s / 60:.1f} |",
    ]
    if full_s is not None:
        lines.append(
            f"| the rest of the default workflow (cells, reports) | {full_s:.0f} | "
            f"{full_s / 60:.1f} |"
        )
        lines.append(
            f"| **the default run** | **{zoo_s + full_s:.0f}** | **{(zoo_s + full_s) / 60:.1f}** |"
        )
    if tasks_s is not None:
        lines.append(
            f"| then the tasks overlay `{args.tasks}` (its cells, report) | {tasks_s:.0f} | "
            f"{tasks_s / 60:.1f} |"
        )
    lines += [
        "",
        "Training runs (seconds inside each run, from `ropelens_train.json`):",
        "",
        "| model | role | length | steps × batch | threads | seconds | LM loss | answer loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, role, s in trained:
        st = s["settings"]
        lines.append(
            f"| {label} | {role} | {s['length']} | {s['steps']} × {st['batch_size']} | "
            f"{st['threads']} | {s['seconds']:.0f} | {s['final']['lm_loss']:.3f} | "
            f"{s['final']['answer_loss']:.3f} |"
        )
    lines += [
        "",
        "## Must-show figures",
        "",
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for name, value, goal, ok in checks:
        mark = "—" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {name} | {value} | {goal} | {mark} |")
    lines += [
        "",
        f"Perplexity ({cfg['ppl']['corpus']} corpus, protocol {cfg['ppl']['protocol']}, "
        f"{cfg['ppl']['max_documents']} documents, token-weighted):",
        "",
    ]
    lengths = sorted(ppl.length.unique())
    lines.append("| method | " + " | ".join(str(n) for n in lengths) + " |")
    lines.append("|---|" + "---:|" * len(lengths))
    for method in cfg["methods"]:
        vals = [ppl_at(method, n) for n in lengths]
        cells = ["—" if v != v else f"{v:.2f}" for v in vals]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Needle, base model (rope), lengths <= L0: the cell's prompt (seed of the needle cell) "
        f"and the pass rate over it and {args.seeds} more answers:",
        "",
        "| length | depth | cell passed | cell output | pass rate | mean score |",
        "|---:|---:|---|---|---:|---:|",
    ]
    for r in needles:
        lines.append(
            f"| {r['length']} | {r['depth']:g} | {'yes' if r['cell_passed'] else 'no'} | "
            f"`{r['cell_generated']!r}` | {r['rate']:.0%} | {r['score']:.2f} |"
        )
    if task_rows:
        lines += [
            "",
            f"Tasks, base model (rope) at L0: the cell's prompt and the pass rate over it and "
            f"{args.seeds} more (seeds seed+1 …):",
            "",
            "| task | depth | cell passed | cell output | pass rate | failures: the answer "
            "begins as the value of (multi-key) |",
            "|---|---:|---|---|---:|---|",
        ]
        for r in task_rows:
            lines.append(
                f"| {r['task']} | {r['depth']:g} | {'yes' if r['cell_passed'] else 'no'} | "
                f"`{r['cell_generated']!r}` | {r['rate']:.0%} of {r['prompts']} | "
                f"{r['failed_like']} |"
            )
        lines += ["", *task_figures(workdir, model)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}; work directory {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

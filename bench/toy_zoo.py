"""What the default run shows on the shipped toy zoo, and how long a fresh clone's run takes.

    python bench/toy_zoo.py --cores 2 --workdir /tmp/bench_zoo --out bench/results/toy_zoo.md

1. A fresh clone of this repository (``git clone`` of HEAD, the committed zoo/ included) in the
   work directory; a config that trains models (``configs/zoo.yaml``) trains them there first,
   timed apart.
2. ``snakemake --cores N`` in the clone: the default run (cells, tables, report), timed — what
   ``make run`` does after ``make setup`` (goal: <= 5 min on 2 cores).
3. The must-show figures of issue 26, from the run's own cells and tables:
   - Fig. 1: RoPE's PPL at 4·L0 >= 2x its PPL at L0; each continually pretrained model within
     10 % of the base's L0 PPL at every length from L0 up to its continual-pretraining length
     (below L0 every model's PPL is higher, the base's too: less context);
   - Fig. 4: the base passes >= 90 % of needle cells at lengths <= L0 and <= 20 % at >= 4·L0;
     each continually pretrained model >= 80 % at lengths <= its length; within L0 the
     training-free methods pass as RoPE does;
   - finding 3: at 8·L0 each model continually pretrained at 8·L0 passes at least as often as
     its 4·L0 sibling, with lower mean needle entropy;
   - finding 2: AUROC of mean entropy for failure within length >= 0.8;
   - with ``--tasks configs/tasks.yaml``: the base passes passkey and multi-key >= 90 % at L0.

Writes a Markdown report (``--out``) with the command, the machine, its load and every number.
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


def git_head() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() or "?"


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
        str(workdir / "Snakefile"),
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


def logged_elapsed(log: Path) -> list[float]:
    """Seconds of every finished Snakemake run in ``log`` (its ``Elapsed time: H:MM:SS`` lines)."""
    import re

    found = re.findall(r"Elapsed time: (\d+):(\d+):([\d.]+)", log.read_text())
    return [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in found]


def zoo_targets(cfg) -> list[tuple[str, str, str]]:
    """(label, role, directory) of every model the config trains."""
    from ropelens import zoo

    return [
        (zoo.shipped_path(d), "pretrain" if key.startswith("models.") else "continual", d)
        for d, key in zoo.trained_dirs(cfg)
    ]


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


def clone(workdir: Path) -> Path:
    """A fresh clone of this repository's HEAD (the committed zoo/ included) in ``workdir``."""
    dst = workdir / "ropelens"
    if not dst.exists():
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(dst)], check=True)
    return dst


def needle_frame(workdir: Path, model: str):
    """One row per needle cell of ``model`` with a result (cell-level columns)."""
    from ropelens import retrieval

    files = sorted((workdir / "results/needle").rglob("*.parquet"))
    cells = retrieval.cell_frame([str(f) for f in files])
    return cells[(cells.model == model) & (cells.status == "ok")]


def _rate(cells, method: str, keep) -> tuple[float, int]:
    """(pass rate, cells) of ``method``'s needle cells whose length ``keep`` accepts."""
    mine = cells[(cells.method == method) & cells.length.map(keep)]
    return (float(mine.passed.mean()) if len(mine) else math.nan), len(mine)


def fig1_checks(cfg, ppl, model: str) -> list[tuple]:
    """RoPE's PPL beyond L0, and each continually pretrained model's up to its length."""
    l0 = cfg["models"][model]["pretrained_length"]

    def at(method, length):
        hit = ppl[(ppl.model == model) & (ppl.method == method) & (ppl.length == length)]
        return float(hit.ppl.iloc[0]) if len(hit) else math.nan

    base = at("rope", l0)
    ratio = at("rope", 4 * l0) / base
    out = [
        (f"Fig. 1: rope PPL at 4·L0 ({4 * l0}) / at L0 ({l0})",
         f"{at('rope', 4 * l0):.3f} / {base:.3f} = {ratio:.2f}", ">= 2", ratio >= 2),
    ]  # fmt: skip
    for method, length in cpt_lengths(cfg, model).items():
        # from L0 on: below it every model's PPL is higher (the base's at L0/2 too: less context)
        ratios = {n: at(method, n) / base for n in cfg["lengths"] if l0 <= n <= length}
        n, worst = max(ratios.items(), key=lambda kv: kv[1])
        out.append(
            (f"Fig. 1: {method} PPL at L0 … {length} vs the base's at L0",
             f"worst {worst - 1:+.1%} (at {n})", "within +10 %", worst <= 1.10)
        )  # fmt: skip
    return out


def cpt_lengths(cfg, model: str) -> dict:
    """Continually pretrained method -> its length, for ``model``."""
    return {
        m: e["cpt_length"]
        for m, e in cfg["methods"].items()
        if (e.get("checkpoints") or {}).get(model)
    }


def fig4_checks(cfg, cells, model: str) -> list[tuple]:
    """Needle pass rates: the base within and far beyond L0, each extension up to its length,
    the training-free methods within L0 against RoPE."""
    l0 = cfg["models"][model]["pretrained_length"]
    within, n_within = _rate(cells, "rope", lambda n: n <= l0)
    beyond, n_beyond = _rate(cells, "rope", lambda n: n >= 4 * l0)
    out = [
        ("Fig. 4: base (rope) needle cells at lengths <= L0", f"{within:.0%} of {n_within}",
         ">= 90 %", within >= 0.9),
        ("Fig. 4: base (rope) needle cells at lengths >= 4·L0", f"{beyond:.0%} of {n_beyond}",
         "<= 20 %", beyond <= 0.2),
    ]  # fmt: skip
    for method, length in cpt_lengths(cfg, model).items():
        rate, n = _rate(cells, method, lambda k, length=length: k <= length)
        out.append((f"Fig. 4: {method} at lengths <= {length}", f"{rate:.0%} of {n}",
                    ">= 80 %", rate >= 0.8))  # fmt: skip
    for method in ("ntk", "yarn", "llama3", "dynamic-ntk"):
        if method in cfg["methods"]:
            rate, n = _rate(cells, method, lambda k: k <= l0)
            name = f"Fig. 4: training-free {method} at lengths <= L0"
            shown = f"{rate:.0%} of {n} (rope {within:.0%})"
            out.append((name, shown, "as rope", rate >= within))
    return out


def finding_checks(cfg, cells, summary, model: str) -> list[tuple]:
    """Finding 3 (a longer continual-pretraining length at 8·L0) and finding 2 (entropy AUROC)."""
    l0 = cfg["models"][model]["pretrained_length"]
    cpt = cpt_lengths(cfg, model)
    out = []
    for method, length in cpt.items():
        registry = cfg["methods"][method].get("method", method)
        sibling = [m for m, n in cpt.items() if n == 4 * l0
                   and cfg["methods"][m].get("method", m) == registry]  # fmt: skip
        if length != 8 * l0 or not sibling:
            continue
        at = cells[cells.length == 8 * l0]
        long, short = at[at.method == method], at[at.method == sibling[0]]
        out.append(
            (f"finding 3: {method} vs {sibling[0]} at 8·L0 ({8 * l0}): pass rate; mean entropy",
             f"{long.passed.mean():.0%} vs {short.passed.mean():.0%}; "
             f"{long.mean_entropy.mean():.3f} vs {short.mean_entropy.mean():.3f}",
             "not lower; lower",
             bool(long.passed.mean() >= short.passed.mean()
                  and long.mean_entropy.mean() < short.mean_entropy.mean())),
        )  # fmt: skip
    pooled = summary[(summary.model == model) & (summary.method == "(all methods)")].iloc[0]
    out.append(
        (f"finding 2: AUROC of mean entropy for failure within length ({pooled.cells} cells)",
         f"{pooled.auroc_within_length:.3f} (pooled {pooled.auroc_entropy_failure:.3f}, "
         f"length alone {pooled.auroc_length_failure:.3f})", ">= 0.8",
         bool(pooled.auroc_within_length >= 0.8)),
    )  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "config.yaml"), help="workflow config")
    p.add_argument("--workdir", help="work directory (default: a new temporary one)")
    p.add_argument("--cores", type=int, default=2)
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

    import pandas as pd
    import torch
    import transformers

    from ropelens import config

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="toy_zoo_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = clone(workdir)  # the run's directory: a fresh clone, as a new user has it
    configfile = root / Path(args.config).resolve().relative_to(REPO)
    cfg = config.prepare(config.load_yaml(configfile), root)
    log = workdir / "bench_toy_zoo.log"
    load_before = load_average()
    targets = zoo_targets(cfg)
    overlay = root / Path(args.tasks).resolve().relative_to(REPO) if args.tasks else None
    if args.figures_only:  # the runs of an earlier call: zoo (if any), default, tasks (if any)
        runs = logged_elapsed(log)
        if len(runs) < bool(targets) + 1 + bool(overlay):
            sys.exit(f"{log}: {len(runs)} finished Snakemake run(s); rerun the bench whole")
        zoo_s = runs.pop(0) if targets else 0.0
        full_s, tasks_s = runs[0], (runs[1] if overlay else None)
        load_after_zoo = "n/a (figures of an earlier run)"
    else:
        zoo_s = 0.0
        if targets:
            zoo_s = run_snakemake(root, configfile, args.cores, [d for _, _, d in targets], log)
        load_after_zoo = load_average()
        full_s = run_snakemake(root, configfile, args.cores, [], log)
        tasks_s = (
            run_snakemake(root, [configfile, overlay], args.cores, [], log) if overlay else None
        )
    if overlay:
        from snakemake.utils import update_config  # Snakemake's own merge of config files

        merged = config.load_yaml(configfile)
        update_config(merged, config.load_yaml(overlay))
        cfg_tasks = config.prepare(merged, root)

    trained = []
    for label, role, d in targets:
        s = json.loads((root / d / "ropelens_train.json").read_text())
        trained.append((label, role, s))
    shipped = sorted((root / "zoo").rglob("ropelens_train.json")) if not targets else []
    for p in shipped:
        s = json.loads(p.read_text())
        trained.append((p.parent.relative_to(root).as_posix(), s["role"] + " (shipped)", s))

    # --- must-show figures --------------------------------------------------------------------
    ppl = pd.read_parquet(root / "results/tables/ppl.parquet")
    model = next(iter(cfg["models"]))
    cells = needle_frame(root, model)
    summary = pd.read_parquet(root / "results/tables/needle.parquet")
    checks = fig1_checks(cfg, ppl, model) + fig4_checks(cfg, cells, model)
    checks += finding_checks(cfg, cells, summary, model)
    needles = needle_check(cfg, root, model, args.seeds)

    def ppl_at(method, length):
        hit = ppl[(ppl.model == model) & (ppl.method == method) & (ppl.length == length)]
        return float(hit.ppl.iloc[0]) if len(hit) else math.nan

    task_rows = []
    if args.tasks:
        task_rows = task_check(cfg_tasks, root, model, args.seeds)
        for task in ("passkey", "multi_key"):
            mine = [r for r in task_rows if r["task"] == task]
            n = sum(r["prompts"] for r in mine)
            rate = sum(r["rate"] * r["prompts"] for r in mine) / n
            checks.append(
                (f"tasks: base {task} at L0 ({len(mine)} depths)",
                 f"{sum(r['cell_passed'] for r in mine)} of {len(mine)} cells; {rate:.1%} of {n} "
                 "prompts", ">= 90 % of prompts", rate >= 0.9)
            )  # fmt: skip
    timed = full_s <= 300
    checks.append(("time: the default run in a fresh clone (cells, tables, report)",
                   f"{full_s:.0f} s", "<= 300 s", timed))  # fmt: skip

    # --- report -------------------------------------------------------------------------------
    command = "python bench/toy_zoo.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# The toy model zoo: what the default run shows, and its time",
        "",
        f"Command: `{command.strip()}` (config `{os.path.relpath(configfile, root)}`, "
        f"snakemake --cores {args.cores} in a fresh clone of {git_head()}).",
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
        f"| zoo training in the run ({len(targets)} models) | {zoo_s:.0f} | {zoo_s / 60:.1f} |",
        f"| **the default run** (cells, tables, report) | **{full_s:.0f}** | "
        f"**{full_s / 60:.1f}** |",
    ]
    if tasks_s is not None:
        lines.append(
            f"| then the tasks overlay `{args.tasks}` (its cells, report) | {tasks_s:.0f} | "
            f"{tasks_s / 60:.1f} |"
        )
    lines += [
        "",
        "The models (seconds inside each training run, from its `ropelens_train.json`):",
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
        lines += ["", *task_figures(root, model)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}; work directory {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

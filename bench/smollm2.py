"""Run the SmolLM2 grid (configs/smollm2.yaml) and write what the real model shows (issue 13).

    python bench/smollm2.py --cores 2 --workdir /tmp/bench_smollm2 --out bench/results/smollm2.md
    python bench/smollm2.py --figures-only --workdir DIR --out -    # figures of a finished run

1. ``snakemake --cores N --configfile CONFIG`` offline (``HF_HUB_OFFLINE=1``) in a fresh work
   directory: wall time (goal for the short grid: <= 20 min on 2 cores), load average before/after.
2. From the run's tables and cells: PPL per method and length; the JS table against RoPE at the
   pretrained length and, per length, against RoPE at the same length (what a method changes
   where the model needs no help); attention-sink mass per method and layer group; needle pass
   rate and mean entropy; wall time per cell (load + compute, from the cells' metadata).

Writes a Markdown report (``--out``; ``-`` for stdout) with the command, the machine, every number.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def run_grid(args) -> list[str]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe) if exe.exists() else "snakemake", "-s", str(REPO / "Snakefile")]
    cmd += ["--directory", str(work), "--configfile", str(REPO / args.config)]
    cmd += ["--cores", str(args.cores)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if proc.returncode:
        sys.exit(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [
        f"Command: `{shlex.join(cmd)}` (HF_HUB_OFFLINE=1)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        f"; load average before {before}, after {after}",
        "",
        f"**Wall time of the whole grid: {wall:,.0f} s ({wall / 60:.1f} min)**",
    ]


def js_same_length(cell_paths, reference: str):
    """Mean over layers of JS(method at L, reference at the same L), head-averaged k/L
    distributions: ``ropelens.distributions.js_table`` with ``{method, length: same}``."""
    from ropelens.distributions import js_table

    table = js_table(cell_paths, {"method": reference, "length": "same"}).to_pandas()
    mean = table[(table.layer == "mean") & (table.coordinates == "position")]
    return {(r.method, int(r.length)): float(r.js_head_averaged) for r in mean.itertuples()}


def figures(work: Path, reference: str = "rope") -> list[str]:
    import pandas as pd
    import pyarrow.parquet as pq

    from ropelens.provenance import stage_times

    tables = work / "results/tables"
    out = ["", "### Perplexity (stdlib, truncate)", "", (tables / "ppl.md").read_text()]
    out += ["### JS divergence vs RoPE at the pretrained length", ""]
    out.append((tables / "attention_js.md").read_text())
    same = js_same_length(sorted((work / "results/attention").rglob("*.parquet")), reference)
    frame = pd.Series(same).unstack()
    out += [f"### JS divergence vs {reference} at the same length (mean over layers)", ""]
    out.append(frame.to_markdown(floatfmt=".4f"))
    sinks = pq.read_table(tables / "sinks_layers.parquet").to_pandas()
    sinks = sinks[sinks.layer != "mean"].assign(layer=lambda d: d.layer.astype(int))
    groups = pd.cut(sinks.layer, [-1, 11, 29], labels=["layers 0-11", "layers 12-29"])
    pivot = sinks.groupby(["method", "length", groups], observed=True)["sink_mass"].mean()
    out += ["", "### Attention-sink mass (keys [0, 4)), head mean, by layer group", ""]
    out.append(pivot.unstack().to_markdown(floatfmt=".3f"))
    out += ["", "### Needle (chat format)", "", (tables / "needle.md").read_text()]
    times = pd.DataFrame(stage_times(work / "results"))
    out += ["", "### Wall time per cell kind (summed from cell metadata)", ""]
    times["per cell s"] = times["total_s"] / times["items"]
    out.append(times.to_markdown(index=False, floatfmt=".1f"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smollm2.yaml")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="-")
    p.add_argument("--figures-only", action="store_true", help="read a finished run")
    args = p.parse_args()
    lines = [f"# SmolLM2-135M-Instruct: {args.config}", ""]
    if not args.figures_only:
        lines += run_grid(args)
    lines += figures(Path(args.workdir))
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""Per-cell overhead (process start + model load) against the cell's compute, on the toy model.

python bench/cell_overhead.py --lengths 256 1024 4096 --repeats 3

Builds the default config's toy model (config.yaml, first model) and its tokens in a temporary
folder, then runs each cell command exactly as the rules do (`python -m ropelens ppl|attention
...`) and splits its wall time with the timings the cell records in its Parquet metadata:

* load    = ``ropelens.load_seconds`` (tokenizer + config + weights; includes importing
            transformers' model code)
* compute = ``ropelens.compute_seconds`` (the measurement itself)
* start   = wall - load - compute (interpreter, imports of torch/pyarrow, reading tokens,
            writing the cell)

Overhead = start + load: what every cell pays once, however small; it is what bundling cells
into group jobs cannot remove (each cell is still its own process) but what makes one cell per
Slurm job wasteful.

--warm runs the same commands through a warm runner (ROPELENS_RUNNER, docs/runner.md), started
and given the model by one untimed cell first: start is then the client's interpreter, the fork
and the cell's own reading and writing; load is ~0 (the runner holds the model).

--snakemake runs the cells as Snakemake runs them (--cores 1, one after the other), cold and then
warm (runtime.warm), in one work folder: a cell's wall time is the gap between its Parquet file's
mtime and the previous cell's (so Snakemake's own per-job work counts), its overhead that wall
minus its compute; the table gives the median over the cells after the first of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ropelens import config as rlconfig  # noqa: E402


def run(cmd: list[str], **kwargs) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ...: {proc.stderr.strip().splitlines()[-1]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rules", nargs="+", default=["ppl", "attention"])
    p.add_argument("--warm", action="store_true", help="through a warm runner (docs/runner.md)")
    p.add_argument(
        "--snakemake", action="store_true", help="as Snakemake runs them: cold, then warm"
    )
    args = p.parse_args()

    import pyarrow.parquet as pq

    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    name, model = next(iter(raw["models"].items()))
    tiny = model.get("tiny") or {"hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2}
    raw["models"] = {name: {"tiny": tiny, "pretrained_length": model["pretrained_length"]}}
    raw["methods"] = {"rope": {}}
    raw["lengths"] = sorted(set(args.lengths) | {model["pretrained_length"]})
    raw.pop("attention", None)
    raw.pop("needle", None)
    cfg = rlconfig.prepare(raw, REPO)
    if args.snakemake:
        return through_snakemake(raw, args)
    py = [sys.executable, "-m", "ropelens"]
    env_src = str(REPO / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join([env_src, os.environ.get("PYTHONPATH", "")])
    os.environ["OMP_NUM_THREADS"] = "1"  # as Snakemake sets it for a 1-thread job
    for key in [k for k in os.environ if k.startswith("ROPELENS_RUNNER")]:
        del os.environ[key]
    if args.warm:
        sock = tempfile.mkdtemp(prefix="rl-", dir="/tmp") + "/r.sock"
        os.environ.update(ROPELENS_RUNNER=sock, ROPELENS_RUNNER_OWNER=str(os.getpid()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        run(
            [
                *py,
                "make-tiny",
                "--out",
                str(model_dir),
                "--pretrained-length",
                str(model["pretrained_length"]),
                "--spec",
                json.dumps(tiny),
            ]
        )
        corpus = cfg["ppl"]["corpus"]
        run([*py, "corpus", "--spec", json.dumps(cfg["corpora"][corpus]), "--out", str(tmp / "c")])
        tokens = tmp / "tokens.parquet"
        source = json.dumps({"path": str(model_dir)})
        run([*py, "tokenize", "--corpus", str(tmp / "c"), "--source", source, "--out", str(tokens)])
        spec = rlconfig.cell_spec(cfg, name, "rope")
        spec["source"] = {"path": str(model_dir)}
        mode = "warm runner" if args.warm else "cold processes"
        print(
            f"toy model `{name}`: {json.dumps(tiny)}; threads 1; {mode}; median of {args.repeats}"
        )
        print()
        print("| cell | length | wall s | start s | load s | compute s | overhead / compute |")
        print("|---|---|---|---|---|---|---|")
        first = True
        for rule in args.rules:
            settings = rlconfig.cell_settings(cfg, rule) if rule != "ppl" else cfg["ppl"]
            for length in args.lengths:
                rows = []
                for i in range(args.repeats):
                    out = tmp / f"{rule}-{length}-{i}.parquet"
                    cmd = [*py, rule, "--spec", json.dumps(spec), "--settings"]
                    cmd += [json.dumps(settings), "--tokens", str(tokens)]
                    cmd += ["--length", str(length), "--threads", "1", "--out", str(out)]
                    if args.warm and first:  # start the runner, load the model: not timed
                        run(cmd, cwd=tmp)
                        first = False
                    wall = run(cmd, cwd=tmp)
                    meta = pq.read_schema(out).metadata
                    load = float(meta[b"ropelens.load_seconds"])
                    compute = float(meta[b"ropelens.compute_seconds"])
                    rows.append((wall, wall - load - compute, load, compute))
                wall, start, load, compute = (statistics.median(c) for c in zip(*rows))
                ratio = (start + load) / compute if compute > 0 else float("inf")
                print(
                    f"| {rule} | {length} | {wall:.2f} | {start:.2f} | {load:.2f} | "
                    f"{compute:.3f} | {ratio:.1f}× |"
                )
        if args.warm:
            from ropelens import runner_client

            runner_client.stop(os.environ["ROPELENS_RUNNER"])


def through_snakemake(raw: dict, args) -> None:
    """Per-cell overhead of the rules' own jobs, --cores 1, cold then warm, in one work folder."""
    import pyarrow.parquet as pq

    exe = str(Path(sys.executable).with_name("snakemake"))
    short = [min(raw["lengths"])]
    raw = {**raw, "attention": {"lengths": raw["lengths"]}, "needle": {"lengths": short}}
    raw["depths"] = [50]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        smk = [exe, "-s", str(REPO / "Snakefile"), "--directory", str(tmp), "--cores", "1"]
        for warm in (False, True):
            cfg = {**raw, "runtime": {**raw.get("runtime", {}), "warm": warm}}
            (tmp / f"warm={warm}.yaml").write_text(yaml.safe_dump(cfg))
        subprocess.run(
            [*smk, "--configfile", str(tmp / "warm=True.yaml")], check=True, capture_output=True
        )
        cells = sorted(
            p.relative_to(tmp).as_posix()
            for rule in args.rules
            for p in (tmp / "results" / rule).rglob("*.parquet")
        )
        print(f"{len(cells)} cells ({', '.join(args.rules)}; lengths {raw['lengths']}); --cores 1")
        print()
        print("| mode | cells | median wall s | median compute s | median overhead s | total s |")
        print("|---|---|---|---|---|---|")
        for warm in (False, True):
            rows = []
            for _ in range(args.repeats):
                for cell in cells:
                    (tmp / cell).unlink()
                cmd = [*smk, *cells, "--configfile", str(tmp / f"warm={warm}.yaml")]
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"snakemake failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                total = time.time() - t0
                ends = sorted(((tmp / c).stat().st_mtime, c) for c in cells)
                for (prev, _), (end, cell) in zip(ends, ends[1:]):
                    meta = pq.read_schema(tmp / cell).metadata
                    compute = float(meta[b"ropelens.compute_seconds"])
                    rows.append((end - prev, compute, end - prev - compute))
            wall, compute, overhead = (statistics.median(c) for c in zip(*rows))
            print(
                f"| {'warm' if warm else 'cold'} | {len(cells)} | {wall:.2f} | {compute:.3f} | "
                f"{overhead:.2f} | {total:.1f} (last repeat) |"
            )


if __name__ == "__main__":
    main()

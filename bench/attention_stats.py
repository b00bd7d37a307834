"""Cost of streamed attention statistics: SDPA vs ropelens_stats vs eager output_attentions.

LLaMA with random weights (a toy by default; any shape by flags), one forward over random tokens.
Seconds: SDPA and stats forwards alternate in one process (so a busy spell on a shared machine hits
both alike), min over repeats; eager is timed in its own process. Peak memory, as the increase over
the state before the forward: on CPU one fresh process per mode (peak RSS); on CUDA
torch.cuda.max_memory_allocated, reset before each forward of the timing process.

    PYTHONPATH=src python bench/attention_stats.py --lengths 2048 4096 8192 --threads 2
    PYTHONPATH=src python bench/attention_stats.py --device cuda --dtype bfloat16 --hidden 4096 \
        --intermediate 11008 --layers 32 --heads 32 --kv-heads 32 --vocab 32000 --lengths 32768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="timed forwards per mode (min)")
    ap.add_argument("--budget-bytes", type=int, default=256 * 2**20, help="StatsSpec budget")
    ap.add_argument(
        "--query-fraction",
        type=float,
        default=1.0,
        help="counted queries: the last int(L * F) (StatsSpec.query_start = L - int(L * F))",
    )
    ap.add_argument(
        "--eager-max-bytes",
        type=float,
        default=8 * 2**30,
        help="skip eager where L*L*heads*layers*batch*itemsize (returned attentions) exceeds this",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    ap.add_argument("--out", help="also write the Markdown report here")
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "LENGTH"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def cpu_pressure() -> str:
    """Share of the last 60 s in which runnable tasks waited for a CPU (Linux PSI), if known."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[2].split("=")[1] + "%"
    except (OSError, IndexError):
        return "?"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args, job: str, length: int) -> dict:
    """job: 'time' (SDPA and stats alternating), or a mode ('sdpa', 'stats', 'eager') whose peak
    memory is measured over one forward (eager: also timed, repeat forwards)."""
    sys.path.insert(0, SRC)
    import pyarrow  # noqa: F401  (imported by table(); keep it out of the measured peak)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ropelens.attention import StatsSpec, record_attention

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(length, 2048),
        attn_implementation="eager" if job == "eager" else "sdpa",
    )
    torch.manual_seed(0)
    if cuda:  # built in place: a 7B-shaped model would take minutes to initialise on the CPU
        torch.set_default_dtype(getattr(torch, args.dtype))
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    else:
        model = LlamaForCausalLM(cfg).eval().to(dtype=getattr(torch, args.dtype))
    ids = torch.randint(0, args.vocab, (args.batch, length), device=args.device)
    spec = StatsSpec(
        spans=[(length // 2, length // 2 + 16)],
        query_start=length - int(length * args.query_fraction),
        memory_budget_bytes=args.budget_bytes,
    )

    def forward(mode):
        if mode == "stats":
            with record_attention(model, spec) as rec:
                model(ids, logits_to_keep=1)
            rec.table()
        elif mode == "eager":
            out = model(ids, logits_to_keep=1, output_attentions=True)
            assert out.attentions[-1].shape[-1] == length
        else:
            model(ids, logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()

    peaks = {}

    def timed(mode):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        forward(mode)
        seconds = time.perf_counter() - t0
        if cuda:
            peaks[mode] = max(peaks.get(mode, 0), torch.cuda.max_memory_allocated() - base)
        return seconds

    with torch.no_grad():
        if job == "time":
            best = {"sdpa": float("inf"), "stats": float("inf")}
            for i in range(1 + args.repeat):  # first round: warm-up
                for mode in best:
                    t = timed(mode)
                    if i:
                        best[mode] = min(best[mode], t)
            if cuda:
                return {"seconds": best, "peak_bytes": peaks, "gpu": torch.cuda.get_device_name()}
            return {"seconds": best}
        # one short forward of the same mode first: loads what is loaded once per process (the
        # compiled row kernel of the statistics, SDPA's and eager's code paths), not per length
        warm = ids[:, :64]
        if job == "stats":
            # the timed forwards past the first few run with the CPU row kernel loaded (a process
            # loads it once its statistics work reaches CPU_KERNEL_MIN_WORK): load it here too
            from ropelens import attention

            if not cuda:
                attention._row_kernel(attention.CPU_KERNEL_MIN_WORK)
            with record_attention(model, StatsSpec()):
                model(warm, logits_to_keep=1)
        else:
            model(warm, logits_to_keep=1, output_attentions=job == "eager")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
        times = [timed(job) for _ in range(1 + (args.repeat if job == "eager" else 0))]
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": min(times[1:] or times), "peak_bytes": peak - base, "base_bytes": base}


def run_worker(args, argv: list[str], job: str, length: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", job, str(length)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {args.timeout:.0f} s"}
    if r.returncode < 0:
        return {"error": f"killed by signal {-r.returncode} (out of memory?)"}
    if r.returncode != 0:
        lines = (r.stderr or "").strip().splitlines()
        return {"error": lines[-1][:80] if lines else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def eager_bytes(args, length: int) -> int:
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    return length * length * args.heads * args.layers * args.batch * itemsize


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def report(args, argv, rows, base, gpu) -> str:
    import torch

    bench = "bench/attention_stats.py"
    if args.device == "cuda":
        where = f"{gpu or 'cuda'}"
        peak = (
            "Peak: torch.cuda.max_memory_allocated over a forward minus the allocation before it "
            "(weights excluded), max over that mode's forwards in the timing process."
        )
    else:
        where = f"cpu, {args.threads} threads"
        peak = (
            "Peak: increase of peak RSS over the state before the forward, one fresh process per "
            f"mode, after a 64-token forward of that mode (process baseline {mib(base or 0)} MiB)."
        )
    lines = [
        f"Command: `PYTHONPATH=src python {shlex.join([bench, *argv])}`",
        "",
        f"Model: LLaMA, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"{args.kv_heads} kv heads, intermediate {args.intermediate}, vocab {args.vocab}, random "
        f"weights, {args.dtype}, batch {args.batch}, {where}, torch {torch.__version__}. "
        f"Statistics over the last {args.query_fraction:g} of the queries (StatsSpec.query_start "
        f"= L - int(L * fraction)), memory budget {mib(args.budget_bytes)} MiB. Seconds: one "
        f"forward, min of {args.repeat} after a warm-up; SDPA and stats alternate in one process, "
        f"eager runs in its own. {peak} CPU wait: Linux PSI cpu some avg60 before / after the "
        "SDPA and stats measurements of that length (other jobs competing for the cores).",
        "",
        "| L | SDPA s | stats s | stats / SDPA | eager s | SDPA peak MiB | stats peak MiB "
        "| eager peak MiB | CPU wait |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, args.worker[0], int(args.worker[1]))))
        return
    rows, base, gpu = [], None, None
    for length in args.lengths:
        busy = cpu_pressure()
        res = {"time": run_worker(args, argv, "time", length)}
        if args.device == "cuda":  # peaks come from the timing process
            for mode in ("sdpa", "stats"):
                peak = res["time"].get("peak_bytes", {}).get(mode)
                res[mode] = {"peak_bytes": peak} if peak is not None else {}
        else:
            res.update({job: run_worker(args, argv, job, length) for job in ("sdpa", "stats")})
        busy += " / " + cpu_pressure()
        est = eager_bytes(args, length)
        if est > args.eager_max_bytes:
            res["eager"] = {"error": f"skipped: attentions {est / 2**30:.1f} GiB > limit"}
        else:
            res["eager"] = run_worker(args, argv, "eager", length)
        print(f"# L={length}: {res}", file=sys.stderr, flush=True)
        base = base or res["sdpa"].get("base_bytes")
        gpu = gpu or res["time"].get("gpu")
        t = res["time"].get("seconds")
        err = res["time"].get("error", "-")
        sdpa, stats = (f"{t[m]:.2f}" if t else err for m in ("sdpa", "stats"))
        ratio = f"{t['stats'] / t['sdpa']:.2f}x" if t else "-"
        e = res["eager"]
        eager = f"{e['seconds']:.2f}" if "seconds" in e else e["error"]
        peaks = [res[m].get("peak_bytes") for m in ("sdpa", "stats", "eager")]
        peaks = " | ".join("-" if p is None else mib(p) for p in peaks)
        rows.append(f"| {length} | {sdpa} | {stats} | {ratio} | {eager} | {peaks} | {busy} |")
        print(rows[-1], flush=True)
        if args.out:  # after every length, so that a run cut short keeps its rows
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                f.write(report(args, argv, rows, base, gpu))

    text = report(args, argv, rows, base, gpu)
    print()
    print(text)


if __name__ == "__main__":
    main()

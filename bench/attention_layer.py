"""One attention layer: fused SDPA vs the statistics function, its CPU row kernel vs torch ops.

Random q, k, v in the shape of bench/attention_stats.py's toy (8 heads of dim 32, 2 kv heads),
one causal call with every query counted. The three modes alternate in one process (so a busy
spell hits all alike); seconds and process CPU seconds (all threads) are the min over repeats.

    PYTHONPATH=src python bench/attention_layer.py --length 8192 --threads 2
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from ropelens import attention as att


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", help="also write the Markdown report here")
    return ap.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    L, H, Hkv, D = args.length, args.heads, args.kv_heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, L, D, generator=g) for n in (H, Hkv, Hkv))
    kr, vr = (t.repeat_interleave(H // Hkv, 1) for t in (k, v))
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, True
    spec = att.StatsSpec(spans=[(L // 2, L // 2 + 16)])

    def stats(kernel):
        def run():
            rec = att.AttentionRecorder(spec)
            att._ACTIVE = rec
            # the row kernel from the first call (else loaded once work adds up)
            try:
                with att.use_paths(row_kernel=kernel, row_kernel_min_work=0):
                    att.stats_attention_forward(module, q, k, v, None, scaling=D**-0.5)
            finally:
                att._ACTIVE = None
            return rec

        return run

    modes = {
        "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True),
        "stats, row kernel": stats(True),
        "stats, torch ops": stats(False),
    }
    best = {m: (float("inf"), float("inf")) for m in modes}
    with torch.no_grad():
        for i in range(1 + args.repeat):  # first round: warm-up (and the kernel's compilation)
            for name, fn in modes.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                t, c = time.perf_counter() - t0, time.process_time() - c0
                if i:
                    best[name] = (min(best[name][0], t), min(best[name][1], c))
    sdpa = best["SDPA"][0]
    rows = [f"| {name} | {t:.3f} | {c:.3f} | {t / sdpa:.2f}x |" for name, (t, c) in best.items()]
    report = "\n".join(
        [
            f"Command: `PYTHONPATH=src python {shlex.join(['bench/attention_layer.py', *argv])}`",
            "",
            f"One causal attention call, {L} queries and keys, {H} heads of dim {D}, {Hkv} kv "
            f"heads, fp32, {args.threads} threads, torch {torch.__version__}; every query "
            f"counted. Min of {args.repeat} after a warm-up, modes alternating.",
            "",
            "| mode | seconds | CPU seconds | / SDPA |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()

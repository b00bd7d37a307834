"""Attention with streamed statistics: the model's own output, plus per-(layer, head) summaries.

The registered attention function processes queries in chunks, so no (queries x keys x heads)
tensor is ever built: peak extra memory is O(chunk x keys x heads), with the chunk size derived from
a byte budget. Per chunk it computes fp32 logits and softmax once, takes the layer output from those
probabilities and reduces them to:

- entropy (nats) of each query's distribution over keys, via H = lse - sum(p * s);
- mass per bin of normalised key position k / Lk, per log-spaced distance bin of d = q - k,
  and per key span, all read from prefix sums S(b) = sum_{k<b} p_k at the bin boundaries. The
  masses are linear in S, so a call sums S over its counted queries and converts once.

On CPU one compiled pass per probability row (``ropelens.rowstats``, numba) gives sum(p * s), the
maxima and the prefix sums, once the process has done enough statistics work to repay loading it
(CPU_KERNEL_MIN_WORK); before that, and on other devices, torch operations do (key-block sums plus
gathered partial blocks).

Positions are absolute: the keys of a call are the Lk positions that end at its last query, and
query i sits at key slot Lk - Lq + i. The first query's position is the number of tokens the layer's
cache saw before the call (read by record_attention's hook on the attention module; without one,
the position RoPE was given, ``position_ids``). So a sliding-window (or chunked) cache, which holds
only the window's keys, is placed where its keys are: every answering query of a decoding step
counts, and spans, position bins (k / keys so far) and ``query_start`` mean the same on sliding and
full layers. Where neither is known, or they put the last query before slot Lk - 1 (left padding),
positions are key slots (left padding included).
Queries without any visible key (padding) are not counted. Keys after the query (non-causal masks)
are in no distance bin. Inference only (no autograd through the output).

Attention-side methods (``ropelens.positions``: ReRoPE, Self-Extend, STRING) live here too: on a
module that carries a position map, each chunk's logits of (query, key) pairs at least the method's
window apart come from the queries and keys further rotated to the method's positions, in every
call — recording or not, so PPL, attention and needle cells all see the method (outside
record_attention the chunks give the output and no statistics are kept).

Soft-capped logits (Gemma2: s = cap * tanh(s / cap), before the mask) are capped here too, so the
statistics see what the model's softmax sees. Outside record_attention the function is the model's
own attention: SDPA, or its modeling file's eager attention where the model has no SDPA or asks for
soft-capping. What it cannot compute exactly (attention sinks, position biases, packed sequences)
is refused in one line naming the module and the argument, never silently ignored.

On CPU with several torch threads, the chunks run on a pool of Python threads with single-threaded
ops: faster than intra-op threading for these many mid-sized ops, and far more robust on a busy
machine. Chunks are cache-sized on CPU (CPU_CHUNK_BYTES in all), within the budget everywhere.

Fast path: in a causal prefill without mask (queries and keys both at positions 0..L-1), the leading
queries before ``StatsSpec.query_start`` need only the keys before them and are not counted, so
their output comes from the fused SDPA kernel on that prefix (exact, in the input dtype); only the
counted queries go through the statistics chunks.

The function is written in stages, as transformers writes its attention functions: the checks,
a pure boundary plan (``bin_plan``: where each query's prefix sums are read and how they become
masses; ``chunk_plan``: which queries each chunk covers, on how many workers), the fast prefix, a
per-call record (``_Call``) that the module-level chunk function reads, and the fold into the
layer's accumulators. How it computes (the fast prefix, the row kernel, the key block width, TF32)
is a ``Paths`` setting, changed inside ``with use_paths(...)``; none changes what it computes.

CUDA with bf16/fp16 inputs: the chunk matmuls run on TF32 tensor cores. Half-precision values are
exact in TF32, so Q K^T (scaled afterwards, in fp32) has exact products accumulated in fp32, as in
plain fp32; P V rounds P to TF32's 10-bit mantissa, no coarser than the half-precision output it
feeds. The statistics always come from the fp32 probabilities. fp32 inputs keep fp32 matmuls.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache, partial

import numpy as np
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ropelens import positions as moves
from ropelens.errors import RopelensError

ATTN_IMPLEMENTATION = "ropelens_stats"
BLOCK = 32  # key block width for the prefix sums (partial blocks are gathered)
CPU_CHUNK_BYTES = 16 * 2**20  # CPU chunks' logits + probabilities: cache-sized is much faster
# Loading the kernel (numba import + cached machine code) costs ~0.4 s per process and it saves
# ~1.3 ns per (query, key, head) element over the torch operations. So a process runs its calls
# with torch operations until their work adds up to about what the load costs (rent, then buy:
# never more than twice the better choice in hindsight), then loads the kernel for good.
CPU_KERNEL_MIN_WORK = 2**28
_rowstats = None  # ropelens.rowstats once loaded
_work = 0  # statistics work of this process's CPU calls so far


class UnsupportedAttention(RopelensError, NotImplementedError):
    """What the statistics attention cannot compute exactly: one line naming the module and why."""


@dataclass
class StatsSpec:
    """What to record. Spans are key-position ranges [start, end)."""

    position_bins: int = 16
    distance_bins: int = 20
    spans: Sequence[tuple[int, int]] = ()
    query_start: int = 0  # only queries at absolute position >= query_start are counted
    memory_budget_bytes: int = 256 * 2**20


class AttentionRecorder:
    """Per-layer accumulators (fp64, on the attention's device); ``table()`` summarises them.

    ``sums`` columns, summed over counted queries: count, entropy, position bins, distance bins,
    spans.
    """

    def __init__(self, spec: StatsSpec | None = None):
        self.spec = spec or StatsSpec()
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.calls = 0
        self.chunks = 0
        self.fast_queries = 0  # queries (per batch item) whose output came from fused SDPA
        self.open: dict[int, int] = {}  # attention modules inside their forward: calls so far

    def _acc(self, layer: int, heads: int, device: torch.device) -> dict[str, torch.Tensor]:
        if layer not in self.layers:
            s = self.spec
            width = 2 + s.position_bins + s.distance_bins + len(s.spans)
            kw = dict(dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
            self.layers[layer] = {
                "sums": torch.zeros(heads, width, **kw),
                "entropy_last": torch.full((heads,), float("nan"), **kw),
            }
        return self.layers[layer]

    def table(self):
        """One row per (layer, head); means over the counted queries (NaN where none)."""
        import pyarrow as pa

        s = self.spec
        cuts = np.cumsum([1, 1, s.position_bins, s.distance_bins])
        cols = {k: [] for k in ("layer", "head", "n_queries", "entropy_mean", "entropy_last")}
        lists = {"pos_mass": [], "dist_mass": [], "span_mass": []}
        for layer in sorted(self.layers):
            a = {k: v.detach().double().cpu().numpy() for k, v in self.layers[layer].items()}
            n = a["sums"][:, 0]
            with np.errstate(invalid="ignore", divide="ignore"):
                means = a["sums"] / np.where(n > 0, n, np.nan)[:, None]
            for h in range(len(n)):
                _, ent, pos, dist, span = np.split(means[h], cuts)
                cols["layer"].append(layer)
                cols["head"].append(h)
                cols["n_queries"].append(int(round(n[h])))
                cols["entropy_mean"].append(float(ent[0]))
                cols["entropy_last"].append(float(a["entropy_last"][h]))
                lists["pos_mass"].append(pos.tolist())
                lists["dist_mass"].append(dist.tolist())
                lists["span_mass"].append(span.tolist())
        f64 = pa.list_(pa.float64())
        schema = pa.schema(
            [
                ("layer", pa.int32()),
                ("head", pa.int32()),
                ("n_queries", pa.int64()),
                ("entropy_mean", pa.float64()),
                ("entropy_last", pa.float64()),
                ("pos_mass", f64),
                ("dist_mass", f64),
                ("span_mass", f64),
            ]
        )
        return pa.table({**cols, **lists}, schema=schema)


_ACTIVE: AttentionRecorder | None = None


@dataclass(frozen=True)
class Paths:
    """How the statistics attention computes, never what: every choice gives the same output and
    statistics (up to the fp32 rounding of sums taken in another order). The defaults are the fast
    ones; tests and benchmarks pick others inside :func:`use_paths`, as
    ``torch.nn.attention.sdpa_kernel`` picks SDPA's backends."""

    fast_prefix: bool = True  # uncounted leading queries of a causal unmasked prefill: fused SDPA
    row_kernel: bool = True  # CPU chunks reduce rows with ropelens.rowstats (else torch operations)
    row_kernel_min_work: int = CPU_KERNEL_MIN_WORK  # this process's work before it loads the kernel
    block: int = BLOCK  # key block width of the torch operations' prefix sums
    tf32: bool | None = None  # unscaled-q matmuls under TF32, logits scaled after (None: if exact)


_PATHS = Paths()


@contextmanager
def use_paths(**choices):
    """Inside the block the statistics attention computes by these ``Paths`` fields (the others as
    outside it); restored on exit. Yields the paths in force."""
    global _PATHS
    prev = _PATHS
    _PATHS = replace(prev, **choices)
    try:
        yield _PATHS
    finally:
        _PATHS = prev


def chunk_rows(
    spec: StatsSpec, batch: int, heads: int, keys: int, workers: int = 1, cpu: bool = False
) -> int:
    """Queries per chunk: all workers' chunks fit the memory budget; on CPU, also the cache."""
    n_bounds = spec.position_bins + 2 * len(spec.spans) + spec.distance_bins + 1
    # logits + probabilities (fp32), mask bits, prefix sums or gathered partial blocks
    per_row = batch * heads * (13 * keys + 8 * n_bounds)
    rows = max(1, spec.memory_budget_bytes // (per_row * workers))
    if cpu:  # all workers' logits + probabilities within CPU_CHUNK_BYTES, >= 16 rows each
        rows = min(rows, max(16, CPU_CHUNK_BYTES // (8 * batch * heads * keys * workers)))
    return rows


def chunk_plan(
    spec: StatsSpec, batch: int, heads: int, queries: int, keys: int, first: int, threads: int,
    cpu: bool,
) -> tuple[range, int, int]:  # fmt: skip
    """The chunks of a call's counted queries [first, queries): their starts, the rows of each
    and the worker threads that run them. On CPU with several torch threads, chunks run on a pool
    of that many Python threads with single-threaded ops, which beats intra-op threading here
    (many mid-sized ops, each its own parallel region), above all on busy machines."""
    workers = threads if cpu and queries - first > 1 else 1
    rows = 1
    if first < queries:
        rows = min(queries - first, chunk_rows(spec, batch, heads, keys, workers, cpu))
    starts = range(first, queries, rows)
    return starts, rows, min(workers, len(starts))


@dataclass(frozen=True)
class BinPlan:
    """Where a call reads each query's prefix sums S(c) = sum_{k<c} p_k, and how their sums over
    the counted queries become masses: S(bounds) @ diff + count * const, in the columns position
    bins, distance bins, spans (the spec's orders)."""

    slots: torch.Tensor  # (Lq,) key slot of each query: Lk - Lq + i
    counted: torch.Tensor  # (Lq,) bool: the query's absolute position is >= spec.query_start
    bounds: torch.Tensor  # (Lq, boundaries) int64 key slots c, read clamped to a chunk's keys
    diff: torch.Tensor  # (boundaries, masses) float32, on the CPU
    const: torch.Tensor  # (masses,) float32, on the CPU: S(Lk) = 1 of the last position bin


def bin_plan(spec: StatsSpec, queries: int, keys: int, koff: int, device=None) -> BinPlan:
    """The boundary plan of a call of ``queries`` over ``keys`` whose key slot 0 sits at absolute
    position ``koff`` (pure: a function of its arguments).

    Masses are differences of S taken at boundaries c = base (+ the query's slot for distance
    bins). S(0) = 0 and S(Lk) = 1 are constants, so position edges 0 and Lk and lags >= Lk are not
    read. Position edges and spans are absolute, converted to key slots (a sliding cache's keys
    start at koff: edges before it have S = 0); distances are the same in slots."""
    nb_pos, nb_dist = spec.position_bins, spec.distance_bins
    lags = [0] + [2**i for i in range(nb_dist - 1)]
    lags = [lag for lag in lags if lag < keys]
    total = koff + keys  # keys 0..total-1 in absolute positions, the window's last Lk in the cache
    base = [(b * total + nb_pos - 1) // nb_pos - koff for b in range(1, nb_pos)]
    base += [int(c) - koff for span in spec.spans for c in span]
    base = [min(max(c, 0), keys) for c in base]
    n_fixed = len(base)
    base += [1 - lag for lag in lags]
    diff, const = _mass_matrix(nb_pos, nb_dist, len(spec.spans), n_fixed, len(lags))
    per_query = torch.arange(len(base), device=device) >= n_fixed
    slots = torch.arange(keys - queries, keys, device=device)
    bounds = torch.tensor(base, device=device, dtype=torch.long) + slots[:, None] * per_query
    return BinPlan(slots, slots + koff >= spec.query_start, bounds, diff, const)


def _mass_matrix(nb_pos: int, nb_dist: int, n_span: int, n_fixed: int, n_lags: int):
    """(diff, const) of :class:`BinPlan` for boundaries [position edges 1..nb_pos-1, span starts
    and ends, then one per lag]."""
    diff = torch.zeros(n_fixed + n_lags, nb_pos + nb_dist + n_span)
    const = torch.zeros(nb_pos + nb_dist + n_span)
    for b in range(nb_pos):  # bin b = S(edge b+1) - S(edge b); edges 0 and Lk are constants
        if b < nb_pos - 1:
            diff[b, b] = 1
        else:
            const[b] = 1
        if b > 0:
            diff[b - 1, b] = -1
    for i in range(n_span):
        diff[nb_pos - 1 + 2 * i + 1, nb_pos + nb_dist + i] = 1
        diff[nb_pos - 1 + 2 * i, nb_pos + nb_dist + i] = -1
    for j in range(n_lags):  # bin j = S(q + 1 - lag j) - S(q + 1 - lag j+1)
        diff[n_fixed + j, nb_pos + j] = 1
        if j + 1 < n_lags:
            diff[n_fixed + j + 1, nb_pos + j] = -1
    return diff, const


@dataclass
class _Call:
    """One call as its chunks read it: the fp32 inputs (q scaled, unless the logits are scaled
    after the matmul), the mask as the model passed it, an attention-side method's far set, the
    plan on the call's device, and the output and per-thread buffers the chunks write."""

    q32: torch.Tensor  # (B, H, Lq, D)
    k32: torch.Tensor  # (B, Hkv, Lk, D)
    v32: torch.Tensor  # (B, Hkv, Lk, Dv)
    mask: torch.Tensor | None  # bool, or additive float
    far: moves.FarLogits | None
    is_causal: bool
    scaling: float
    scale_after: bool  # TF32 matmuls on unscaled q, logits scaled after
    softcap: float | None
    plan: BinPlan
    lane: torch.Tensor  # arange(block): lanes of a key block of the torch path's prefix sums
    kernel: tuple[np.ndarray, np.ndarray] | None  # the row kernel's sorted bounds and their order
    rows: int  # queries per chunk
    out: torch.Tensor  # (B, Lq, H, Dv) in the input dtype
    sums_dtype: torch.dtype
    buffers: threading.local = field(default_factory=threading.local)  # logits, probabilities

    @property
    def off(self) -> int:  # key slot of query 0
        return self.k32.shape[2] - self.q32.shape[2]


def stats_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: the model's own attention output (SDPA, or its eager
    attention where SDPA cannot do what it asks); inside record_attention also the statistics.
    Stages: checks, the boundary plan, the fast prefix, the call's record, its chunks, the fold."""
    rec = _ACTIVE
    _check_kwargs(module, kwargs)
    moved = getattr(module, moves.ATTR, None) is not None  # an attention-side method
    if rec is None and not moved:
        return _plain_attention(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    rec = rec or _silent_recorder()  # moved positions: the chunks' output, no statistics kept
    _check_inference(query, key, value, dropout)
    softcap = kwargs.get("softcap")
    past = _count_call(rec, module)  # tokens the layer's cache held before this call, if known
    paths, spec = _PATHS, rec.spec
    B, H, Lq, D = query.shape
    scaling = D**-0.5 if scaling is None else scaling
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None and is_causal and 1 < Lq < key.shape[2]:
        key, value = key[:, :, :Lq], value[:, :, :Lq]  # as SDPA: prefill into an empty static cache
    Lk = key.shape[2]
    _check_window(module, kwargs.get("sliding_window"), attention_mask, Lk)
    # absolute position of key slot 0: from the layer's cache where record_attention saw it, else
    # from the positions RoPE was given
    koff = _key_offset(kwargs.get("position_ids"), Lk) if past is None else max(past + Lq - Lk, 0)
    dev, f32 = query.device, torch.float32
    scale_after = _tf32_exact(query) if paths.tf32 is None else paths.tf32
    q32 = query.to(f32) if scale_after else query.to(f32) * scaling
    k32, v32 = key.to(f32), value.to(f32)
    acc = rec._acc(module.layer_idx, H, dev)
    rec.calls += 1
    far = moves.far_logits(module, q32, k32, koff)  # attention-side: the far q / k set
    plan = bin_plan(spec, Lq, Lk, koff, dev)

    out = torch.empty(B, Lq, H, value.shape[-1], dtype=query.dtype, device=dev)
    fast = _fast_queries(spec, paths, Lq, Lk, koff, is_causal, attention_mask, softcap, far)
    if fast:
        _fast_prefix(query, key, value, scaling, fast, out)
        rec.fast_queries += fast
    cpu = dev.type == "cpu"
    # CPU: the chunks' rows reduced by the compiled kernel, where its load is repaid
    work = B * H * _visible_keys(Lq, Lk, fast)
    kernel = cpu and paths.row_kernel and _row_kernel(work, paths.row_kernel_min_work)
    sort = None  # the kernel: boundaries in ascending order per query (it clamps them, in order)
    if kernel:
        sort = tuple(x.numpy() for x in torch.sort(plan.bounds, dim=-1, stable=True))
    starts, rows, workers = chunk_plan(spec, B, H, Lq, Lk, fast, torch.get_num_threads(), cpu)
    call = _Call(
        q32=q32, k32=k32, v32=v32, mask=attention_mask, far=far, is_causal=is_causal,
        scaling=scaling, scale_after=scale_after, softcap=softcap, plan=plan,
        lane=torch.arange(paths.block, device=dev), kernel=sort, rows=rows, out=out,
        sums_dtype=acc["sums"].dtype,
    )  # fmt: skip
    rec.chunks += len(starts)
    _fold(acc, _run_chunks(call, starts, workers), plan)
    return out, None


def _check_inference(query, key, value, dropout: float) -> None:
    """No autograd through the output, no dropout: the chunks compute neither."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError("ropelens_stats attention is inference-only: run under torch.no_grad()")
    if dropout > 0:
        raise UnsupportedAttention("ropelens_stats attention does not support dropout")


def _fast_queries(spec, paths, queries, keys, koff, is_causal, mask, softcap, far) -> int:
    """Leading queries whose output fused SDPA gives exactly and that need no statistics: with
    queries and keys both at positions 0..Lq-1, causal and unmasked, queries [0, fast) see only
    keys [0, fast); those before ``query_start`` are not counted (an attention-side method's far
    logits only from its window on). Masks, decoding steps and soft-capping keep the chunks."""
    if not (paths.fast_prefix and keys == queries and koff == 0 and is_causal and mask is None):
        return 0
    fast = 0 if softcap is not None else min(max(spec.query_start, 0), queries)
    return fast if far is None else min(fast, far.window)  # all their distances are < w


def _fast_prefix(query, key, value, scaling: float, fast: int, out: torch.Tensor) -> None:
    """Write the output of queries [0, fast) from fused SDPA on keys [0, fast) (the input dtype)."""
    g = query.shape[1] // key.shape[1]
    # GQA: repeat the kv heads (enable_gqa needs torch >= 2.5; pyproject allows 2.4)
    k_fast, v_fast = key[:, :, :fast], value[:, :, :fast]
    if g > 1:
        k_fast, v_fast = k_fast.repeat_interleave(g, 1), v_fast.repeat_interleave(g, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, :fast], k_fast, v_fast, is_causal=True, scale=scaling
    )
    out[:, :fast] = o.transpose(1, 2)


def _run_chunks(call: _Call, starts: range, workers: int) -> list:
    """Each chunk's sums, in order: on ``workers`` threads with single-threaded torch ops (CPU), or
    one after the other (under TF32 matmuls where the call scales its logits after them)."""
    if workers > 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(partial(_chunk, call), starts))
        finally:
            torch.set_num_threads(threads)
    with _tf32_matmuls(call.scale_after):
        return [_chunk(call, c0) for c0 in starts]


def _chunk(call: _Call, c0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend queries [c0, c0 + rows) of a call: write their output; return per-head sums of their
    [count, entropy, S(boundaries)...] and [count, entropy] of the call's last query."""
    c1 = min(call.q32.shape[2], c0 + call.rows)
    m, valid, sel, kend = _chunk_keys(call, c0, c1)
    s4, p4 = _chunk_attend(call, c0, c1, kend, m, valid)
    if call.kernel is not None:  # CPU: one compiled pass per row (ropelens.rowstats)
        return _rowstats.accumulate(s4, p4, *call.kernel, c0, sel)
    return _chunk_sums(call, c0, c1, kend, s4, p4, sel)


def _chunk_keys(call: _Call, c0: int, c1: int):
    """The keys queries [c0, c1) see, lying in [0, kend): (the mask's rows or None, whether each
    row sees any key or None, the counted rows (B, H, n), kend). Valid rows see at least one."""
    B, H = call.q32.shape[:2]
    sel, m, valid = call.plan.counted[c0:c1], None, None
    kend = call.off + c1 if call.is_causal else call.k32.shape[2]
    if call.mask is not None:
        m = call.mask[:, :, c0:c1]
        if m.dtype == torch.bool:
            seen = m.any(dim=(0, 1, 2)).nonzero()
            kend = int(seen[-1]) + 1 if len(seen) else 1
            m = m[..., :kend]
            valid = m.any(-1)
        else:
            kend = call.k32.shape[2]
            valid = (m > torch.finfo(m.dtype).min).any(-1)
        sel = sel & valid
    return m, valid, sel.expand(B, H, c1 - c0), kend


def _chunk_attend(call: _Call, c0: int, c1: int, kend: int, m, valid):
    """Logits (the far ones merged, scaled, capped, masked with the largest negative float, not
    -inf, so that 0 * s = 0 later) and probabilities of queries [c0, c1) over keys [0, kend), in
    this thread's buffers: write the queries' output; return both as (B, H, n, kend)."""
    B, H, _, D = call.q32.shape
    Hkv, Lk, n, f32 = *call.k32.shape[1:3], c1 - c0, torch.float32
    g, buf = H // Hkv, call.buffers
    if not hasattr(buf, "s"):  # one pair per worker thread
        buf.s = torch.empty(B * H * call.rows * Lk, dtype=f32, device=call.q32.device)
        buf.p = torch.empty_like(buf.s)
    qc = call.q32[:, :, c0:c1].reshape(B, Hkv, g * n, D)
    s = buf.s[: B * H * n * kend].view(B, Hkv, g * n, kend)
    torch.matmul(qc, call.k32[:, :, :kend].transpose(-1, -2), out=s)
    if call.far is not None:  # distances >= the window: logits of the further-rotated q / k
        call.far.merge(s, c0, c1, kend, H)
    if call.scale_after:
        s.mul_(call.scaling)
    if call.softcap is not None:  # the statistics see the capped logits, as the model's softmax
        s.div_(call.softcap).tanh_().mul_(call.softcap)
    s4, fmin = s.view(B, H, n, kend), torch.finfo(f32).min
    if m is None:
        first = call.off + c0 + 1  # key slot after query c0's: mask k > q in the trailing triangle
        if call.is_causal and first < kend:
            tri = torch.arange(first, kend, device=s.device) > call.plan.slots[c0:c1, None]
            s4[..., first:].masked_fill_(tri, fmin)
    elif m.dtype == torch.bool:
        s4.masked_fill_(~m, fmin)
    else:
        s4.add_(m.to(f32).clamp(min=fmin))
    p = buf.p[: B * H * n * kend].view(B, Hkv, g * n, kend)
    torch.softmax(s, -1, out=p)
    o = torch.matmul(p, call.v32[:, :, :kend]).view(B, H, n, -1)
    if m is not None and m.dtype == torch.bool:
        o = o.masked_fill(~valid[..., None], 0.0)  # SDPA returns 0 for fully masked rows
    call.out[:, c0:c1] = o.transpose(1, 2)
    return s4, p.view(B, H, n, kend)


def _chunk_sums(call: _Call, c0: int, c1: int, kend: int, s4, p4, sel):
    """The chunk's sums with torch operations (other devices; CPU before the row kernel): entropy
    lse - sum(p * s), with lse = max(s) - log max(p) (``s4`` is overwritten), and prefix sums at
    the boundaries from whole key blocks plus a gathered partial block."""
    B, H, n, _ = p4.shape
    ent = s4.amax(-1) - p4.amax(-1).log() - s4.mul_(p4).sum(-1)
    bnd, lane = call.plan.bounds[c0:c1].clamp(0, kend), call.lane
    block = lane.shape[0]
    if kend <= bnd.shape[1] * block:  # short rows: a plain cumulative sum is cheaper
        cum = torch.nn.functional.pad(p4.cumsum(-1), (1, 0))
        pre = cum.gather(-1, bnd.expand(B, H, n, -1))
    else:
        blk, rem = bnd // block, bnd % block
        nfull = kend // block
        bsum = p4[..., : nfull * block].unflatten(-1, (nfull, block)).sum(-1)
        cum = torch.nn.functional.pad(bsum.cumsum(-1), (1, 0))
        idx = (blk[..., None] * block + lane).clamp_(max=kend - 1).flatten(1)
        part = p4.gather(-1, idx.expand(B, H, n, -1)).unflatten(-1, (-1, block))
        pre = cum.gather(-1, blk.expand(B, H, n, -1)) + (part * (lane < rem[..., None])).sum(-1)
    stats = torch.cat([torch.ones_like(ent)[..., None], ent[..., None], pre], -1)
    stats = torch.where(sel[..., None], stats, 0.0).to(call.sums_dtype)
    return stats.sum((0, 2)), stats[:, :, -1, :2].sum(0)


def _fold(acc: dict, results: list, plan: BinPlan) -> None:
    """Add a call's chunk sums to its layer's accumulators: [count, entropy, S(boundaries)] sums,
    converted once to masses (they are linear in S); the last chunk holds the call's last query.
    Nothing when the fast prefix took every query (none counted)."""
    if not results:
        return
    tot = torch.stack([sums for sums, _ in results]).sum(0).to(acc["sums"])
    masses = tot[:, 2:] @ plan.diff.to(tot) + tot[:, :1] * plan.const.to(tot)
    acc["sums"] += torch.cat([tot[:, :2], masses], -1)
    cnt, last = results[-1][1].unbind(-1)
    acc["entropy_last"] = torch.where(cnt > 0, last / cnt.clamp(min=1), acc["entropy_last"])


# kwargs that models pass to attention functions and that change nothing here (None or False is
# always accepted: the feature is off); anything else is refused, never silently ignored
_HANDLED = {"position_ids", "sliding_window", "softcap"}
_IGNORED = {"use_cache", "output_attentions", "output_hidden_states", "output_router_logits"}
_IGNORED |= {"return_dict", "cache_position", "max_length_q", "max_length_k", "deterministic"}


def _check_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    """Refuse, in one line naming the module, what the statistics attention cannot do exactly
    (attention sinks, position biases, packed sequences, ...)."""
    for name, v in kwargs.items():
        if name in _HANDLED or name in _IGNORED or v is None or v is False:
            continue
        raise UnsupportedAttention(
            f"ropelens_stats attention cannot compute exactly what {type(module).__name__} asks "
            f"for: argument '{name}' is not supported"
        )


def _silent_recorder() -> AttentionRecorder:
    """A recorder that counts no query: the statistics path for its output alone (attention-side
    methods need its merged logits in every cell, PPL and decoding included)."""
    return AttentionRecorder(StatsSpec(position_bins=1, distance_bins=1, query_start=2**62))


def _check_window(module, window: int | None, mask: torch.Tensor | None, keys: int) -> None:
    """A sliding window lives in the mask transformers builds (it skips the mask only while every
    key is inside the window); without one, a window narrower than the keys would be dropped."""
    if window is not None and mask is None and keys > window:
        raise UnsupportedAttention(
            f"ropelens_stats attention: {type(module).__name__} has a sliding window of {window} "
            f"but no attention mask came with {keys} keys"
        )


def _key_offset(position_ids: torch.Tensor | None, keys: int) -> int:
    """Absolute position of key slot 0: the keys are the positions that end at the call's last
    query, whose position is the one RoPE was given. A sliding-window cache holds only the
    window's keys (offset > 0); where position_ids put the last query before slot keys - 1 (left
    padding) or are absent, key slots are positions (offset 0)."""
    if position_ids is None:
        return 0
    lo, hi = (int(x) for x in torch.aminmax(position_ids[..., -1].reshape(-1)))
    if hi + 1 <= keys:
        return 0
    if lo != hi:
        raise UnsupportedAttention(
            "ropelens_stats attention: batch items at different positions over a cache that "
            "holds only part of their keys"
        )
    return hi + 1 - keys


def _plain_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw):
    """Outside record_attention: SDPA, or the model's own eager attention (its modeling file's
    ``eager_attention_forward``) where the model does not support SDPA or asks for soft-capping."""
    modeling = type(module).__module__
    if kw.get("softcap") is None and _supports_sdpa(modeling):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw
        )
    eager = getattr(sys.modules[modeling], "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedAttention(
            f"ropelens_stats attention: {type(module).__name__} needs its eager attention (no "
            f"SDPA or soft-capping), and {modeling} has no eager_attention_forward"
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    Lq = query.shape[2]
    if attention_mask is None and causal and 1 < Lq < key.shape[2]:
        key, value = key[:, :, :Lq], value[:, :, :Lq]  # as SDPA: prefill into an empty static cache
    if attention_mask is None or attention_mask.dtype == torch.bool:  # eager adds a float mask
        attention_mask = _float_mask(attention_mask, query, key, causal)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)


@cache
def _supports_sdpa(modeling: str) -> bool:
    """Whether the models of a modeling file support SDPA (Gemma2's do not: soft-capping)."""
    from transformers import PreTrainedModel

    mod = sys.modules[modeling]
    return all(
        getattr(c, "_supports_sdpa", True)
        for c in vars(mod).values()
        if isinstance(c, type) and issubclass(c, PreTrainedModel) and c.__module__ == modeling
    )


def _float_mask(mask, query, key, causal: bool) -> torch.Tensor | None:
    """Additive mask (0 or the dtype's minimum) from a boolean one, or from the causal pattern
    (query i at key slot Lk - Lq + i) where transformers skipped the mask."""
    if mask is None:
        if not causal or query.shape[2] == 1:
            return None
        Lq, Lk = query.shape[2], key.shape[2]
        q = torch.arange(Lk - Lq, Lk, device=query.device)
        mask = (torch.arange(Lk, device=query.device) <= q[:, None])[None, None]
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def _count_call(rec: AttentionRecorder, module) -> int | None:
    """One call of the attention function per forward of an attention module: a second one
    (DiffLlama's two softmaxes over shared queries and keys) is not one attention distribution.
    Returns the tokens the module's cache layer held before this forward (None: not known)."""
    state = rec.open.get(id(module))
    if state is None:  # called outside a watched module's forward (the function used directly)
        return None
    if state[0]:
        raise UnsupportedAttention(
            f"ropelens_stats attention: {type(module).__name__} calls the attention function "
            "more than once per layer, so its attention is not one distribution per head"
        )
    state[0] = 1
    return state[1]


def _watch(model, rec: AttentionRecorder) -> list:
    """Hooks on the model's attention modules (those with ``layer_idx`` and ``is_causal``, as
    transformers' are): each forward must go through the attention function exactly once, else
    the statistics would silently miss the layer (Falcon computes attention in its own code).
    Before each forward the hook also reads how many tokens the layer's cache has seen: the
    absolute position of the call's first query, whatever the keys the cache keeps (a sliding or
    chunked layer keeps only the window's) and whether the model passes ``position_ids`` on."""

    def enter(mod, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = None
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length(mod.layer_idx))
        rec.open[id(mod)] = [0, past]

    def leave(mod, args, out):
        if rec.open.pop(id(mod), [None])[0] == 0:
            raise UnsupportedAttention(
                f"ropelens_stats attention: {type(mod).__name__} computes its attention without "
                "transformers' attention interface, so its statistics cannot be recorded"
            )

    handles = []
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "is_causal"):
            handles.append(mod.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(mod.register_forward_hook(leave))
    return handles


def _visible_keys(Lq: int, Lk: int, first: int) -> int:
    """(query, key) pairs of a causal call's queries [first, Lq) (query i sees Lk - Lq + i + 1)."""
    off = Lk - Lq
    return (Lq - first) * (off + 1) + (Lq * (Lq - 1) - first * (first - 1)) // 2


def _row_kernel(work: int, min_work: int = CPU_KERNEL_MIN_WORK) -> bool:
    """Whether this call reduces rows with ropelens.rowstats: once loaded always; before, when
    the process's work so far, this call's included (query x visible key x head x batch
    elements), has reached ``min_work`` (``Paths.row_kernel_min_work``)."""
    global _rowstats, _work
    _work += work
    if _rowstats is None and _work >= min_work:
        from ropelens import rowstats

        _rowstats = rowstats
    return _rowstats is not None


def _tf32_exact(query: torch.Tensor) -> bool:
    """Whether the chunk matmuls may use TF32: CUDA, and half-precision inputs (exact in TF32)."""
    return query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)


@contextmanager
def _tf32_matmuls(enabled: bool):
    """Let CUDA fp32 matmuls use TF32 tensor cores inside the block (restored on exit)."""
    mm = torch.backends.cuda.matmul
    if not enabled:
        yield
    elif hasattr(mm, "fp32_precision"):  # torch >= 2.9
        prev = mm.fp32_precision
        mm.fp32_precision = "tf32"
        try:
            yield
        finally:
            mm.fp32_precision = prev
    else:
        prev = mm.allow_tf32
        mm.allow_tf32 = True
        try:
            yield
        finally:
            mm.allow_tf32 = prev


AttentionInterface.register(ATTN_IMPLEMENTATION, stats_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@contextmanager
def record_attention(model, spec: StatsSpec | None = None):
    """Switch ``model`` to the statistics attention and yield the recorder; restore on exit."""
    global _ACTIVE
    prev_impl = model.config._attn_implementation
    prev_rec = _ACTIVE

    def set_impl(name):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(name)
        else:
            model.config._attn_implementation = name

    rec = AttentionRecorder(spec)
    set_impl(ATTN_IMPLEMENTATION)
    handles = _watch(model, rec)
    _ACTIVE = rec
    try:
        yield rec
    finally:
        _ACTIVE = prev_rec
        for h in handles:
            h.remove()
        set_impl(prev_impl)


__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionRecorder",
    "Paths",
    "StatsSpec",
    "UnsupportedAttention",
    "record_attention",
    "stats_attention_forward",
    "use_paths",
]

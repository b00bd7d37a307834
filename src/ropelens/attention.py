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

Attention-side methods (``ropelens.positions``: ReRoPE, Self-Extend) live here too: on a module
that carries a position map, each chunk's logits of (query, key) pairs at least the method's window
apart come from the queries and keys further rotated to the method's positions, in every call —
recording or not, so PPL, attention and needle cells all see the method (outside
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
from dataclasses import dataclass
from functools import cache

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
FAST_PATH = True  # uncounted leading queries of a causal unmasked prefill via fused SDPA
CPU_KERNEL = True  # CPU chunks reduce their rows with ropelens.rowstats (else torch operations)
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
    attention where SDPA cannot do what it asks); inside record_attention also the statistics."""
    rec = _ACTIVE
    _check_kwargs(module, kwargs)
    moved = getattr(module, moves.ATTR, None) is not None  # an attention-side method
    if rec is None and not moved:
        return _plain_attention(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    rec = rec or _silent_recorder()  # moved positions: the chunks' output, no statistics kept
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise RuntimeError("ropelens_stats attention is inference-only: run under torch.no_grad()")
    if dropout > 0:
        raise UnsupportedAttention("ropelens_stats attention does not support dropout")
    softcap = kwargs.get("softcap")
    past = _count_call(rec, module)  # tokens the layer's cache held before this call, if known
    spec = rec.spec
    B, H, Lq, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    g = H // Hkv
    scaling = D**-0.5 if scaling is None else scaling
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None and is_causal and 1 < Lq < key.shape[2]:
        key, value = key[:, :, :Lq], value[:, :, :Lq]  # as SDPA: prefill into an empty static cache
    Lk = key.shape[2]
    _check_window(module, kwargs.get("sliding_window"), attention_mask, Lk)
    off = Lk - Lq  # key slot of query 0
    # absolute position of key slot 0: from the layer's cache where record_attention saw it, else
    # from the positions RoPE was given
    if past is not None:
        koff = max(past + Lq - Lk, 0)
    else:
        koff = _key_offset(kwargs.get("position_ids"), Lk)
    dev, f32 = query.device, torch.float32
    fmin = torch.finfo(f32).min
    tf32 = _tf32_exact(query)  # TF32 matmuls on unscaled q, logits scaled after
    q32 = query.to(f32) if tf32 else query.to(f32) * scaling
    k32, v32 = key.to(f32), value.to(f32)
    acc = rec._acc(module.layer_idx, H, dev)
    rec.calls += 1
    far = moves.far_logits(module, q32, k32, koff)  # attention-side: the far q / k set

    # Masses are differences of prefix sums S(c) = sum_{k<c} p_k taken at boundaries c = base (+ the
    # query position for distance bins): masses = S(boundaries) @ diff + const. S(0) = 0 and
    # S(Lk) = 1 are constants, so position edges 0 and Lk and lags >= Lk are not gathered.
    # Position edges and spans are absolute, converted to key slots (a sliding cache's keys start
    # at koff: edges before it have S = 0); distances are the same in slots.
    nb_pos, n_span, nb_dist = spec.position_bins, len(spec.spans), spec.distance_bins
    lags = [0] + [2**i for i in range(nb_dist - 1)]
    lags = [lag for lag in lags if lag < Lk]
    total = koff + Lk  # keys 0..total-1 in absolute positions, the window's last Lk in the cache
    base = [(b * total + nb_pos - 1) // nb_pos - koff for b in range(1, nb_pos)]
    base += [int(c) - koff for span in spec.spans for c in span]
    base = [min(max(c, 0), Lk) for c in base]
    n_fixed = len(base)
    base += [1 - lag for lag in lags]
    diff = torch.zeros(len(base), nb_pos + nb_dist + n_span)
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
    for j in range(len(lags)):  # bin j = S(q + 1 - lag j) - S(q + 1 - lag j+1)
        diff[n_fixed + j, nb_pos + j] = 1
        if j + 1 < len(lags):
            diff[n_fixed + j + 1, nb_pos + j] = -1
    diff, const = diff.to(dev), const.to(dev)
    base = torch.tensor(base, device=dev, dtype=torch.long)
    per_query = torch.arange(len(base), device=dev) >= n_fixed
    positions = torch.arange(off, Lk, device=dev)
    bounds = base + positions[:, None] * per_query  # (Lq, boundaries)
    counted = positions + koff >= spec.query_start
    lane = torch.arange(BLOCK, device=dev)

    out = torch.empty(B, Lq, H, Dv, dtype=query.dtype, device=dev)
    # Fast path: with queries and keys both at 0..Lq-1 (off == 0), causal and unmasked, queries
    # [0, fast) see only keys [0, fast), so fused SDPA on that prefix gives exactly their output.
    # They are not counted, so they need no statistics. Masks and decoding steps keep the chunks.
    fast = 0
    if FAST_PATH and off == 0 and koff == 0 and is_causal and attention_mask is None:
        fast = 0 if softcap is not None else min(max(spec.query_start, 0), Lq)
        fast = fast if far is None else min(fast, far.window)  # all their distances are < w
    if fast:
        # GQA: repeat the kv heads (enable_gqa needs torch >= 2.5; pyproject allows 2.4)
        k_fast, v_fast = key[:, :, :fast], value[:, :, :fast]
        if g > 1:
            k_fast, v_fast = k_fast.repeat_interleave(g, 1), v_fast.repeat_interleave(g, 1)
        o = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, :fast], k_fast, v_fast, is_causal=True, scale=scaling
        )
        out[:, :fast] = o.transpose(1, 2)
        rec.fast_queries += fast

    cpu = dev.type == "cpu"
    # CPU: the chunks' rows reduced by the compiled kernel, where its load is repaid
    kernel = cpu and CPU_KERNEL and _row_kernel(B * H * _visible_keys(Lq, Lk, fast))
    if kernel:  # boundaries in ascending order per query (the kernel clamps them, keeping order)
        sorted_bounds, sorted_order = (x.numpy() for x in torch.sort(bounds, dim=-1, stable=True))

    # CPU: chunks run on a pool of Python threads with single-threaded ops, which beats intra-op
    # threading here (many mid-sized ops, each its own parallel region), above all on busy machines
    workers = torch.get_num_threads() if cpu and Lq - fast > 1 else 1
    rows = min(Lq - fast, chunk_rows(spec, B, H, Lk, workers, cpu)) if fast < Lq else 1
    starts = range(fast, Lq, rows)  # the counted queries, chunk by chunk
    workers = min(workers, len(starts))
    buffers = threading.local()

    def chunk(c0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend queries [c0, c0 + rows): write their output; return per-head sums of their
        [count, entropy, S(boundaries)...] and [count, entropy] of the call's last query."""
        c1 = min(Lq, c0 + rows)
        n = c1 - c0
        if not hasattr(buffers, "s"):  # one pair per worker thread
            buffers.s = torch.empty(B * H * rows * Lk, dtype=f32, device=dev)
            buffers.p = torch.empty_like(buffers.s)
        qpos, sel = positions[c0:c1], counted[c0:c1]
        # visible keys lie in [0, kend); valid rows have at least one
        m, valid = None, None
        kend = off + c1 if is_causal else Lk
        if attention_mask is not None:
            m = attention_mask[:, :, c0:c1]
            if m.dtype == torch.bool:
                seen = m.any(dim=(0, 1, 2)).nonzero()
                kend = int(seen[-1]) + 1 if len(seen) else 1
                m = m[..., :kend]
                valid = m.any(-1)
            else:
                kend = Lk
                valid = (m > torch.finfo(m.dtype).min).any(-1)
            sel = sel & valid
        sel = sel.expand(B, H, n)

        # logits, masked with the largest negative float (not -inf, so that 0 * s = 0 below)
        qc = q32[:, :, c0:c1].reshape(B, Hkv, g * n, D)
        s = buffers.s[: B * H * n * kend].view(B, Hkv, g * n, kend)
        torch.matmul(qc, k32[:, :, :kend].transpose(-1, -2), out=s)
        if far is not None:  # distances >= the window: logits of the further-rotated q / k
            far.merge(s, c0, c1, kend, H)
        if tf32:
            s.mul_(scaling)
        if softcap is not None:  # the statistics see the capped logits, as the model's softmax
            s.div_(softcap).tanh_().mul_(softcap)
        s4 = s.view(B, H, n, kend)
        if m is None:
            if is_causal and off + c0 + 1 < kend:  # mask k > q in the trailing triangle
                tri = torch.arange(off + c0 + 1, kend, device=dev) > qpos[:, None]
                s4[..., off + c0 + 1 :].masked_fill_(tri, fmin)
        elif m.dtype == torch.bool:
            s4.masked_fill_(~m, fmin)
        else:
            s4.add_(m.to(f32).clamp(min=fmin))
        p = buffers.p[: B * H * n * kend].view(B, Hkv, g * n, kend)
        torch.softmax(s, -1, out=p)
        o = torch.matmul(p, v32[:, :, :kend]).view(B, H, n, Dv)
        if m is not None and m.dtype == torch.bool:
            o = o.masked_fill(~valid[..., None], 0.0)  # SDPA returns 0 for fully masked rows
        out[:, c0:c1] = o.transpose(1, 2)

        # entropy: lse - sum(p * s), with lse = max(s) - log max(p)
        p4 = p.view(B, H, n, kend)
        if kernel:  # CPU: one compiled pass per row (ropelens.rowstats)
            return _rowstats.accumulate(s4, p4, sorted_bounds, sorted_order, c0, sel)
        ent = s4.amax(-1) - p4.amax(-1).log() - s4.mul_(p4).sum(-1)

        # prefix sums at the boundaries: whole key blocks + a gathered partial block
        bnd = bounds[c0:c1].clamp(0, kend)
        if kend <= bnd.shape[1] * BLOCK:  # short rows: a plain cumulative sum is cheaper
            cum = torch.nn.functional.pad(p4.cumsum(-1), (1, 0))
            pre = cum.gather(-1, bnd.expand(B, H, n, -1))
        else:
            blk, rem = bnd // BLOCK, bnd % BLOCK
            nfull = kend // BLOCK
            bsum = p4[..., : nfull * BLOCK].unflatten(-1, (nfull, BLOCK)).sum(-1)
            cum = torch.nn.functional.pad(bsum.cumsum(-1), (1, 0))
            idx = (blk[..., None] * BLOCK + lane).clamp_(max=kend - 1).flatten(1)
            part = p4.gather(-1, idx.expand(B, H, n, -1)).unflatten(-1, (-1, BLOCK))
            pre = cum.gather(-1, blk.expand(B, H, n, -1)) + (part * (lane < rem[..., None])).sum(-1)

        stats = torch.cat([torch.ones_like(ent)[..., None], ent[..., None], pre], -1)
        stats = torch.where(sel[..., None], stats, 0.0).to(acc["sums"].dtype)
        return stats.sum((0, 2)), stats[:, :, -1, :2].sum(0)

    rec.chunks += len(starts)
    if workers > 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(chunk, starts))
        finally:
            torch.set_num_threads(threads)
    else:
        with _tf32_matmuls(tf32):
            results = [chunk(c0) for c0 in starts]
    if results:  # none when the fast path took every query (none counted)
        # sums of [count, entropy, S(boundaries)]; masses are linear in S, so convert the sums
        tot = torch.stack([sums for sums, _ in results]).sum(0).to(acc["sums"])
        masses = tot[:, 2:] @ diff.to(tot) + tot[:, :1] * const.to(tot)
        acc["sums"] += torch.cat([tot[:, :2], masses], -1)
        # the last chunk holds the call's last query
        cnt, last = results[-1][1].unbind(-1)
        acc["entropy_last"] = torch.where(cnt > 0, last / cnt.clamp(min=1), acc["entropy_last"])
    return out, None


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


def _row_kernel(work: int) -> bool:
    """Whether this call reduces rows with ropelens.rowstats: once loaded always; before, when
    the process's work so far, this call's included (query x visible key x head x batch
    elements), has reached CPU_KERNEL_MIN_WORK."""
    global _rowstats, _work
    _work += work
    if _rowstats is None and _work >= CPU_KERNEL_MIN_WORK:
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
    "StatsSpec",
    "UnsupportedAttention",
    "record_attention",
    "stats_attention_forward",
]

"""CPU kernel of the attention statistics: one pass per probability row, compiled with numba.

``ropelens.attention`` computes a chunk's logits ``s`` and probabilities ``p`` (rows = batch x head
x query) with torch, then hands both here. Per row, one vectorised loop gives sum(p * s), max(s)
and max(p) (so the entropy lse - sum(p * s), with lse = max(s) - log max(p)), and sums of p over the
segments between the row's sorted boundaries, whose running total is the prefix sum
S(b) = sum_{k<b} p_k at each boundary. Selected rows are added up per head right away, so a chunk
returns (heads, 2 + boundaries) sums, not rows.

It replaces some twenty torch operations per chunk (key-block sums, gathered partial blocks,
masks, concatenation): one attention layer at 8K on 2 threads goes from 2.41x to 1.69x of SDPA
(docs/BENCHMARKS.md). The kernel releases the GIL, so the attention's worker threads run it side
by side. float32 sums, like the torch path; compiled once per machine (numba's cache). Importing
numba and loading the machine code take ~0.4 s, so ``ropelens.attention`` imports this module
only once a process has done enough statistics work to repay that (CPU_KERNEL_MIN_WORK).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

_SIGN = np.int32(0x7FFFFFFF)


@numba.njit(nogil=True, fastmath=True, cache=True)
def _accumulate(s, p, bounds, order, first, sel, sums, last):  # pragma: no cover (compiled)
    rows, keys = p.shape
    nsel_b, heads, n = sel.shape[0], sums.shape[0], sel.shape[2]
    nb = bounds.shape[1]
    # maxima over int32 bit patterns (vectorised, unlike float max with its NaN rules): p >= 0
    # orders like its bits; for s, negative floats get their magnitude bits flipped
    p_bits, s_bits = p.view(np.int32), s.view(np.int32)
    for r in range(rows):
        q = r % n
        h = (r // n) % heads
        if not sel[(r // (n * heads)) % nsel_b, h % sel.shape[1], q]:
            continue
        dot = np.float32(0.0)
        p_top = np.int32(0)
        s_top = np.int32(-2147483648)
        for k in range(keys):
            dot += p[r, k] * s[r, k]
            a = p_bits[r, k]
            p_top = a if a > p_top else p_top
            b = s_bits[r, k]
            b = b ^ ((b >> 31) & _SIGN)
            s_top = b if b > s_top else s_top
        s_top = s_top ^ ((s_top >> 31) & _SIGN)
        p_max = np.array([p_top], dtype=np.int32).view(np.float32)[0]
        s_max = np.array([s_top], dtype=np.int32).view(np.float32)[0]
        ent = s_max - np.log(p_max) - dot  # lse = max(s) - log max(p)
        sums[h, 0] += 1.0
        sums[h, 1] += ent
        if q == n - 1:
            last[h, 0] += 1.0
            last[h, 1] += ent
        acc = np.float32(0.0)
        prev = 0
        for i in range(nb):
            b = min(max(bounds[first + q, i], 0), keys)
            if b > prev:
                acc += np.sum(p[r, prev:b])
                prev = b
            sums[h, 2 + order[first + q, i]] += acc


def accumulate(
    s: torch.Tensor,
    p: torch.Tensor,
    bounds: np.ndarray,
    order: np.ndarray,
    first: int,
    sel: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the selected rows, per head, of [1, entropy, S(boundary)...], and of [1, entropy]
    over the chunk's last query.

    s, p: (B, H, n, K) contiguous float32 logits (masked ones at the largest negative float, not
    -inf) and their softmax. bounds: (queries, nb) int64 key positions, ascending per query
    (clamped to [0, K] here), and order: the output column of each; the chunk's query q uses row
    first + q. sel: bool (B or 1, H or 1, n), the rows to count. Entropy = lse - sum(p * s) with
    lse = max(s) - log max(p).
    """
    B, H, n, K = p.shape
    sums = np.zeros((H, 2 + bounds.shape[1]))
    last = np.zeros((H, 2))
    if sel.dim() == 1:
        sel = sel[None, None]
    p_rows, s_rows = p.view(-1, K).numpy(), s.view(-1, K).numpy()
    _accumulate(s_rows, p_rows, bounds, order, first, sel.numpy(), sums, last)
    return torch.from_numpy(sums), torch.from_numpy(last)

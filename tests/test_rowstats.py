"""The compiled CPU row kernel against a float64 loop over rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ropelens import rowstats


def reference(s, p, bounds, sel):
    """Per head: sums of [1, entropy, S(b) for b in bounds[query]] over selected rows, and
    [1, entropy] over the selected rows of the last query."""
    B, H, n, K = p.shape
    nb = bounds.shape[1]
    sums, last = np.zeros((H, 2 + nb)), np.zeros((H, 2))
    for b in range(B):
        for h in range(H):
            for i in range(n):
                if not sel[b, h, i]:
                    continue
                row = p[b, h, i].astype(np.float64)
                ent = -sum(x * math.log(x) for x in row if x > 0)
                pre = [row[:c].sum() for c in bounds[i]]
                sums[h] += [1, ent, *pre]
                if i == n - 1:
                    last[h] += [1, ent]
    return sums, last


@pytest.mark.parametrize("K", [1, 7, 40, 300])
def test_matches_loop(K):
    g = torch.Generator().manual_seed(K)
    B, H, n, nb = 2, 3, 5, 9
    s = torch.randn(B, H, n, K, generator=g) * 4
    s[0, 0] -= 30  # rows whose logits are all negative (the maxima work on bit patterns)
    hidden = torch.rand(B, H, n, K, generator=g) < 0.3
    hidden[..., 0] = False  # every row sees a key
    s = s.masked_fill(hidden, torch.finfo(torch.float32).min)  # as the attention masks logits
    p = torch.softmax(s.double(), -1).float()
    # boundaries of all the call's queries (out of range ones are clamped); the chunk is 2..2+n
    bounds = torch.randint(-3, K + 4, (n + 4, nb), generator=g)
    bounds[:, 0], bounds[:, 1], bounds[:, 2] = 0, K, bounds[:, 3]  # both ends and a repeat
    sorted_bounds, order = torch.sort(bounds, dim=-1, stable=True)
    sel = torch.rand(B, H, n, generator=g) < 0.7
    sel[:, :, -1] = True
    sums, last = rowstats.accumulate(s, p, sorted_bounds.numpy(), order.numpy(), 2, sel)
    chunk_bounds = bounds[2 : 2 + n].clamp(0, K).numpy()
    ref_sums, ref_last = reference(s.numpy(), p.numpy(), chunk_bounds, sel.numpy())
    assert sums.shape == (H, 2 + nb) and sums.dtype == torch.float64
    np.testing.assert_allclose(sums.numpy(), ref_sums, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(last.numpy(), ref_last, atol=1e-5, rtol=1e-6)


def test_selection_broadcasts():
    """sel may be (n,) or (B, 1, n), as the attention passes it; nothing selected gives zeros."""
    B, H, n, K = 2, 2, 3, 16
    s = torch.randn(B, H, n, K)
    p = torch.softmax(s, -1)
    bounds = np.array([[0, 4, 16]] * n)
    order = np.array([[0, 1, 2]] * n)
    full, _ = rowstats.accumulate(s, p, bounds, order, 0, torch.ones(n, dtype=torch.bool))
    assert full[:, 0].tolist() == [B * n] * H
    np.testing.assert_allclose(full[:, 4].numpy(), B * n, rtol=1e-6)  # S(K) = 1 per row
    half, _ = rowstats.accumulate(
        s, p, bounds, order, 0, torch.tensor([[True] * n, [False] * n]).view(B, 1, n)
    )
    assert half[:, 0].tolist() == [n] * H
    none, last = rowstats.accumulate(s, p, bounds, order, 0, torch.zeros(n, dtype=torch.bool))
    assert not none.any() and not last.any()

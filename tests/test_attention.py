"""Streaming attention statistics against an eager reference computed with plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from ropelens import attention as att
from ropelens.attention import StatsSpec, record_attention

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest)


@pytest.fixture(autouse=True)
def kernel_not_loaded(monkeypatch):
    """Every test starts as a fresh process does: the CPU row kernel not loaded, no work done."""
    monkeypatch.setattr(att, "_rowstats", None)
    monkeypatch.setattr(att, "_work", 0)


@pytest.fixture(params=[True, False], ids=["rowstats", "torch-ops"])
def kernel(request):
    """CPU chunks reduce rows with the compiled kernel (loaded whatever the work), or with the
    torch operations that other devices use: both against the same references."""
    with att.use_paths(row_kernel=request.param, row_kernel_min_work=0):
        yield request.param


def make_model(kv_heads=4, layers=2, seed=0):
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init, so the statistics vary
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    return model


def ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, length), generator=g)


def eager_probs(model, input_ids, attention_mask=None):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a.double().cpu().numpy() for a in out.attentions]


def reference(probs, spec, valid=None, keys_in_call=None):
    """Statistics from full (B, H, L, L) probabilities, one query at a time.

    valid[b, i]: whether query i of item b counts; keys_in_call(i): Lk of the call holding query i.
    """
    rows = []
    for layer, a in enumerate(probs):
        B, H, L, _ = a.shape
        for h in range(H):
            n, ent, last = 0, 0.0, []
            pos = np.zeros(spec.position_bins)
            dist = np.zeros(spec.distance_bins)
            span = np.zeros(len(spec.spans))
            for b in range(B):
                for i in range(L):
                    ok = valid is None or valid[b, i]
                    if not ok or i < spec.query_start:
                        continue
                    lk = L if keys_in_call is None else keys_in_call(i)
                    p = a[b, h, i, :lk]
                    e = -sum(x * math.log(x) for x in p if x > 0)
                    n += 1
                    ent += e
                    if i == L - 1:
                        last.append(e)
                    for k in range(lk):
                        pos[(k * spec.position_bins) // lk] += p[k]
                        d = i - k
                        if d >= 0:
                            bi = 0 if d == 0 else int(math.floor(math.log2(d))) + 1
                            dist[min(bi, spec.distance_bins - 1)] += p[k]
                    for s, (st, en) in enumerate(spec.spans):
                        span[s] += p[max(st, 0) : max(min(en, lk), 0)].sum()
            rows.append(
                dict(
                    layer=layer,
                    head=h,
                    n_queries=n,
                    entropy_mean=ent / n if n else math.nan,
                    entropy_last=float(np.mean(last)) if last else math.nan,
                    pos_mass=pos / n,
                    dist_mass=dist / n,
                    span_mass=span / n,
                )
            )
    return rows


def assert_matches(table, ref, tol=TOL):
    got = table.to_pylist()
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert (g["layer"], g["head"], g["n_queries"]) == (r["layer"], r["head"], r["n_queries"])
        for k in ("entropy_mean", "entropy_last"):
            if math.isnan(r[k]):
                assert math.isnan(g[k]), k
            else:
                assert abs(g[k] - r[k]) < tol, (k, g[k], r[k])
        for k in ("pos_mass", "dist_mass", "span_mass"):
            np.testing.assert_allclose(g[k], r[k], atol=tol, rtol=0, err_msg=k)


def run_stats(model, input_ids, spec, attention_mask=None):
    with torch.no_grad(), record_attention(model, spec) as rec:
        logits = model(input_ids, attention_mask=attention_mask).logits
    return rec, logits


def direct(q, k, v, spec, mask=None, **kwargs):
    """The attention function itself on q (B, H, L, D), k and v (B, Hkv, L, D) (``kwargs`` as
    models pass them): its recorder and output."""
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, True
    rec = att.AttentionRecorder(spec)
    prev, att._ACTIVE = att._ACTIVE, rec
    try:
        out, _ = att.stats_attention_forward(
            module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, **kwargs
        )
    finally:
        att._ACTIVE = prev
    return rec, out


@pytest.mark.parametrize("kv_heads,length", [(4, 37), (2, 70), (1, 53)])
def test_matches_eager_and_sdpa(kv_heads, length, kernel):
    model = make_model(kv_heads=kv_heads, layers=3 if kv_heads == 2 else 2)
    x = ids(1, length)
    spec = StatsSpec(position_bins=7, distance_bins=6, spans=[(3, 11), (30, 90), (-5, 2)])
    rec, logits = run_stats(model, x, spec)
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        ref_logits = model(x).logits
    assert (logits - ref_logits).abs().max().item() < 1e-5
    assert_matches(rec.table(), reference(eager_probs(model, x), spec))
    t = rec.table()
    assert t.num_rows == model.config.num_hidden_layers * 4
    pos = np.array(t.column("pos_mass").to_pylist())
    np.testing.assert_allclose(pos.sum(1), 1.0, atol=1e-6)
    # the sharpened model has heads that differ, so the comparison above is not vacuous
    assert np.ptp(t.column("entropy_mean").to_numpy()) > 0.1


def test_chunking_equals_single_chunk(kernel):
    model = make_model(kv_heads=2)
    x = ids(2, 130)
    spec = StatsSpec(spans=[(10, 20)], distance_bins=9)
    rec_one, logits_one = run_stats(model, x, spec)
    small = StatsSpec(spans=[(10, 20)], distance_bins=9, memory_budget_bytes=200_000)
    rows = att.chunk_rows(small, 2, 4, 130, cpu=True)
    assert 1 < rows < 130 // 4
    rec_many, logits_many = run_stats(model, x, small)
    assert rec_one.chunks == 2 and rec_many.chunks == 2 * math.ceil(130 / rows)
    assert (logits_one - logits_many).abs().max().item() < 1e-5
    a, b = rec_one.table().to_pylist(), rec_many.table().to_pylist()
    for r1, r2 in zip(a, b):
        for k, v in r1.items():
            np.testing.assert_allclose(v, r2[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("queries,keys,koff", [(7, 7, 0), (5, 40, 0), (1, 16, 84), (3, 9, 2)])
def test_bin_plan_masses_equal_a_loop(queries, keys, koff):
    """The boundary plan alone: for random probabilities over all keys (keys after the query
    included), S(bounds) @ diff + const equals the masses binned key by key at absolute positions
    (k / total, log2 distances, spans; keys after the query in no distance bin); ``counted``
    follows query_start."""
    spans = [(3, 9), (0, 1), (30, 200), (-4, 2), (86, 95)]
    spec = StatsSpec(position_bins=5, distance_bins=6, spans=spans, query_start=koff + keys - 2)
    plan = att.bin_plan(spec, queries, keys, koff)
    rng = np.random.default_rng(queries * keys + koff)
    total, diff, const = koff + keys, plan.diff.double().numpy(), plan.const.double().numpy()
    assert plan.slots.tolist() == list(range(keys - queries, keys))
    for i, slot in enumerate(plan.slots.tolist()):
        p = rng.random(keys) ** 4
        p /= p.sum()
        prefix = np.concatenate([[0.0], np.cumsum(p)])
        got = prefix[np.clip(plan.bounds[i].numpy(), 0, keys)] @ diff + const
        pos, dist, span = np.zeros(5), np.zeros(6), np.zeros(len(spans))
        for k in range(keys):
            a, d = koff + k, slot - k
            pos[a * 5 // total] += p[k]
            if d >= 0:
                dist[min(0 if d == 0 else math.floor(math.log2(d)) + 1, 5)] += p[k]
            span += [p[k] * (s0 <= a < s1) for s0, s1 in spans]
        np.testing.assert_allclose(got, np.concatenate([pos, dist, span]), atol=1e-12, rtol=0)
        assert bool(plan.counted[i]) == (koff + slot >= spec.query_start)


@pytest.mark.parametrize(
    "queries,keys,first,threads,cpu",
    [(70, 70, 0, 1, True), (70, 70, 33, 2, True), (1, 90, 0, 4, True), (70, 70, 70, 2, True),
     (50, 50, 3, 3, False)],
)  # fmt: skip
def test_chunk_plan_covers_the_counted_queries_once(queries, keys, first, threads, cpu):
    """The chunks cover queries [first, queries) once, in order, within the budget; several
    workers only on CPU, never more than chunks or torch threads."""
    spec = StatsSpec(memory_budget_bytes=60_000)
    starts, rows, workers = att.chunk_plan(spec, 2, 4, queries, keys, first, threads, cpu)
    covered = [q for c0 in starts for q in range(c0, min(queries, c0 + rows))]
    assert covered == list(range(first, queries))
    many = threads if cpu and queries - first > 1 else 1
    assert workers == min(many, len(starts))
    assert rows <= att.chunk_rows(spec, 2, 4, keys, many, cpu)


@pytest.mark.parametrize("block", [3, 4])
def test_block_prefix_sums(block):
    """Long rows take prefix sums from key blocks plus a gathered partial block (torch path)."""
    model = make_model(kv_heads=2)
    x = ids(2, 130)
    spec = StatsSpec(position_bins=5, distance_bins=8, spans=[(7, 50)], memory_budget_bytes=100_000)
    n_bounds = spec.position_bins + 1 + 2 * len(spec.spans) + spec.distance_bins
    assert n_bounds * block < 130 // 2  # most chunks use the block path
    with att.use_paths(block=block, row_kernel=False):
        rec, _ = run_stats(model, x, spec)
    assert rec.chunks > 4
    assert_matches(rec.table(), reference(eager_probs(model, x), spec))


def test_worker_threads_match_single_thread(kernel):
    """On CPU with several torch threads, chunks run on a thread pool; results must not change."""
    model = make_model(kv_heads=2)
    x = ids(2, 100)
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[0, :9] = 0
    spec = StatsSpec(spans=[(50, 60)], memory_budget_bytes=60_000)
    rec1, logits1 = run_stats(model, x, spec, attention_mask=mask)
    torch.set_num_threads(2)
    try:
        rec2, logits2 = run_stats(model, x, spec, attention_mask=mask)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert rec1.chunks > 2 * 4 and rec2.chunks > 2 * 4  # several chunks per layer
    assert (logits1 - logits2).abs().max().item() < 1e-6
    for r1, r2 in zip(rec1.table().to_pylist(), rec2.table().to_pylist()):
        for k, v in r1.items():
            np.testing.assert_allclose(v, r2[k], atol=1e-6, rtol=0)


def test_left_padding_batch(kernel):
    model = make_model(kv_heads=2)
    x = ids(2, 60)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :17] = 0  # item 1 is left-padded
    x[1, :17] = 0
    spec = StatsSpec(position_bins=5, distance_bins=8, spans=[(20, 30)], memory_budget_bytes=50_000)
    rec, logits = run_stats(model, x, spec, attention_mask=mask)
    with torch.no_grad():
        ref_logits = model(x, attention_mask=mask).logits
    real = mask.bool()
    assert (logits - ref_logits)[real].abs().max().item() < 1e-5
    ref = reference(eager_probs(model, x, mask), spec, valid=real.numpy())
    assert ref[0]["n_queries"] == 60 + 43
    assert_matches(rec.table(), ref)


def test_query_start_and_spans(kernel):
    model = make_model(kv_heads=1)
    x = ids(1, 90)
    spec = StatsSpec(
        spans=[(40, 45), (0, 1), (85, 200)], query_start=80, memory_budget_bytes=30_000
    )
    rec, _ = run_stats(model, x, spec)
    ref = reference(eager_probs(model, x), spec)
    assert ref[0]["n_queries"] == 10
    assert_matches(rec.table(), ref)
    spec_late = StatsSpec(query_start=1000)
    rec_late, _ = run_stats(model, x, spec_late)
    t = rec_late.table().to_pylist()
    assert all(r["n_queries"] == 0 and math.isnan(r["entropy_mean"]) for r in t)


def test_generation_with_kv_cache(kernel):
    model = make_model(kv_heads=2)
    prompt = ids(1, 41)
    new = 6
    spec = StatsSpec(position_bins=6, distance_bins=8, spans=[(5, 9)], query_start=40)
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        with record_attention(model, spec) as rec:
            seq = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert torch.equal(seq, plain) and seq.shape[1] == 41 + new
    fed = seq[:, :-1]  # the last generated token is never fed back
    probs = eager_probs(model, fed)
    ref = reference(probs, spec, keys_in_call=lambda i: 41 if i < 41 else i + 1)
    assert ref[0]["n_queries"] == new
    assert_matches(rec.table(), ref)
    # the prefill's 40 uncounted queries took the fused SDPA; the decoding steps took the chunks
    assert rec.fast_queries == 40 * model.config.num_hidden_layers


FAST_LENGTH = 70
FAST_SPEC = dict(position_bins=6, distance_bins=8, spans=[(5, 9), (30, 66)])
FAST_BUDGET = 60_000  # several chunks per layer


def fast_starts():
    """query_start values: none, one uncounted query, a chunk boundary and a point mid-chunk of the
    slow path (batch 2, 4 heads), all but the last query, and all queries uncounted."""
    spec = StatsSpec(**FAST_SPEC, memory_budget_bytes=FAST_BUDGET)
    rows = att.chunk_rows(spec, 2, 4, FAST_LENGTH, cpu=True)
    assert 2 < rows < FAST_LENGTH // 3
    L = FAST_LENGTH
    return dict(zero=0, one=1, boundary=2 * rows, mid=2 * rows + rows // 2, last=L - 1, none=L)


FAST_CASES = [
    ("zero", 1),
    ("one", 1),
    ("boundary", 1),
    ("mid", 1),
    ("mid", 2),  # chunks on the worker-thread pool
    ("last", 1),
    ("none", 1),
]


@pytest.mark.parametrize("where,threads", FAST_CASES)
def test_fast_path_direct(where, threads):
    """Same q, k, v (GQA, fp32) through the function with and without the fast path: masses within
    1e-6, entropies 2e-6 (fp32 sums whose order follows the chunk's length), output within 1e-5
    of SDPA."""
    B, H, Hkv, L, D = 2, 4, 2, FAST_LENGTH, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, n, L, D, generator=g) * 2 for n in (H, Hkv, Hkv))
    start = fast_starts()[where]
    spec = StatsSpec(**FAST_SPEC, query_start=start, memory_budget_bytes=FAST_BUDGET)

    def call(fast):
        torch.set_num_threads(threads)
        try:
            with att.use_paths(fast_prefix=fast):
                return direct(q, k, v, spec)
        finally:
            torch.set_num_threads(1)

    rec, out = call(True)
    rec_slow, out_slow = call(False)
    assert rec.fast_queries == start and rec_slow.fast_queries == 0
    kr, vr = (t.repeat_interleave(H // Hkv, 1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    sdpa = sdpa.transpose(1, 2)
    assert (out - sdpa).abs().max().item() < 1e-5
    assert (out_slow - sdpa).abs().max().item() < 1e-5
    got, slow = rec.table().to_pylist(), rec_slow.table().to_pylist()
    assert got[0]["n_queries"] == B * (L - start)
    for r, s in zip(got, slow):
        for key, val in r.items():
            tol = 2e-6 if key.startswith("entropy") else 1e-6
            np.testing.assert_allclose(val, s[key], atol=tol, rtol=0, err_msg=key)


@pytest.mark.parametrize("where,threads", FAST_CASES)
def test_fast_path_model(where, threads):
    """Through a GQA model: SDPA's logits, the eager reference's statistics, and the slow path's
    statistics within 1e-6 (entropies 1e-5: from layer 1 on the two paths' inputs differ by
    fp32 rounding, as their attention outputs do, amplified by the sharpened q/k weights)."""
    start = fast_starts()[where]
    spec = StatsSpec(**FAST_SPEC, query_start=start, memory_budget_bytes=FAST_BUDGET)
    model = make_model(kv_heads=2, layers=3)
    x = ids(2, FAST_LENGTH)
    torch.set_num_threads(threads)
    try:
        rec, logits = run_stats(model, x, spec)
        with att.use_paths(fast_prefix=False):
            rec_slow, _ = run_stats(model, x, spec)
    finally:
        torch.set_num_threads(1)
    assert rec.fast_queries == model.config.num_hidden_layers * start
    with torch.no_grad():
        ref_logits = model(x).logits
    assert (logits - ref_logits).abs().max().item() < 1e-5
    for r, s in zip(rec.table().to_pylist(), rec_slow.table().to_pylist()):
        for key, val in r.items():
            tol = 1e-5 if key.startswith("entropy") else 1e-6
            np.testing.assert_allclose(val, s[key], atol=tol, rtol=0, err_msg=key)
    if start < FAST_LENGTH:  # else nothing is counted (NaN means, as the slow path gives)
        assert_matches(rec.table(), reference(eager_probs(model, x), spec))


def test_fast_path_bf16():
    model = make_model(kv_heads=2)
    x = ids(1, 64)
    spec = StatsSpec(position_bins=4, distance_bins=7, spans=[(0, 8)], query_start=40)
    rec32, _ = run_stats(model, x, spec)
    model.to(torch.bfloat16)
    rec16, logits16 = run_stats(model, x, spec)
    with torch.no_grad():
        ref16 = model(x).logits
    assert rec16.fast_queries == 40 * model.config.num_hidden_layers
    assert logits16.dtype == torch.bfloat16
    assert (logits16.float() - ref16.float()).abs().max().item() < 0.1
    for r32, r16 in zip(rec32.table().to_pylist(), rec16.table().to_pylist()):
        assert r16["n_queries"] == r32["n_queries"] == 24
        assert abs(r16["entropy_mean"] - r32["entropy_mean"]) < 0.15
        for k in ("pos_mass", "dist_mass", "span_mass"):
            np.testing.assert_allclose(r16[k], r32[k], atol=0.05)


def test_padded_batch_skips_fast_path(kernel):
    """With an attention mask (padding) every query goes through the chunks, as before."""
    model = make_model(kv_heads=2)
    x = ids(2, 60)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :17] = 0
    spec = StatsSpec(spans=[(20, 30)], query_start=30, memory_budget_bytes=50_000)
    rec, logits = run_stats(model, x, spec, attention_mask=mask)
    with att.use_paths(fast_prefix=False):
        rec_slow, logits_slow = run_stats(model, x, spec, attention_mask=mask)
    assert rec.fast_queries == 0 and rec.chunks == rec_slow.chunks
    assert torch.equal(logits, logits_slow)
    assert rec.table().equals(rec_slow.table())
    real = mask.bool()
    ref = reference(eager_probs(model, x, mask), spec, valid=real.numpy())
    assert ref[0]["n_queries"] == 2 * 30
    assert_matches(rec.table(), ref)


def test_bf16_close_to_fp32():
    model = make_model(kv_heads=2)
    x = ids(1, 64)
    spec = StatsSpec(position_bins=4, distance_bins=7, spans=[(0, 8)])
    rec32, _ = run_stats(model, x, spec)
    model.to(torch.bfloat16)
    rec16, logits16 = run_stats(model, x, spec)
    with torch.no_grad():
        ref16 = model(x).logits
    assert logits16.dtype == torch.bfloat16
    assert (logits16.float() - ref16.float()).abs().max().item() < 0.1
    for r32, r16 in zip(rec32.table().to_pylist(), rec16.table().to_pylist()):
        assert r16["n_queries"] == r32["n_queries"]
        assert abs(r16["entropy_mean"] - r32["entropy_mean"]) < 0.15
        for k in ("pos_mass", "dist_mass", "span_mass"):
            np.testing.assert_allclose(r16[k], r32[k], atol=0.05)
    acc = rec16.layers[0]["sums"]
    assert acc.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_mask_direct(dtype, kernel):
    """Additive float mask (with a bias and a non-causal pattern) through the function itself."""
    B, H, Hkv, L, D = 2, 4, 2, 50, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, n, L, D, generator=g) * 2 for n in (H, Hkv, Hkv))
    pos = torch.arange(L)
    mask = -0.05 * (pos[:, None] - pos[None, :]).abs().float()
    hidden = (pos[None, :] > pos[:, None] + 3) | (torch.rand(L, L, generator=g) < 0.2)
    fmin = torch.finfo(dtype).min  # as transformers builds additive masks
    mask = mask.masked_fill(hidden, fmin).expand(B, 1, L, L).clone()
    mask[1, :, 5] = fmin  # one fully masked query
    mask = mask.to(dtype)
    spec = StatsSpec(position_bins=6, distance_bins=7, spans=[(10, 20)], memory_budget_bytes=40_000)
    args = [t.to(dtype) for t in (q, k, v)]
    rec, out = direct(*args, spec, mask)
    assert rec.chunks > 2 and out.dtype == dtype and out.shape == (B, L, H, D)
    kr, vr = (t.repeat_interleave(H // Hkv, 1) for t in args[1:])
    sdpa = torch.nn.functional.scaled_dot_product_attention(args[0], kr, vr, mask)
    sdpa = sdpa.transpose(1, 2).double()
    a64, k64, v64 = (t.double() for t in args)
    logits = a64 @ k64.repeat_interleave(2, 1).transpose(-1, -2) * D**-0.5
    probs = torch.softmax(logits + mask.double(), -1)
    exact = (probs @ v64.repeat_interleave(2, 1)).transpose(1, 2)
    probs = probs.numpy()
    if dtype == torch.float32:
        assert (out.double() - sdpa).abs().max().item() < 1e-5
    else:  # fp16: rounded from an fp32 computation, at least as close to exact as SDPA
        err, err_sdpa = ((t - exact).abs().max().item() for t in (out.double(), sdpa))
        assert err <= err_sdpa + 1e-4 and err < 2e-3
    valid = (mask[:, 0] > fmin).any(-1).numpy()
    assert not valid[1, 5] and valid.sum() == 2 * L - 1
    assert_matches(rec.table(), reference([probs], spec, valid=valid))


def qkv(B, H, Hkv, Lq, Lk, D=16, seed=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g) * 2
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g) * 2 for _ in range(2))
    return q, k, v


def test_softcap_direct(kernel):
    """Soft-capped logits (Gemma2: s = cap * tanh(s / cap) before the mask): the output and the
    statistics follow the capped softmax, computed here in float64; the cap binds (differs)."""
    B, H, Hkv, L, D, cap = 1, 4, 2, 40, 16, 2.0
    q, k, v = qkv(B, H, Hkv, L, L, D)
    q = q * 3
    spec = StatsSpec(position_bins=5, distance_bins=6, spans=[(4, 19)], memory_budget_bytes=20_000)
    rec, out = direct(q, k, v, spec, softcap=cap)
    assert rec.fast_queries == 0 and rec.chunks > 2
    s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * D**-0.5
    capped = cap * torch.tanh(s / cap)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    probs = torch.softmax(capped.masked_fill(~causal, -math.inf), -1)
    exact = (probs @ v.double().repeat_interleave(2, 1)).transpose(1, 2)
    assert (out.double() - exact).abs().max().item() < 1e-5
    assert_matches(rec.table(), reference([probs.numpy()], spec))
    plain = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
    assert (plain - probs).abs().max().item() > 0.1


def test_sliding_cache_positions_are_absolute(kernel):
    """A decoding step over a sliding-window cache: the keys are the window's last 16 of 100
    positions (position_ids give the query's), so spans, position bins (k / 100) and
    query_start are absolute, as over the full 100 keys with the earlier ones at probability 0."""
    B, H, Hkv, W, D, pos = 1, 4, 2, 16, 16, 99
    q, k, v = qkv(B, H, Hkv, 1, W, D)
    mask = torch.ones(B, 1, 1, W, dtype=torch.bool)
    spans = [(80, 90), (0, 84), (95, 200)]
    spec = StatsSpec(position_bins=8, distance_bins=9, spans=spans, query_start=pos)
    rec, out = direct(q, k, v, spec, mask, position_ids=torch.tensor([[pos]]), sliding_window=W)
    probs = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * D**-0.5, -1)
    full = np.zeros((B, H, pos + 1, pos + 1))
    full[:, :, pos, pos + 1 - W :] = probs[:, :, 0].numpy()
    valid = np.zeros((B, pos + 1), dtype=bool)
    valid[:, pos] = True
    assert_matches(rec.table(), reference([full], spec, valid=valid))
    late = StatsSpec(query_start=pos + 1)
    rec_late, _ = direct(q, k, v, late, mask, position_ids=torch.tensor([[pos]]))
    assert rec_late.table().column("n_queries").to_pylist() == [0] * H
    # left padding (the query before slot Lk - 1) and no position_ids: key slots are positions
    assert att._key_offset(torch.tensor([[3, 4, 5]]), 8) == 0
    assert att._key_offset(None, 8) == 0
    assert att._key_offset(torch.tensor([[40]]), 16) == 25
    with pytest.raises(att.UnsupportedAttention, match="different positions"):
        att._key_offset(torch.tensor([[40], [41]]), 16)


def test_refuses_what_it_cannot_compute_exactly():
    """Attention sinks, position biases, packed sequences, a window without its mask: one line
    naming the module's class and the argument, never a silently different result."""
    q, k, v = qkv(1, 4, 4, 10, 10)
    spec = StatsSpec()
    for name, value in [
        ("s_aux", torch.zeros(4)),
        ("position_bias", torch.zeros(1, 4, 10, 10)),
        ("cu_seq_lens_q", torch.tensor([0, 10])),
    ]:
        with pytest.raises(att.UnsupportedAttention, match=f"Module asks for: argument '{name}'"):
            direct(q, k, v, spec, **{name: value})
    direct(q, k, v, spec, s_aux=None, use_cache=True, output_attentions=False)  # features off
    with pytest.raises(att.UnsupportedAttention, match="sliding window of 4 but no attention mask"):
        direct(q, k, v, spec, sliding_window=4)


def test_outside_block_eager_where_the_model_has_no_sdpa():
    """Outside the recorder the function is the model's own attention: for Gemma2 (no SDPA: its
    logits are soft-capped) its eager attention, with the mask transformers skipped or gave as
    booleans made additive; the result equals an eager load."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        attn_logit_softcapping=3.0,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    x = ids(1, 20)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(x).logits
        model.set_attn_implementation(att.ATTN_IMPLEMENTATION)
        got = model(x).logits
        short = model(x[:, :6]).logits  # within the window: transformers skips the mask
        model.set_attn_implementation("eager")
        short_ref = model(x[:, :6]).logits
    assert (got - ref).abs().max().item() < 1e-5
    assert (short - short_ref).abs().max().item() < 1e-5


def _own_attention_code(model):
    """Layer 1 computes its attention in its own code, without the attention interface (as
    Falcon did before transformers 5.25): SDPA called directly on its projections."""
    attn = model.model.layers[1].self_attn

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, attn.head_dim)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in projections)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None

    attn.forward = forward
    return model


@pytest.mark.parametrize(
    "config,match",
    [
        ("LlamaConfig", "without transformers' attention interface"),  # its own attention code
        ("DiffLlamaConfig", "more than once per layer"),  # two softmaxes per layer
    ],
)
def test_refuses_layers_it_cannot_see_as_one_distribution(config, match):
    """Every attention module's forward calls the attention function exactly once while
    recording; otherwise one line names the module instead of a table that misses or mixes layers.
    The hooks are gone afterwards: the model runs as before."""
    import transformers

    cfg = getattr(transformers, config)(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if config == "LlamaConfig":
        model = _own_attention_code(model)
    x = ids(1, 12)
    with torch.no_grad():
        before = model(x).logits
        with pytest.raises(att.UnsupportedAttention, match=match), record_attention(model):
            model(x)
        assert torch.equal(model(x).logits, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_inference_only():
    model = make_model(kv_heads=2)
    with record_attention(model, StatsSpec()), pytest.raises(RuntimeError, match="no_grad"):
        model(ids(1, 20))
    assert model.config._attn_implementation == "sdpa"


def test_outside_block_is_plain_attention():
    model = make_model(kv_heads=2)
    x = ids(1, 33)
    with torch.no_grad():
        ref = model(x).logits
        model.set_attn_implementation(att.ATTN_IMPLEMENTATION)
        got = model(x).logits
        model.set_attn_implementation("sdpa")
    assert (got - ref).abs().max().item() < 1e-5


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def spy_attention(monkeypatch, name, fn):
    spy = LargestTensor()

    def wrapped(*args, **kwargs):
        with spy:
            return fn(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, name, wrapped)
    return spy


def test_no_quadratic_tensor(monkeypatch, kernel):
    # one torch thread: chunks run in this thread, where the (thread-local) dispatch spy sees them
    model = make_model(kv_heads=2)
    length, heads = 256, 4
    x = ids(1, length)
    full = length * length * heads
    # the spy sees the full probability tensor when it exists (eager registered under the name)
    spy = spy_attention(monkeypatch, att.ATTN_IMPLEMENTATION, eager_attention_forward)
    with torch.no_grad():
        model.set_attn_implementation(att.ATTN_IMPLEMENTATION)
        model(x)
        model.set_attn_implementation("sdpa")
    assert spy.largest >= full
    # the statistics attention stays within its chunk
    spy = spy_attention(monkeypatch, att.ATTN_IMPLEMENTATION, att.stats_attention_forward)
    spec = StatsSpec(memory_budget_bytes=300_000)
    rows = att.chunk_rows(spec, 1, heads, length, cpu=True)
    rec, _ = run_stats(model, x, spec)
    assert rec.chunks == 2 * math.ceil(length / rows) and rows * heads * length <= full // 8
    assert 0 < spy.largest <= rows * heads * (length + 1)
    ref = reference(eager_probs(model, x), spec)
    assert_matches(rec.table(), ref)


def causal_probs(q, k, scale):
    """(B, H, L, L) causal softmax in float64 from q (B, H, L, D) and k (B, Hkv, L, D)."""
    q, k = q.double().cpu(), k.double().cpu().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * scale
    L = q.shape[2]
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1).numpy()


def tf32_flag():
    mm = torch.backends.cuda.matmul
    return mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32


HALF_SPEC = dict(position_bins=6, distance_bins=8, spans=[(5, 9)], memory_budget_bytes=60_000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_after_matmul(dtype):
    """The CUDA half-precision branch (unscaled q in the matmul, logits scaled after, TF32 flag set
    and restored) run on CPU: statistics of the half inputs as a float64 reference gives them."""
    B, H, Hkv, L, D = 2, 4, 2, 70, 16
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, n, L, D, generator=g).mul(2).to(dtype) for n in (H, Hkv, Hkv))
    spec = StatsSpec(**HALF_SPEC, query_start=30)
    before = tf32_flag()
    with att.use_paths(tf32=True):
        rec, out = direct(q, k, v, spec)
    assert tf32_flag() == before
    assert_matches(rec.table(), reference([causal_probs(q, k, D**-0.5)], spec), tol=1e-5)
    kr, vr = (t.repeat_interleave(H // Hkv, 1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert out.dtype == dtype
    assert (out.float() - sdpa.transpose(1, 2).float()).abs().max().item() < 2e-2


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kv_heads,start", [(4, 0), (2, 0), (2, 45)])
def test_cuda_model_matches_eager(kv_heads, start):
    """fp32 on CUDA: SDPA's logits within 1e-5, the eager probabilities' statistics within 1e-4,
    over several chunks, with and without the fast path."""
    model = make_model(kv_heads=kv_heads).cuda()
    x = ids(2, FAST_LENGTH).cuda()
    spec = StatsSpec(**FAST_SPEC, query_start=start, memory_budget_bytes=FAST_BUDGET)
    rec, logits = run_stats(model, x, spec)
    assert rec.chunks > 2 * model.config.num_hidden_layers
    assert rec.layers[0]["sums"].device.type == "cuda"
    with torch.no_grad():
        ref_logits = model(x).logits
    assert (logits - ref_logits).abs().max().item() < 1e-5
    assert_matches(rec.table(), reference(eager_probs(model, x), spec))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_inputs_exact_statistics(dtype):
    """Half inputs on CUDA take TF32 matmuls: the statistics still equal a float64 reference of
    the same half q/k within 1e-4 (a TF32-rounded scaled q would be off by ~1e-3)."""
    B, H, Hkv, L, D = 2, 4, 2, 300, 64
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, n, L, D, generator=g).mul(1.5) for n in (H, Hkv, Hkv))
    q, k, v = (t.to(dtype).cuda() for t in (q, k, v))
    spec = StatsSpec(**{**HALF_SPEC, "spans": [(100, 140)]}, query_start=200)
    before = tf32_flag()
    rec, out = direct(q, k, v, spec)
    assert tf32_flag() == before
    assert rec.fast_queries == 200 and rec.chunks > 1
    assert_matches(rec.table(), reference([causal_probs(q, k, D**-0.5)], spec))
    kr, vr = (t.repeat_interleave(H // Hkv, 1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    # |out| < 4: a few half-precision steps (flash kernels round P to half as well)
    assert (out.float() - sdpa.transpose(1, 2).float()).abs().max().item() < 5e-2


def test_row_kernel_loaded_once_work_adds_up(monkeypatch):
    """Calls run with torch operations, leaving the kernel unloaded, until the process's work
    reaches CPU_KERNEL_MIN_WORK; the call that reaches it and every later one use the kernel."""
    model = make_model(kv_heads=2)  # 2 layers x 4 heads
    spec = StatsSpec(spans=[(5, 9)])
    per_call = 4 * att._visible_keys(40, 40, 0)  # 40 queries see 40 * 41 / 2 keys in all
    from ropelens import rowstats

    used = []
    real = rowstats.accumulate
    monkeypatch.setattr(rowstats, "accumulate", lambda *a: used.append(1) or real(*a))
    with att.use_paths(row_kernel_min_work=3 * per_call):
        first, _ = run_stats(model, ids(1, 40), spec)  # layers 0 and 1: 2 calls' work
        assert att._rowstats is None and att._work == 2 * per_call and not used
        second, _ = run_stats(model, ids(1, 40), spec)  # layer 0 reaches 3 calls: loaded
    assert att._rowstats is not None and len(used) == 2  # one chunk per layer
    for r1, r2 in zip(first.table().to_pylist(), second.table().to_pylist()):
        for key, val in r1.items():  # torch operations and the kernel: the same statistics
            np.testing.assert_allclose(val, r2[key], atol=2e-6, rtol=0, err_msg=key)

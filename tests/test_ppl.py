"""Perplexity cells vs a straightforward full-logits loop."""

import math

import numpy as np
import pytest
import torch

from ropelens import ppl
from ropelens.errors import DataError
from ropelens.models import load

from .conftest import tiny_spec, token_table


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_spec(tiny_model_dir)).model


def reference_nll(model, ids):
    """NLL of every token after the first, from the full logits."""
    logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return np.array([-logp[t - 1, ids[t]].item() for t in range(1, len(ids))])


def docs(seed=0, lengths=(150, 90, 40, 130)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


def test_windows_score_every_position_once():
    for n, length, stride in [(10, 4, 2), (100, 32, 31), (100, 32, 7), (5, 8, 4), (33, 32, 16)]:
        scored = []
        for begin, end, first in ppl.windows(n, length, stride):
            assert end - begin <= length and begin < first <= end
            scored += list(range(first, end))
        assert scored == list(range(1, n)), (n, length, stride)


def test_disjoint_windows_skip_only_each_window_start():
    # stride >= length: chunks without overlap; a chunk's first token has no context
    scored = [t for b, e, f in ppl.windows(100, 32, 32) for t in range(f, e)]
    assert scored == [t for t in range(1, 100) if t % 32]


def test_select_documents_longest_first():
    assert ppl.select_documents([5, 50, 20, 50], 10, 2) == [1, 3]
    assert ppl.select_documents([5, 50, 20, 50], 30, 5) == [1, 3]
    assert ppl.select_documents([5, 6], 10, 2) == []


def test_truncate_matches_full_logits(model):
    d = docs()
    settings = {"protocol": "truncate", "max_documents": 3, "position_bins": 4}
    rows = ppl.evaluate(model, token_table(d), 64, settings)
    assert rows["doc_id"] == ["d0", "d3", "d1"]  # longest first, the 40-token doc is too short
    for doc_id, tokens, nll_sum, p, bt, bl in zip(*(rows[k] for k in rows)):
        ids = d[int(doc_id[1:])][:64]
        ref = reference_nll(model, ids)
        assert tokens == 63
        assert nll_sum == pytest.approx(ref.sum(), rel=1e-5)
        assert p == pytest.approx(math.exp(ref.mean()), rel=1e-5)
        # bins of 16 positions over the target position 1..63
        pos = np.arange(1, 64)
        for b in range(4):
            sel = pos // 16 == b
            assert bt[b] == sel.sum()
            assert bl[b] == pytest.approx(ref[sel].mean(), rel=1e-5)


def test_sliding_matches_hf_style_loop(model):
    d = docs(1, (150,))
    length, stride = 48, 20
    settings = {"protocol": "sliding", "stride": stride, "max_documents": 1, "position_bins": 3}
    rows = ppl.evaluate(model, token_table(d), length, settings)
    ids = d[0][: 4 * length]  # default max_tokens = 4 x length
    # the classic loop: windows of `length`, each scores the tokens the previous did not
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + length, len(ids))
        window = ids[begin:end]
        nll = reference_nll(model, window)
        new = end - max(prev_end, begin + 1)
        total += nll[len(nll) - new :].sum()
        count += new
        prev_end = end
        if end == len(ids):
            break
    assert rows["tokens"][0] == count == len(ids) - 1
    assert rows["nll_sum"][0] == pytest.approx(total, rel=1e-5)
    assert sum(rows["bin_tokens"][0]) == count


def test_chunked_head_equals_unchunked(model, monkeypatch):
    ids = torch.tensor(docs(2, (64,))[0])
    full = ppl.token_nll(model, ids, 1)
    monkeypatch.setattr(ppl, "LOGIT_CHUNK", 7)
    assert np.allclose(ppl.token_nll(model, ids, 1), full, rtol=1e-6)


def test_no_long_enough_document_is_one_line_error(model):
    with pytest.raises(DataError, match="no document has 64 tokens .longest: 40.; remove length"):
        ppl.evaluate(
            model,
            token_table(docs(0, (40, 10))),
            64,
            {"protocol": "truncate", "max_documents": 2, "position_bins": 2},
        )

"""Attention cells (integration of the streaming engine) and the JS-divergence aggregate."""

import math

import numpy as np
import pytest
import torch

from ropelens import distributions, schemas
from ropelens.io import write_cell
from ropelens.models import load

from .conftest import tiny_spec, token_table

SETTINGS = {
    "documents": 2,
    "position_bins": 4,
    "distance_bins": 8,
    "query_fraction": 0.125,
    "memory_budget_mb": 1,
}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_spec(tiny_model_dir)).model


def test_measure_matches_eager_attention(model, tiny_model_dir):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n).tolist() for n in (50, 80, 20, 70)]
    length = 40
    table, n_docs = distributions.measure(model, token_table(docs), length, SETTINGS)
    assert n_docs == 2
    df = table.to_pandas()
    assert (df["n_queries"] == 2 * 5).all()  # 2 documents x the last 5 queries
    eager = type(model).from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    expected = {}
    for doc in (docs[1], docs[3]):  # the two longest documents
        with torch.no_grad():
            att = eager(torch.tensor([doc[:length]]), output_attentions=True).attentions
        for layer, a in enumerate(att):
            for head in range(a.shape[1]):
                probs = a[0, head, length - 5 :].double().numpy()  # last 5 queries x keys
                pos = np.zeros(4)
                ent = sink = 0.0
                for row in probs:
                    sink += row[:4].sum()  # attention sinks: keys [0, 4)
                    for k, p in enumerate(row):
                        pos[min(k * 4 // length, 3)] += p
                        ent -= p * math.log(p) if p > 0 else 0.0
                acc = expected.setdefault((layer, head), [np.zeros(4), 0.0, 0.0])
                acc[0] += pos
                acc[1] += ent
                acc[2] += sink
    for r in df.itertuples():
        pos, ent, sink = expected[(r.layer, r.head)]
        assert np.allclose(r.pos_mass, pos / 10, atol=1e-4)
        assert r.entropy_mean == pytest.approx(ent / 10, abs=1e-4)
        assert r.sink_tokens == 4 and r.sink_mass == pytest.approx(sink / 10, abs=1e-4)
        assert sum(r.pos_mass) == pytest.approx(1.0, abs=1e-5)


def fake_cell(tmp_path, method, length, pos_by_layer, entropy=1.0):
    rows = {name: [] for name in schemas.ATTENTION.names}
    for layer, heads in enumerate(pos_by_layer):
        for head, pos in enumerate(heads):
            for k, v in dict(
                model="m",
                method=method,
                length=length,
                rope_type="default",
                factor=None,
                pretrained_length=64,
                cpt_length=None,
                documents=1,
                query_window=0,
                layer=layer,
                head=head,
                n_queries=1,
                entropy_mean=entropy,
                entropy_last=entropy,
                pos_mass=pos,
                dist_mass=[1.0],
                sink_tokens=4,
                sink_mass=pos[0] / 2 + 0.1 * head,
            ).items():
                rows[k].append(v)
    path = tmp_path / f"{method}-{length}.parquet"
    write_cell(rows, schemas.ATTENTION, path)
    return path


def js_by_hand(p, q):
    p, q = np.asarray(p, float) / sum(p), np.asarray(q, float) / sum(q)
    m = (p + q) / 2
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_js_table_against_hand_computation(tmp_path):
    ref = [[[0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1]], [[0.25] * 4, [0.4, 0.3, 0.2, 0.1]]]
    other = [[[0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.3, 0.3]], [[0.25] * 4, [0.4, 0.3, 0.2, 0.1]]]
    cells = [
        fake_cell(tmp_path, "rope", 64, ref, entropy=1.0),
        fake_cell(tmp_path, "rope", 128, other, entropy=2.0),
        fake_cell(tmp_path, "pi", 128, ref, entropy=3.0),
    ]
    df = distributions.js_table(cells, "rope").to_pandas().set_index(["method", "length", "layer"])
    assert df.loc[("rope", 64, "0"), "js_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert df.loc[("pi", 128, "mean"), "js_divergence"] == pytest.approx(0.0, abs=1e-12)
    layer_js = []
    for layer in range(2):
        p = np.mean(other[layer], axis=0)  # head-averaged distributions
        q = np.mean(ref[layer], axis=0)
        layer_js.append(js_by_hand(p, q))
        got = df.loc[("rope", 128, str(layer)), "js_divergence"]
        assert got == pytest.approx(layer_js[-1], rel=1e-9)
    assert df.loc[("rope", 128, "mean"), "js_divergence"] == pytest.approx(np.mean(layer_js))
    assert df.loc[("rope", 128, "mean"), "entropy_mean"] == 2.0
    assert set(df["reference_length"]) == {64}
    assert 0 < layer_js[0] <= math.log(2)


def test_js_table_without_reference_is_one_line_error(tmp_path):
    from ropelens.errors import DataError

    cells = [fake_cell(tmp_path, "pi", 128, [[[0.25] * 4]])]
    with pytest.raises(DataError, match="lack the reference 'rope' at the pretrained length"):
        distributions.js_table(cells, "rope")


def test_query_window():
    assert distributions.query_window(40, 0.125) == 5
    assert distributions.query_window(4096, 0.0625) == 256
    assert distributions.query_window(10, 0.01) == 1
    assert distributions.query_window(10, 1.0) == 10


def test_plot_lengths():
    import pandas as pd

    df = pd.DataFrame({"length": [32, 64, 128, 256, 512]})
    assert distributions.plot_lengths(df, 64, None) == [64, 256]
    assert distributions.plot_lengths(df, 256, None) == [256, 512]
    assert distributions.plot_lengths(df, 64, [32, 999]) == [32]


def test_sink_table_against_hand_computation(tmp_path):
    from ropelens import sinks

    heads = [[[0.8, 0.1, 0.1, 0.0], [0.6, 0.2, 0.2, 0.0]], [[0.2, 0.3, 0.3, 0.2]] * 2]
    cells = [fake_cell(tmp_path, m, 64, heads) for m in ("rope", "pi")]
    table = sinks.sink_table(cells).to_pandas()
    # sink_mass of (layer, head) is pos[0] / 2 + 0.1 * head (fake_cell)
    layer0 = table[(table.method == "pi") & (table.layer == "0")].iloc[0]
    assert layer0.sink_mass == pytest.approx((0.4 + 0.3 + 0.1) / 2)
    assert layer0.sink_mass_max == pytest.approx(0.4)
    mean = table[(table.method == "rope") & (table.layer == "mean")].iloc[0]
    assert mean.sink_mass == pytest.approx(((0.4 + 0.4) / 2 + (0.1 + 0.2) / 2) / 2)
    assert mean.sink_mass_max == pytest.approx(0.4) and mean.sink_tokens == 4
    spec = sinks.sink_chart(sinks.sink_table(cells), "m").to_dict()
    assert spec["spec"]["encoding"]["y"]["field"] == "sink_mass"

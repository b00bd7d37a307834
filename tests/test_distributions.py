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


def fake_cell(tmp_path, method, length, pos_by_layer, entropy=1.0, dist_by_layer=None, model="m"):
    rows = {name: [] for name in schemas.ATTENTION.names}
    for layer, heads in enumerate(pos_by_layer):
        for head, pos in enumerate(heads):
            dist = dist_by_layer[layer][head] if dist_by_layer else pos[::-1]
            for k, v in dict(
                model=model,
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
                dist_mass=dist,
                sink_tokens=4,
                sink_mass=pos[0] / 2 + 0.1 * head,
            ).items():
                rows[k].append(v)
    path = tmp_path / f"{model}-{method}-{length}.parquet"
    write_cell(rows, schemas.ATTENTION, path)
    return path


def js_by_hand(p, q):
    p, q = np.asarray(p, float) / sum(p), np.asarray(q, float) / sum(q)
    m = (p + q) / 2
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_js_divergence():
    js = distributions.js_divergence
    p = [0.2, 0.3, 0.5]
    assert js(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js([1, 0], [0, 1]) == pytest.approx(math.log(2))
    assert js([2, 2, 0, 0], [0, 0, 5, 5]) == pytest.approx(math.log(2))
    q = [0.1, 0.6, 0.3]
    assert js(p, q) == pytest.approx(js_by_hand(p, q), rel=1e-12)
    assert js(q, p) == pytest.approx(js(p, q), rel=1e-12)
    assert js([1, 1, 0], [2, 2, 0]) == pytest.approx(0.0, abs=1e-12)  # scale-free


REF = [[[0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1]], [[0.25] * 4, [0.4, 0.3, 0.2, 0.1]]]
OTHER = [[[0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.3, 0.3]], [[0.25] * 4, [0.4, 0.3, 0.2, 0.1]]]


def _js_frame(cells, reference="rope", model="m"):
    df = distributions.js_table(cells, reference).to_pandas()
    df = df[df["model"] == model]
    return df.set_index(["coordinates", "reference", "method", "length", "layer"]).sort_index()


def test_js_table_against_hand_computation(tmp_path):
    cells = [
        fake_cell(tmp_path, "rope", 64, REF, entropy=1.0),
        fake_cell(tmp_path, "rope", 128, OTHER, entropy=2.0),
        fake_cell(tmp_path, "pi", 128, REF, entropy=3.0),
    ]
    df = _js_frame(cells).loc["position", "rope at the pretrained length"]
    assert df.loc[("rope", 64, "0"), "js_head_averaged"] == pytest.approx(0.0, abs=1e-12)
    assert df.loc[("pi", 128, "mean"), "js_per_head"] == pytest.approx(0.0, abs=1e-12)
    averaged, per_head = [], []
    for layer in range(2):
        p = np.mean(OTHER[layer], axis=0)  # head-averaged distributions
        q = np.mean(REF[layer], axis=0)
        averaged.append(js_by_hand(p, q))
        per_head.append(np.mean([js_by_hand(a, b) for a, b in zip(OTHER[layer], REF[layer])]))
        row = df.loc[("rope", 128, str(layer))]
        assert row["js_head_averaged"] == pytest.approx(averaged[-1], rel=1e-9)
        assert row["js_per_head"] == pytest.approx(per_head[-1], rel=1e-9)
        assert row["js_per_head"] >= row["js_head_averaged"]  # convexity of JS
    mean = df.loc[("rope", 128, "mean")]
    assert mean["js_head_averaged"] == pytest.approx(np.mean(averaged))
    assert mean["js_per_head"] == pytest.approx(np.mean(per_head))
    assert mean["entropy_mean"] == 2.0
    assert set(df["reference_length"]) == {64} and set(df["reference_method"]) == {"rope"}
    assert 0 < averaged[0] < per_head[0] <= math.log(2)
    # the distance coordinates read dist_mass (here each head's pos_mass reversed)
    dist = _js_frame(cells).loc[("distance", "rope at the pretrained length", "rope", 128, "0")]
    rev = lambda m: [h[::-1] for h in m]  # noqa: E731
    want = js_by_hand(np.mean(rev(OTHER[0]), axis=0), np.mean(rev(REF[0]), axis=0))
    assert dist["js_head_averaged"] == pytest.approx(want, rel=1e-9)


def _binned(weights, position_bins, distance_bins):
    """Mass per k/L bin and per log2 distance bin of the last query (the definitions of
    docs/results.md, by a plain loop over keys)."""
    n = len(weights)
    q = n - 1
    pos, dist = np.zeros(position_bins), np.zeros(distance_bins)
    for k, w in enumerate(weights):
        pos[k * position_bins // n] += w
        d = q - k
        dist[min(0 if d == 0 else int(math.floor(math.log2(d))) + 1, distance_bins - 1)] += w
    return pos.tolist(), dist.tolist()


def test_pure_position_rescaling_is_zero_in_k_over_l_and_not_in_distance(tmp_path):
    """A pattern learnt at L and stretched to 4L (what PI does): the same mass per k/L bin, so zero
    divergence in k/L; the same keys sit 4x farther from the query, so not in q - k."""
    shape = np.array([0.40, 0.05, 0.05, 0.10, 0.05, 0.05, 0.10, 0.20])  # per k/L eighth
    cells = []
    for length in (64, 256):
        w = np.repeat(shape, length // 8) / (length // 8)  # attention of the last query
        pos, dist = _binned(w / w.sum(), 8, 12)
        cells.append(
            fake_cell(tmp_path, "rope" if length == 64 else "pi", length, [[pos]], 1.0, [[dist]])
        )
    df = _js_frame(cells).loc[(slice(None), "rope at the pretrained length", "pi", 256, "mean"), :]
    by = df.reset_index().set_index("coordinates")
    assert by.loc["position", "js_head_averaged"] == pytest.approx(0.0, abs=1e-12)
    assert by.loc["distance", "js_head_averaged"] > 0.05
    assert by.loc["distance", "js_head_averaged"] <= math.log(2)


def test_reference_at_the_same_length_and_on_another_model(tmp_path):
    cells = [
        fake_cell(tmp_path, "rope", 64, REF),
        fake_cell(tmp_path, "rope", 128, OTHER),
        fake_cell(tmp_path, "pi", 128, REF),
        fake_cell(tmp_path, "rope", 128, REF, model="native"),
    ]
    refs = [{"length": "same"}, {"model": "native", "length": "same"}]
    df = _js_frame(cells, refs).loc["position"]
    same = df.loc["rope at the same length"]
    assert same.loc[("rope", 128, "mean"), "js_head_averaged"] == pytest.approx(0.0, abs=1e-12)
    pi = same.loc[("pi", 128, "0")]
    want = js_by_hand(np.mean(REF[0], axis=0), np.mean(OTHER[0], axis=0))
    assert pi["js_head_averaged"] == pytest.approx(want, rel=1e-9)
    assert (pi["reference_model"], pi["reference_length"]) == ("m", 128)
    native = df.loc["native/rope at the same length"]
    assert native.loc[("pi", 128, "mean"), "js_head_averaged"] == pytest.approx(0.0, abs=1e-12)
    assert native.loc[("rope", 128, "0"), "reference_model"] == "native"
    # no native cell at 64: that row has no value rather than a wrong one
    assert math.isnan(native.loc[("rope", 64, "mean"), "js_head_averaged"])


def test_js_markdown_names_coordinates_reference_and_unit(tmp_path):
    cells = [fake_cell(tmp_path, "rope", 64, REF), fake_cell(tmp_path, "pi", 128, OTHER)]
    text = distributions.js_markdown(distributions.js_table(cells))
    assert "JS divergence over normalised key position k/L (nats, 0 … ln 2 = 0.693)" in text
    assert "over log2 query–key distance q − k" in text
    assert "reference: rope at the pretrained length" in text
    assert "| method | 64 (pt) avg | 64 (pt) per-head | 128 avg | 128 per-head |" in text


def test_js_table_without_reference_is_one_line_error(tmp_path):
    from ropelens.errors import DataError

    cells = [fake_cell(tmp_path, "pi", 128, [[[0.25] * 4]])]
    with pytest.raises(DataError, match="lack the reference rope at the pretrained length"):
        distributions.js_table(cells, "rope")


@pytest.mark.parametrize(
    "setting,expect",
    [
        ("pi", [{"method": "pi", "model": None, "length": "pretrained"}]),
        ({"length": "same"}, [{"method": "rope", "model": None, "length": "same"}]),
        (
            ["rope", {"model": "n", "length": 512}],
            [
                {"method": "rope", "model": None, "length": "pretrained"},
                {"method": "rope", "model": "n", "length": 512},
            ],
        ),
    ],
)
def test_references(setting, expect):
    assert distributions.references(setting) == expect


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
    from ropelens import charts, sinks

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
    spec = charts.sink_chart(sinks.sink_table(cells), "m").to_dict()
    assert spec["spec"]["encoding"]["y"]["field"] == "sink_mass"

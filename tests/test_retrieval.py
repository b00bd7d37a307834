"""Needle cells vs eager attention, and the entropy-failure aggregates vs hand computations."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ropelens import needle, retrieval
from ropelens.models import load

from .conftest import tiny_spec

HAYSTACK = [
    "The quick brown fox jumps over the lazy dog. " * 3 + "It was a sunny day.\n",
    "Sphinx of black quartz, judge my vow! Pack my box with five dozen liquor jugs.\n",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_spec(tiny_model_dir, "pi", {"factor": 2}))


def test_cell_matches_greedy_generate_and_eager_attention(loaded):
    model, tok = loaded.model, loaded.tokenizer
    length, depth = 120, 40
    settings = {"seed": 3, "max_new_tokens": 6, "memory_budget_mb": 1}
    rows = retrieval.run_cell(model, tok, HAYSTACK, length, depth, settings)
    prompt = needle.build_prompt(tok, HAYSTACK, length, depth, needle.cell_seed(length, depth, 3))
    assert rows["status"][0] == "ok"
    assert (rows["needle_start"][0], rows["needle_end"][0]) == prompt.needle_span
    # greedy decoding equals transformers' generate
    ref = model.generate(
        torch.tensor([prompt.input_ids]), max_new_tokens=6, do_sample=False, eos_token_id=None
    )[0, length:].tolist()
    assert rows["generated"][0] == tok.decode(ref)
    # answering queries: the last prompt token and each generated token fed back
    seq = prompt.input_ids + ref[:-1]
    eager = (
        type(model)
        .from_pretrained(model.name_or_path, config=model.config, attn_implementation="eager")
        .eval()
    )
    with torch.no_grad():
        att = eager(torch.tensor([seq]), output_attentions=True).attentions
    s0, s1 = prompt.needle_span
    by_head = {(r, h): i for i, (r, h) in enumerate(zip(rows["layer"], rows["head"]))}
    assert len(by_head) == len(att) * att[0].shape[1]
    for layer, a in enumerate(att):
        probs = a[0, :, length - 1 :].double().numpy()  # heads x answering queries x keys
        for head in range(probs.shape[0]):
            ent = [-sum(p * math.log(p) for p in row if p > 0) for row in probs[head]]
            mass = [row[s0:s1].sum() for row in probs[head]]
            i = by_head[(layer, head)]
            assert rows["answering_queries"][i] == len(ref)
            assert rows["entropy"][i] == pytest.approx(np.mean(ent), abs=1e-4)
            assert rows["needle_mass"][i] == pytest.approx(np.mean(mass), abs=1e-4)
    assert rows["mean_entropy"][0] == pytest.approx(np.mean(rows["entropy"]), rel=1e-9)


def test_cell_records_the_placement_rule(loaded):
    for placement in needle.PLACEMENTS:
        settings = {"seed": 3, "max_new_tokens": 1, "placement": placement}
        rows = retrieval.run_cell(loaded.model, loaded.tokenizer, HAYSTACK, 120, 40, settings)
        prompt = needle.build_prompt(
            loaded.tokenizer, HAYSTACK, 120, 40, needle.cell_seed(120, 40, 3), placement=placement
        )
        assert set(rows["placement"]) == {placement}
        assert (rows["needle_start"][0], rows["actual_depth"][0]) == (
            prompt.needle_span[0],
            prompt.actual_depth,
        )


def test_prompt_that_cannot_be_built_is_written_with_status(loaded):
    rows = retrieval.run_cell(loaded.model, loaded.tokenizer, HAYSTACK, 8, 50, {})
    assert rows["status"] == ["prompt_error"] and rows["passed"] == [False]
    assert "too short" in rows["error"][0] and rows["placement"] == ["gkamradt"]


def test_out_of_memory_is_written_with_status(loaded, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(retrieval, "_greedy_recorded", boom)
    rows = retrieval.run_cell(loaded.model, loaded.tokenizer, HAYSTACK, 120, 50, {})
    assert rows["status"] == ["oom"] and rows["answer"][0] is not None
    assert rows["layer"] == [None]


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0 for p in scores[labels] for n in scores[~labels]
    ]
    assert retrieval.auroc(scores, labels) == pytest.approx(np.mean(pairs))
    assert retrieval.auroc([3, 4, 1, 2], [True, True, False, False]) == 1.0
    assert retrieval.auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert math.isnan(retrieval.auroc([1, 2], [True, True]))


def cells_frame():
    rows = []
    for method, cpt in (("pi", None), ("pi-1k", 1024), ("pi-2k", 2048)):
        for length in (256, 1024, 4096):
            for depth in (0, 50, 100):
                passed = length <= (cpt or 256) or depth == 100
                rows.append(
                    dict(
                        model="m",
                        method=method,
                        registry_method="pi",
                        length=length,
                        depth=float(depth),
                        cpt_length=cpt,
                        pretrained_length=256,
                        passed=passed,
                        status="ok",
                        score=1.0 if passed else 0.2,
                        mean_entropy=(2.0 if passed else 4.0) + (cpt or 0) / 1e4,
                    )
                )
    rows.append(dict(rows[-1], depth=25.0, status="oom", passed=False, mean_entropy=None))
    return pd.DataFrame(rows)


def test_summary_table():
    df = retrieval.summary_table(cells_frame()).set_index(["model", "method"])
    pi = df.loc[("m", "pi")]
    assert pi["cells"] == 9 and pi["pass_rate"] == pytest.approx(5 / 9)
    assert pi["entropy_passed"] == pytest.approx(2.0)
    assert pi["entropy_failed"] == pytest.approx(4.0)
    assert pi["auroc_entropy_failure"] == 1.0
    # failures only beyond 256 (and not at depth 100): within 1024 and 4096 entropy separates
    assert pi["auroc_within_length"] == 1.0
    assert pi["auroc_length_failure"] == pytest.approx(
        retrieval.auroc([256] * 3 + [1024] * 3 + [4096] * 3, [False] * 3 + [True, True, False] * 2)
    )
    pooled = df.loc[("m", "(all methods)")]
    assert pooled["cells"] == 27 and pooled["failed_status"] == 1
    assert df.loc[("m", "pi-2k"), "failed_status"] == 1


def test_cpt_table():
    df = retrieval.cpt_table(cells_frame()).set_index("cpt_length")
    assert list(df.index) == [0, 1024, 2048]
    assert (df["beyond_length"] == 1024).all()  # the shortest continual-pretraining length
    # beyond 1024 only length 4096 counts: pi-2k fails there except at depth 100
    assert df.loc[2048, "pass_rate_beyond"] == pytest.approx(1 / 3)
    assert df.loc[1024, "methods"] == "pi-1k"
    assert df.loc[0, "pass_rate"] == pytest.approx(5 / 9)


def test_auroc_within_counts_only_pairs_of_a_stratum():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, 60).astype(float)
    labels = rng.random(60) < 0.5
    strata = rng.integers(0, 3, 60)
    pairs = [
        1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
        for i in range(60)
        for j in range(60)
        if labels[i] and not labels[j] and strata[i] == strata[j]
    ]
    assert retrieval.auroc_within(scores, labels, strata) == pytest.approx(np.mean(pairs))
    assert math.isnan(retrieval.auroc_within([1, 2], [True, False], [0, 1]))


def confounded_frame(entropy_tracks_failure: bool):
    """Failures grow with length; entropy follows length only, or also failure within a length."""
    rows = []
    for length, fails in ((256, 1), (1024, 3), (4096, 5)):
        for i in range(6):
            failed = i < fails
            entropy = length / 1000 + (0.5 if failed and entropy_tracks_failure else 0.0)
            rows.append(
                dict(model="m", method="pi", length=length, depth=float(i), status="ok")
                | dict(passed=not failed, score=0.0 if failed else 1.0, mean_entropy=entropy)
            )
    return pd.DataFrame(rows)


def test_summary_table_separates_entropy_from_length():
    only_length = retrieval.summary_table(confounded_frame(False)).set_index("method")
    row = only_length.loc["(all methods)"]
    assert row["auroc_entropy_failure"] == pytest.approx(row["auroc_length_failure"])
    assert row["auroc_length_failure"] > 0.75  # length alone predicts failure ...
    assert row["auroc_within_length"] == 0.5  # ... and entropy adds nothing beyond it
    both = retrieval.summary_table(confounded_frame(True)).set_index("method")
    assert both.loc["(all methods)", "auroc_within_length"] == 1.0
    assert both.loc["(all methods)", "auroc_length_failure"] == row["auroc_length_failure"]


def test_strata_table():
    df = retrieval.strata_table(confounded_frame(True))
    pooled = df[df["method"] == "(all methods)"].set_index("length")
    assert list(pooled.index) == [256, 1024, 4096]
    assert list(pooled["failures"]) == [1, 3, 5] and (pooled["cells"] == 6).all()
    assert (pooled["auroc_entropy_failure"] == 1.0).all()
    assert len(df[df["method"] == "pi"]) == 3  # every length has both classes
    # a stratum with one class gets no per-method row, and its pooled AUROC is undefined
    frame = cells_frame()
    df = retrieval.strata_table(frame)
    all_pass = df[(df["method"] == "(all methods)") & (df["length"] == 256)]
    assert all_pass["failures"].iloc[0] == 0 and math.isnan(
        all_pass["auroc_entropy_failure"].iloc[0]
    )
    assert df[(df["method"] != "(all methods)") & (df["length"] == 256)].empty

"""Task cells vs eager attention on a peaked tiny model, an oracle "model" through the cell path,
and the task aggregates vs hand computations."""

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from ropelens import needle, taskcells, tasks
from ropelens.models import load

from .conftest import tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")

HAYSTACK = [
    "The quick brown fox jumps over the lazy dog. " * 3 + "It was a sunny day.\n",
    "Sphinx of black quartz, judge my vow! Pack my box with five dozen liquor jugs.\n",
]
PEAK = 12.0  # q and k projections x PEAK: attention far from uniform, so an error cannot hide


@pytest.fixture(scope="module")
def peaked(tiny_model_dir):
    """The tiny model (PI x2) with sharpened queries and keys, and its eager-attention twin."""
    loaded = load(tiny_spec(tiny_model_dir, "pi", {"factor": 2}))
    model = loaded.model
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(PEAK)
            layer.self_attn.k_proj.weight.mul_(PEAK)
    eager = type(model).from_pretrained(
        model.name_or_path, config=model.config, attn_implementation="eager"
    )
    eager.load_state_dict(model.state_dict())
    return model, eager.eval(), loaded.tokenizer


def eager_reference(eager, seq, query_start, spans):
    """Per (layer, head): mean entropy and mean mass per span of queries >= query_start."""
    with torch.no_grad():
        att = eager(torch.tensor([seq]), output_attentions=True).attentions
    out = {}
    for layer, a in enumerate(att):
        probs = a[0, :, query_start:].double().numpy()
        for head in range(probs.shape[0]):
            p = probs[head]
            ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
            mass = [p[:, s:e].sum(-1).mean() for s, e in spans]
            out[(layer, head)] = (ent.mean(), mass, p.max(-1).mean())
    return out


@pytest.mark.parametrize(
    "task,counts",
    [("multi_key", {"distractors": 2}), ("variable_tracking", {"hops": 3}), ("passkey", {})],
)
def test_cell_matches_eager_attention(peaked, task, counts):
    model, eager, tok = peaked
    length, depth = 260, 30
    settings = {"seed": 4, "max_new_tokens": 5, "memory_budget_mb": 1, **counts}
    hay = None if task == "passkey" else HAYSTACK
    rows = taskcells.run_cell(model, tok, task, hay, length, depth, settings)
    assert rows["status"][0] == "ok"
    prompt = tasks.build(
        tok, task, hay, length, depth, tasks.cell_seed(task, length, depth, 4), counts=counts
    )
    spans = [(s.start, s.end) for s in prompt.spans]
    assert list(zip(rows["span_start"][0], rows["span_end"][0])) == spans
    assert rows["span_kind"][0] == [s.kind for s in prompt.spans]
    ref_ids = model.generate(
        torch.tensor([prompt.input_ids]), max_new_tokens=5, do_sample=False, eos_token_id=None
    )[0, length:].tolist()
    assert rows["generated"][0] == tok.decode(ref_ids)
    ref = eager_reference(eager, prompt.input_ids + ref_ids[:-1], length - 1, spans)
    assert len(ref) == len(rows["layer"])
    distractor = np.array([k == "distractor" for k in rows["span_kind"][0]])
    peaks = []
    for i, key in enumerate(zip(rows["layer"], rows["head"])):
        ent, mass, peak = ref[key]
        peaks.append(peak)
        assert rows["answering_queries"][i] == 5
        assert rows["entropy"][i] == pytest.approx(ent, abs=1e-4)
        assert rows["span_mass"][i] == pytest.approx(mass, abs=1e-4)
        assert rows["target_mass"][i] == pytest.approx(sum(np.array(mass)[~distractor]), abs=1e-4)
        if distractor.any():
            assert rows["distractor_mass"][i] == pytest.approx(
                sum(np.array(mass)[distractor]), abs=1e-4
            )
        else:
            assert rows["distractor_mass"][i] is None
    assert np.median(peaks) > 10 / length  # peaked: far from uniform over the ~260 keys
    assert rows["mean_entropy"][0] == pytest.approx(np.mean(rows["entropy"]), rel=1e-9)
    assert rows["mean_target_mass"][0] == pytest.approx(np.mean(rows["target_mass"]), rel=1e-9)


def _oracle_greedy(answer_of):
    """A stand-in for needle.greedy: one real forward over the prompt (so the last prompt token's
    attention is recorded), then the tokens of ``answer_of(prompt text)``."""

    def greedy(model, input_ids, max_new_tokens, eos_token_id=None):
        with torch.no_grad():
            model(input_ids=torch.tensor([list(input_ids)]))
        return answer_of(list(input_ids))

    return greedy


@pytest.mark.parametrize("task", tasks.TASKS)
def test_oracle_scores_100_and_a_distractor_answer_fails(peaked, task, monkeypatch):
    model, _, tok = peaked
    hay = None if task == "passkey" else HAYSTACK
    settings = {"seed": 2}

    def read(ids):  # the first numbers of the planted spans, read from the prompt
        p = tasks.build(tok, task, hay, 300, 50, tasks.cell_seed(task, 300, 50, 2))
        assert p.input_ids == ids
        nums = [re.findall(r"\d+", s.text) for s in p.spans if s.kind != "distractor"]
        text = ", ".join(n[0] for n in nums if n) if task == "multi_value" else nums[0][0]
        return tok(" " + text + ".", add_special_tokens=False)["input_ids"]

    monkeypatch.setattr(needle, "greedy", _oracle_greedy(read))
    rows = taskcells.run_cell(model, tok, task, hay, 300, 50, settings)
    assert (rows["passed"][0], rows["score"][0], rows["predicted_distractor"][0]) == (
        True,
        1.0,
        False,
    )
    assert rows["answering_queries"][0] == 1
    if task == "multi_key":
        p = tasks.build(tok, task, hay, 300, 50, tasks.cell_seed(task, 300, 50, 2))
        wrong = tok(" " + p.distractor_answers[0], add_special_tokens=False)["input_ids"]
        monkeypatch.setattr(needle, "greedy", _oracle_greedy(lambda ids: wrong))
        rows = taskcells.run_cell(model, tok, task, hay, 300, 50, settings)
        assert rows["passed"][0] is False and rows["predicted_distractor"][0] is True


def test_too_short_prompt_is_a_status(peaked):
    model, _, tok = peaked
    rows = taskcells.run_cell(model, tok, "multi_key", HAYSTACK, 50, 50, {})
    assert rows["status"] == ["prompt_error"] and "too short" in rows["error"][0]
    assert rows["passed"] == [False] and rows["span_mass"] == [None]


def _cells():
    rows = []
    grid = [(m, n, d) for m in ("rope", "pi") for n in (256, 512) for d in (0.0, 50.0)]
    for i, (method, length, depth) in enumerate(grid):
        passed = (i % 3) != 0
        rows.append(
            {"task": "multi_key", "model": "toy", "method": method, "length": length}
            | {"depth": depth, "status": "ok", "passed": passed, "score": float(passed)}
            | {"mean_entropy": 1.0 + i / 10, "mean_target_mass": 0.5 - 0.1 * (not passed)}
            | {"mean_distractor_mass": 0.1 + 0.2 * (not passed) + i / 100}
            | {"predicted_distractor": not passed and i % 2 == 0}
            | {"mean_span_mass": [0.4, 0.05, 0.05]}
        )
        rows.append(
            rows[-1]
            | {"task": "variable_tracking", "mean_distractor_mass": math.nan}
            | {"mean_span_mass": [0.1 * (i % 4), 0.2, 0.3], "predicted_distractor": False}
        )
    rows.append(rows[-1] | {"status": "oom", "passed": False, "depth": 100.0})
    return pd.DataFrame(rows)


def test_aggregate_tables_by_hand():
    cells = _cells()
    tables = taskcells.tables(cells)
    passes = tables[""]
    row = passes[(passes.task == "multi_key") & (passes.method == "rope") & (passes.length == 256)]
    ok = cells[(cells.task == "multi_key") & (cells.method == "rope") & (cells.length == 256)]
    assert row["pass_rate"].item() == ok["passed"].mean() and row["cells"].item() == 2
    vt = passes[(passes.task == "variable_tracking") & (passes.method == "pi")]
    assert vt["failed_status"].tolist() == [0, 1]  # the oom cell counts, not in the rates
    ent = tables["_entropy"]
    mk = cells[(cells.task == "multi_key") & (cells.status == "ok")]
    pooled = ent[(ent.task == "multi_key") & (ent.method == "(all methods)")]
    failed = ~mk["passed"]
    assert pooled["entropy_failed"].item() == pytest.approx(mk.loc[failed, "mean_entropy"].mean())
    pos, neg = mk.loc[failed, "mean_entropy"], mk.loc[~failed, "mean_entropy"]
    pairs = [(f, p) for f in pos for p in neg]
    want = np.mean([1.0 if f > p else 0.5 if f == p else 0.0 for f, p in pairs])
    assert pooled["auroc_entropy_failure"].item() == pytest.approx(want)
    dis = tables["_distractors"]
    assert set(dis["method"]) == {"rope", "pi", "(all methods)"}
    allm = dis[dis.method == "(all methods)"].iloc[0]
    assert allm["distractor_mass_failed"] == pytest.approx(
        mk.loc[failed, "mean_distractor_mass"].mean()
    )
    assert allm["distractor_mass_failed"] > allm["distractor_mass_passed"]
    assert allm["auroc_distractor_failure"] == 1.0  # failures here always have more
    assert allm["failures_answering_a_distractor"] == pytest.approx(
        mk.loc[failed, "predicted_distractor"].mean()
    )
    hops = tables["_hops"]
    h0 = hops[(hops.method == "(all methods)") & (hops.hop == 0)].iloc[0]
    v = cells[(cells.task == "variable_tracking") & (cells.status == "ok")]
    m0 = np.array([m[0] for m in v["mean_span_mass"]])
    assert h0["mass_failed"] == pytest.approx(m0[~v["passed"].to_numpy()].mean())
    assert h0["mass_passed"] == pytest.approx(m0[v["passed"].to_numpy()].mean())
    assert len(hops) == 3 * 3  # (rope, pi, all) x 3 hops

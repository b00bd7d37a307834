"""Needle-in-a-Haystack cells with attention entropy, and the entropy–failure analysis.

A cell is one (model, method, length, depth): build the prompt (:mod:`ropelens.needle`), decode
greedily with a KV cache, and — with the streaming statistics engine — record the attention of the
*answering queries* (the last prompt token and every generated token) over the whole context: per
layer × head, the entropy and the mass on the needle span. The paper's Fig. 4/5 annotate each cell
with the mean of that entropy; its finding is that failures come with high entropy.

A cell that cannot run (out of memory, a length too short for the prompt) is still written, with a
``status`` that says why, so the grid never silently loses a cell.
"""

from __future__ import annotations

import math

import numpy as np

OK = "ok"


def depth_label(depth: float) -> str:
    """Depth as it appears in paths and wildcards: 50 -> '50', 12.5 -> '12.5'."""
    return f"{float(depth):g}"


def _greedy_recorded(model, prompt_ids, max_new_tokens: int, eos_token_id, spec):
    """:func:`ropelens.needle.greedy` under :func:`ropelens.attention.record_attention`: the
    generated ids and the statistics table of the counted (answering) queries."""
    from ropelens.attention import record_attention
    from ropelens.needle import greedy

    with record_attention(model, spec) as rec:
        out = greedy(model, prompt_ids, max_new_tokens, eos_token_id)
    return out, rec.table()


def answer_recorded(model, tokenizer, prompt, spans, length: int, settings: dict):
    """The greedy answer to a prompt of ``length`` tokens (text) and the statistics of its
    answering queries (the last prompt token and every generated one), with the attention mass
    on each of ``spans``. Shared by needle and task cells; out of memory propagates."""
    from ropelens.attention import StatsSpec

    spec = StatsSpec(
        position_bins=settings.get("position_bins", 16),
        distance_bins=settings.get("distance_bins", 20),
        spans=spans,
        query_start=length - 1,
        memory_budget_bytes=settings.get("memory_budget_mb", 256) * 2**20,
    )
    max_new = settings.get("max_new_tokens") or len(prompt.target_ids) + 4
    new, stats = _greedy_recorded(model, prompt.input_ids, max_new, tokenizer.eos_token_id, spec)
    return tokenizer.decode(new), stats


def run_cell(model, tokenizer, haystack, length: int, depth: float, settings: dict) -> dict:
    """Column lists of one needle cell (without the grid/method columns)."""
    from ropelens import needle
    from ropelens.errors import DataError, is_out_of_memory

    template = needle.Template(**settings.get("template", {}))
    seed = needle.cell_seed(length, depth, settings.get("seed", 0))
    fmt = needle.resolve_format(tokenizer, settings.get("format", "auto"))
    placement = settings.get("placement", needle.DEFAULT_PLACEMENT)
    try:
        prompt = needle.build_prompt(
            tokenizer, haystack, length, depth, seed, template, fmt, placement=placement
        )
    except DataError as e:
        return _failed_cell(length, depth, "prompt_error", str(e), placement=placement)
    try:
        text, stats = answer_recorded(
            model, tokenizer, prompt, [prompt.needle_span], length, settings
        )
    except Exception as e:
        if is_out_of_memory(e):
            error = str(e).strip().splitlines()[0]
            return _failed_cell(length, depth, "oom", error, prompt, placement)
        raise
    graded = needle.score(text, prompt.answer)
    n = stats.num_rows
    entropy = stats.column("entropy_mean").to_numpy()
    needle_mass = [m[0] for m in stats.column("span_mass").to_pylist()]
    return {
        "depth": [float(depth)] * n,
        "actual_depth": [prompt.actual_depth] * n,
        "placement": [prompt.placement] * n,
        "prompt_tokens": [len(prompt.input_ids)] * n,
        "needle_start": [prompt.needle_span[0]] * n,
        "needle_end": [prompt.needle_span[1]] * n,
        "answer": [prompt.answer] * n,
        "generated": [text] * n,
        "predicted": [graded.predicted] * n,
        "score": [graded.score] * n,
        "passed": [graded.exact] * n,
        "status": [OK] * n,
        "error": [None] * n,
        "mean_entropy": [float(np.nanmean(entropy))] * n,
        "mean_needle_mass": [float(np.nanmean(needle_mass))] * n,
        "answering_queries": stats.column("n_queries").to_pylist(),
        "layer": stats.column("layer").to_pylist(),
        "head": stats.column("head").to_pylist(),
        "entropy": entropy.tolist(),
        "needle_mass": needle_mass,
    }


def _failed_cell(length, depth, status, error, prompt=None, placement=None) -> dict:
    """One row, no per-head statistics: the cell exists and says why it has no result."""
    return {
        "depth": [float(depth)],
        "actual_depth": [prompt.actual_depth if prompt else None],
        "placement": [placement],
        "prompt_tokens": [len(prompt.input_ids) if prompt else None],
        "needle_start": [prompt.needle_span[0] if prompt else None],
        "needle_end": [prompt.needle_span[1] if prompt else None],
        "answer": [prompt.answer if prompt else None],
        "generated": [None],
        "predicted": [None],
        "score": [None],
        "passed": [False],
        "status": [status],
        "error": [error],
        "mean_entropy": [None],
        "mean_needle_mass": [None],
        "answering_queries": [None],
        "layer": [None],
        "head": [None],
        "entropy": [None],
        "needle_mass": [None],
    }


# --- aggregates -----------------------------------------------------------------------------------


def cell_frame(cell_paths):
    """One row per needle cell (the per-head rows collapsed)."""
    from ropelens import schemas
    from ropelens.io import read_cells

    df = read_cells(cell_paths, schemas.NEEDLE).to_pandas()
    keys = ["model", "method", "length", "depth"]
    return df.drop_duplicates(keys).drop(
        columns=["layer", "head", "entropy", "needle_mass", "answering_queries"]
    )


def status_summary(cells) -> str:
    """How many ``cells`` have no result and why: '2 of 3 cells have no result (2 prompt_error:
    <the first error>)', or '' when every cell has one."""
    bad = cells[cells["status"] != OK]
    if bad.empty:
        return ""
    counts = bad["status"].value_counts(sort=True)
    why = ", ".join(f"{n} {status}" for status, n in counts.items())
    errors = [e for e in bad["error"] if isinstance(e, str) and e]
    first = f": {errors[0]}" if errors else ""
    return f"{len(bad)} of {len(cells)} cells have no result ({why}{first})"


FAR_DEPTH = 5.0  # percentage points: a cell's actual depth this far from its row's is marked


def depth_note(cells) -> str:
    """Where the needle landed away from the requested depth, in one line ('' when nowhere):
    requested depths of one length that are one prompt position, and cells more than
    :data:`FAR_DEPTH` points from their row (the heatmap marks them with *)."""
    if "actual_depth" not in cells or cells.empty:
        return ""
    df = cells.dropna(subset=["actual_depth"]).drop_duplicates(["length", "depth"])
    parts = []
    for (length, actual), g in df.groupby(["length", "actual_depth"], sort=True):
        if g["depth"].nunique() > 1:
            asked = ", ".join(f"{d:g}" for d in sorted(g["depth"].unique()))
            parts.append(f"at {length} tokens depths {asked} % are one position ({actual:.1f} %)")
    far = df[(df["actual_depth"] - df["depth"]).abs() > FAR_DEPTH]
    if len(far):
        parts.append(
            f"* {len(far)} cell(s) placed more than {FAR_DEPTH:g} points from the requested depth"
        )
    return "; ".join(parts)


def no_result_note(cells, model: str | None = None, what: str = "needle") -> str:
    """Why the cells (of ``model``) give no pass/fail analysis, in a sentence, or '' when they do:
    there are none, none has a result (their statuses), or every one has the same outcome."""
    df = cells if model is None else cells[cells["model"] == model]
    whose = "" if model is None else f" of model '{model}'"
    if df.empty:
        return f"No {what} cells{whose} in this grid."
    ok = df[df["status"] == OK]
    if ok.empty:
        return f"No {what} cell{whose} has a result: {status_summary(df)}."
    passed = ok["passed"].astype(bool)
    if passed.all() or not passed.any():
        outcome = "passed" if passed.all() else "failed"
        return (
            f"Every {what} cell{whose} with a result {outcome} ({len(ok)} of {len(df)}): there is "
            "no pass/fail contrast for attention entropy to predict (AUROCs: —)."
        )
    return ""


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for predicting ``positives`` (ties count half).

    NaN when one class is empty. Equivalent to the Mann–Whitney U statistic / (n_pos · n_neg).
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positives, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def auroc_within(scores, positives, strata) -> float:
    """AUROC counting only (positive, negative) pairs in the same stratum: the pair-weighted mean
    of the per-stratum AUROCs (a stratified Mann–Whitney U). NaN when no stratum has both."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positives, dtype=bool)
    g = np.asarray(strata)
    wins = pairs = 0.0
    for value in np.unique(g):
        pos, neg = s[(g == value) & y], s[(g == value) & ~y]
        wins += (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        pairs += len(pos) * len(neg)
    return float(wins / pairs) if pairs else math.nan


ALL_METHODS = "(all methods)"


def _failure_stats(g) -> dict:
    """Pass rate, entropy of passed vs failed cells and the AUROCs of one group of ok cells."""
    passed = g["passed"].astype(bool)
    return {
        "cells": int(len(g)),
        "pass_rate": float(passed.mean()),
        "mean_score": float(g["score"].mean()),
        "entropy_passed": float(g.loc[passed, "mean_entropy"].mean()),
        "entropy_failed": float(g.loc[~passed, "mean_entropy"].mean()),
        "auroc_within_length": auroc_within(g["mean_entropy"], ~passed, g["length"]),
        "auroc_entropy_failure": auroc(g["mean_entropy"], ~passed),
        "auroc_length_failure": auroc(g["length"], ~passed),
    }


def summary_table(cells):
    """Per (model, method) and pooled per model: pass rate, entropy of passed vs failed cells and
    three AUROCs for predicting failure — mean entropy within each length (pairs of the same
    length only), mean entropy pooled over lengths, and context length alone. Entropy adds to
    length what the within-length AUROC shows; the pooled one mixes in length. ``cells`` counts
    the cells with a result, ``failed_status`` those without (a group of only those: NaN)."""
    import pandas as pd

    rows = []
    columns = ["model", "method", "cells", "failed_status", "pass_rate", "mean_score"]
    columns += ["entropy_passed", "entropy_failed", "auroc_within_length"]
    columns += ["auroc_entropy_failure", "auroc_length_failure"]
    groups = [((m, x), g) for (m, x), g in cells.groupby(["model", "method"], sort=True)]
    groups += [((m, ALL_METHODS), g) for m, g in cells.groupby("model", sort=True)]
    for (model, method), g in groups:
        ok = g[g["status"] == OK]
        stats = _failure_stats(ok)
        rows.append(
            {"model": model, "method": method, "cells": stats.pop("cells")}
            | {"failed_status": int(len(g) - len(ok))}
            | stats
        )
    return pd.DataFrame(rows, columns=columns)


def strata_table(cells):
    """The entropy–failure AUROC within strata: per model × length over all methods, and per
    model × method × length where that stratum has both passed and failed cells."""
    import pandas as pd

    ok = cells[cells["status"] == OK]
    rows = []
    for (model, length), g in ok.groupby(["model", "length"], sort=True):
        rows.append(_stratum(model, ALL_METHODS, length, g))
        for method, h in g.groupby("method", sort=True):
            if 0 < h["passed"].astype(bool).sum() < len(h):
                rows.append(_stratum(model, method, length, h))
    columns = ["model", "method", "length", "cells", "failures", "pass_rate"]
    columns += ["entropy_passed", "entropy_failed", "auroc_entropy_failure"]
    return pd.DataFrame(rows, columns=columns)


def _stratum(model, method, length, g) -> dict:
    stats = _failure_stats(g)
    return {
        "model": model,
        "method": method,
        "length": int(length),
        "cells": stats["cells"],
        "failures": int((~g["passed"].astype(bool)).sum()),
        "pass_rate": stats["pass_rate"],
        "entropy_passed": stats["entropy_passed"],
        "entropy_failed": stats["entropy_failed"],
        "auroc_entropy_failure": stats["auroc_entropy_failure"],
    }


def cpt_table(cells):
    """Per model × base method × continual-pretraining length (training-free: 0): mean entropy
    and pass rate, overall and beyond the shortest continual-pretraining length of that method."""
    import pandas as pd

    ok = cells[cells["status"] == OK].copy()
    ok["cpt"] = ok["cpt_length"].fillna(0).astype(int)
    rows = []
    for (model, base), g in ok.groupby(["model", "registry_method"], sort=True):
        trained = sorted(x for x in g["cpt"].unique() if x > 0)
        beyond = trained[0] if trained else int(g["pretrained_length"].iloc[0])
        for cpt, h in g.groupby("cpt", sort=True):
            far = h[h["length"] > beyond]
            rows.append(
                {
                    "model": model,
                    "registry_method": base,
                    "cpt_length": int(cpt),
                    "methods": ", ".join(sorted(h["method"].unique())),
                    "cells": int(len(h)),
                    "mean_entropy": float(h["mean_entropy"].mean()),
                    "pass_rate": float(h["passed"].mean()),
                    "beyond_length": beyond,
                    "mean_entropy_beyond": float(far["mean_entropy"].mean())
                    if len(far)
                    else math.nan,
                    "pass_rate_beyond": float(far["passed"].mean()) if len(far) else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=CPT_COLUMNS)


CPT_COLUMNS = ["model", "registry_method", "cpt_length", "methods", "cells", "mean_entropy"]
CPT_COLUMNS += ["pass_rate", "beyond_length", "mean_entropy_beyond", "pass_rate_beyond"]

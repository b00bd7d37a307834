"""Task cells (passkey, multi-key, multi-value, variable tracking) and their analysis.

A cell is one (task, model, method, length, depth): build the prompt (:mod:`ropelens.tasks`),
decode greedily with a KV cache and — as a needle cell does (:mod:`ropelens.retrieval`) — record
the attention of the answering queries (the last prompt token and every generated token): per
layer × head the entropy and the mass on each planted span. ``target_mass`` sums the spans that
hold the answer (the needle, the values, every hop of the chain), ``distractor_mass`` the
distractor needles (multi_key; null elsewhere), ``span_mass`` lists every span's own.

A cell that cannot run is still written with a ``status`` (``prompt_error``, ``oom``).
"""

from __future__ import annotations

import math

import numpy as np

from ropelens.retrieval import OK, auroc, auroc_within

DISTRACTOR = "distractor"


def run_cell(model, tokenizer, task, haystack, length: int, depth: float, settings: dict) -> dict:
    """Column lists of one task cell (without the grid/method columns)."""
    from ropelens import needle, tasks
    from ropelens.errors import DataError, is_out_of_memory
    from ropelens.retrieval import answer_recorded

    seed = tasks.cell_seed(task, length, depth, settings.get("seed", 0))
    fmt = needle.resolve_format(tokenizer, settings.get("format", "auto"))
    counts, overrides = tasks.cell_options(settings)
    try:
        prompt = tasks.build(tokenizer, task, haystack, length, depth, seed, fmt, counts, overrides)
    except DataError as e:
        return _failed_cell(task, depth, "prompt_error", str(e))
    spans = [(s.start, s.end) for s in prompt.spans]
    try:
        text, stats = answer_recorded(model, tokenizer, prompt, spans, length, settings)
    except Exception as e:
        if is_out_of_memory(e):
            error = str(e).strip().splitlines()[0]
            return _failed_cell(task, depth, "oom", error, prompt)
        raise
    return _rows(prompt, text, tasks.score(prompt, text), stats)


def _rows(prompt, text, graded, stats) -> dict:
    n = stats.num_rows
    masses = np.asarray(stats.column("span_mass").to_pylist(), dtype=float).reshape(n, -1)
    is_distractor = np.array([s.kind == DISTRACTOR for s in prompt.spans])
    target = masses[:, ~is_distractor].sum(axis=1)
    distractor = masses[:, is_distractor].sum(axis=1) if is_distractor.any() else None
    entropy = stats.column("entropy_mean").to_numpy()
    mean = lambda x: None if x is None else float(np.nanmean(x))  # noqa: E731
    return _cell_columns(prompt, n) | {
        "generated": [text] * n,
        "predicted": [graded.predicted] * n,
        "score": [graded.score] * n,
        "passed": [graded.passed] * n,
        "predicted_distractor": [graded.predicted_distractor] * n,
        "status": [OK] * n,
        "error": [None] * n,
        "mean_entropy": [mean(entropy)] * n,
        "mean_target_mass": [mean(target)] * n,
        "mean_distractor_mass": [mean(distractor)] * n,
        "answering_queries": stats.column("n_queries").to_pylist(),
        "layer": stats.column("layer").to_pylist(),
        "head": stats.column("head").to_pylist(),
        "entropy": entropy.tolist(),
        "target_mass": target.tolist(),
        "distractor_mass": [None] * n if distractor is None else distractor.tolist(),
        "span_mass": masses.tolist(),
    }


def _cell_columns(prompt, n: int) -> dict:
    """The prompt's columns (the same on every row)."""
    from ropelens.needle import DEFAULT_PLACEMENT

    spans = prompt.spans
    return {
        "task": [prompt.task] * n,
        "depth": [prompt.depth] * n,
        "actual_depth": [prompt.actual_depth] * n,
        "placement": [DEFAULT_PLACEMENT] * n,
        "prompt_tokens": [len(prompt.input_ids)] * n,
        "answer": [", ".join(prompt.answers)] * n,
        "distractor_answers": [", ".join(prompt.distractor_answers)] * n,
        "span_kind": [[s.kind for s in spans]] * n,
        "span_index": [[s.index for s in spans]] * n,
        "span_start": [[s.start for s in spans]] * n,
        "span_end": [[s.end for s in spans]] * n,
    }


def _failed_cell(task, depth, status, error, prompt=None) -> dict:
    """One row, no per-head statistics: the cell exists and says why it has no result."""
    if prompt is not None:
        base = _cell_columns(prompt, 1)
    else:
        base = {"task": [task], "depth": [float(depth)], "placement": [None]}
        for key in ("actual_depth", "prompt_tokens", "answer", "distractor_answers"):
            base[key] = [None]
        for key in ("span_kind", "span_index", "span_start", "span_end"):
            base[key] = [None]
    empty = ("generated", "predicted", "score", "mean_entropy", "mean_target_mass")
    empty += ("mean_distractor_mass", "answering_queries", "layer", "head", "entropy")
    empty += ("target_mass", "distractor_mass", "span_mass", "predicted_distractor")
    return (
        base
        | {k: [None] for k in empty}
        | {
            "passed": [False],
            "status": [status],
            "error": [error],
        }
    )


# --- aggregates -----------------------------------------------------------------------------------

CELL_KEYS = ["task", "model", "method", "length", "depth"]
HEAD_COLUMNS = ["layer", "head", "entropy", "target_mass", "distractor_mass", "span_mass"]


def _read(cell_paths):
    from ropelens import schemas
    from ropelens.io import read_cells

    return read_cells(cell_paths, schemas.TASKS).to_pandas()


def cell_frame(cell_paths):
    """One row per task cell (the per-head rows collapsed), with ``mean_span_mass``: each span's
    mass averaged over layers × heads (empty for a cell without statistics)."""
    df = _read(cell_paths)
    means = {}
    for key, g in df.groupby(CELL_KEYS, sort=False):
        rows = [np.asarray(m, dtype=float) for m in g["span_mass"] if m is not None]
        means[key] = np.mean(rows, axis=0).tolist() if rows else []
    cells = df.drop_duplicates(CELL_KEYS).drop(columns=HEAD_COLUMNS + ["answering_queries"])
    cells["mean_span_mass"] = [means[tuple(k)] for k in cells[CELL_KEYS].itertuples(index=False)]
    return cells.reset_index(drop=True)


def tables(cells) -> dict:
    """The task tables by file suffix: '' pass rates, '_entropy' entropy vs failure,
    '_distractors' multi_key distractor mass, '_hops' variable-tracking mass per hop."""
    return {
        "": pass_table(cells),
        "_entropy": entropy_table(cells),
        "_distractors": distractor_table(cells),
        "_hops": hop_table(cells),
    }


def pass_table(cells):
    """Per task × model × method × length: cells, cells without a result (``failed_status``),
    pass rate, mean score and mean entropy / target / distractor mass of the ok cells."""
    import pandas as pd

    rows = []
    for (task, model, method, length), g in cells.groupby(CELL_KEYS[:4], sort=True):
        ok = g[g["status"] == OK]
        rows.append(
            {"task": task, "model": model, "method": method, "length": int(length)}
            | {"cells": int(len(g)), "failed_status": int(len(g) - len(ok))}
            | {"pass_rate": _mean(ok["passed"]), "mean_score": _mean(ok["score"])}
            | {"mean_entropy": _mean(ok["mean_entropy"])}
            | {"mean_target_mass": _mean(ok["mean_target_mass"])}
            | {"mean_distractor_mass": _mean(ok["mean_distractor_mass"])}
        )
    columns = CELL_KEYS[:4] + ["cells", "failed_status", "pass_rate", "mean_score"]
    columns += ["mean_entropy", "mean_target_mass", "mean_distractor_mass"]
    return pd.DataFrame(rows, columns=columns)


def _mean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if len(x) and not np.isnan(x).all() else math.nan


def _groups(cells, task=None):
    """(task, model, method, ok cells) per method and pooled over methods (ALL_METHODS)."""
    from ropelens.retrieval import ALL_METHODS

    ok = cells[cells["status"] == OK]
    if task is not None:
        ok = ok[ok["task"] == task]
    out = [(t, m, x, g) for (t, m, x), g in ok.groupby(["task", "model", "method"], sort=True)]
    out += [(t, m, ALL_METHODS, g) for (t, m), g in ok.groupby(["task", "model"], sort=True)]
    return sorted(out, key=lambda r: r[:2])


def entropy_table(cells):
    """Per task × model × method (and all methods): pass rate, entropy of passed vs failed cells,
    AUROC of mean entropy for failure within each length and pooled, and of length alone
    (:func:`ropelens.retrieval.summary_table`'s columns)."""
    import pandas as pd

    from ropelens.retrieval import _failure_stats

    rows = [
        {"task": t, "model": m, "method": x} | _failure_stats(g) for t, m, x, g in _groups(cells)
    ]
    columns = ["task", "model", "method", "cells", "pass_rate", "mean_score", "entropy_passed"]
    columns += ["entropy_failed", "auroc_within_length", "auroc_entropy_failure"]
    return pd.DataFrame(rows, columns=columns + ["auroc_length_failure"])


def distractor_table(cells):
    """multi_key, per model × method (and all methods): mean attention mass on the true needle
    and on the distractors (summed over them) of passed vs failed cells, the distractor share
    distractor / (needle + distractor), the AUROC of distractor mass for failure (within each
    length and pooled) and the fraction of failures that answered a distractor's value."""
    import pandas as pd

    rows = []
    for _, model, method, g in _groups(cells, "multi_key"):
        y = ~g["passed"].astype(bool)
        d, t = g["mean_distractor_mass"].astype(float), g["mean_target_mass"].astype(float)
        share = d / (d + t)
        rows.append(
            {"model": model, "method": method, "cells": int(len(g)), "failures": int(y.sum())}
            | {"needle_mass_passed": _mean(t[~y]), "needle_mass_failed": _mean(t[y])}
            | {"distractor_mass_passed": _mean(d[~y]), "distractor_mass_failed": _mean(d[y])}
            | {"distractor_share_passed": _mean(share[~y])}
            | {"distractor_share_failed": _mean(share[y])}
            | {"auroc_distractor_within_length": auroc_within(d, y, g["length"])}
            | {"auroc_distractor_failure": auroc(d, y)}
            | {"failures_answering_a_distractor": _mean(g.loc[y, "predicted_distractor"])}
        )
    columns = ["model", "method", "cells", "failures"]
    return pd.DataFrame(rows, columns=None if rows else columns)


def hop_table(cells):
    """variable_tracking, per model × method (and all methods) × hop: mean attention mass of the
    answering queries on assignment ``hop`` (0 holds the number) in passed vs failed cells."""
    import pandas as pd

    rows = []
    for _, model, method, g in _groups(cells, "variable_tracking"):
        y = ~g["passed"].astype(bool).to_numpy()
        mass = np.array([list(m) for m in g["mean_span_mass"]], dtype=float)
        for hop in range(mass.shape[1] if mass.ndim == 2 else 0):
            rows.append(
                {"model": model, "method": method, "hop": hop, "cells": int(len(g))}
                | {"failures": int(y.sum()), "mass_passed": _mean(mass[~y, hop])}
                | {"mass_failed": _mean(mass[y, hop])}
            )
    columns = ["model", "method", "hop", "cells", "failures", "mass_passed", "mass_failed"]
    return pd.DataFrame(rows, columns=columns)

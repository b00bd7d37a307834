"""Every Parquet cell and table schema, declared once.

Cells carry their grid coordinates (model, method, length[, depth]) as columns as well as in their
hive-partitioned path, so a single file is self-describing. pyarrow readers of a whole tree should
give the partition types explicitly (``ropelens.io.dataset`` does; see docs/results.md).
"""

from __future__ import annotations

import pyarrow as pa

GRID = [
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("length", pa.int64()),
]

# hive partition fields of every cell path (depth, where present, is the file name)
PARTITIONING = pa.schema(GRID)

METHOD_INFO = [
    pa.field("rope_type", pa.string()),
    pa.field("factor", pa.float64()),
    pa.field("pretrained_length", pa.int64()),
    pa.field("cpt_length", pa.int64()),
]

PPL = pa.schema(
    GRID
    + METHOD_INFO
    + [
        pa.field("protocol", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("tokens", pa.int64()),
        pa.field("nll_sum", pa.float64()),
        pa.field("ppl", pa.float64()),
        pa.field("bin_tokens", pa.list_(pa.int64())),
        pa.field("bin_loss", pa.list_(pa.float64())),
    ]
)

PPL_TABLE = pa.schema(
    GRID
    + METHOD_INFO
    + [
        pa.field("documents", pa.int64()),
        pa.field("tokens", pa.int64()),
        pa.field("ppl", pa.float64()),
        pa.field("mean_doc_ppl", pa.float64()),
    ]
)

ATTENTION = pa.schema(
    GRID
    + METHOD_INFO
    + [
        pa.field("documents", pa.int64()),
        pa.field("query_window", pa.int64()),
        pa.field("layer", pa.int32()),
        pa.field("head", pa.int32()),
        pa.field("n_queries", pa.int64()),
        pa.field("entropy_mean", pa.float64()),
        pa.field("entropy_last", pa.float64()),
        pa.field("pos_mass", pa.list_(pa.float64())),
        pa.field("dist_mass", pa.list_(pa.float64())),
        pa.field("sink_tokens", pa.int64()),  # the first keys [0, sink_tokens)
        pa.field("sink_mass", pa.float64()),  # mean attention mass on them (attention sinks)
    ]
)

ATTENTION_SINKS = pa.schema(
    GRID
    + METHOD_INFO
    + [
        pa.field("layer", pa.string()),  # layer index, or "mean" over layers
        pa.field("sink_tokens", pa.int64()),
        pa.field("sink_mass", pa.float64()),  # mean over heads (and layers for "mean")
        pa.field("sink_mass_max", pa.float64()),  # the largest head's
    ]
)

ATTENTION_JS = pa.schema(
    GRID
    + METHOD_INFO
    + [
        pa.field("layer", pa.string()),  # layer index, or "mean" over layers
        pa.field("coordinates", pa.string()),  # "position" (k/L) or "distance" (log2 q - k)
        pa.field("reference", pa.string()),  # e.g. "rope at the pretrained length"
        pa.field("reference_model", pa.string()),
        pa.field("reference_method", pa.string()),
        pa.field("reference_length", pa.int64()),
        pa.field("js_head_averaged", pa.float64()),  # nats: JS of the head-averaged distributions
        pa.field("js_per_head", pa.float64()),  # nats: mean over heads of each head's JS
        pa.field("entropy_mean", pa.float64()),
    ]
)

NEEDLE = pa.schema(
    GRID
    + METHOD_INFO
    + [
        pa.field("registry_method", pa.string()),
        pa.field("prompt_format", pa.string()),  # plain or chat (ropelens.needle.frame)
        pa.field("depth", pa.float64()),
        pa.field("actual_depth", pa.float64()),
        pa.field("placement", pa.string()),  # the rule that placed the needle (needle.PLACEMENTS)
        pa.field("prompt_tokens", pa.int64()),
        pa.field("needle_start", pa.int64()),
        pa.field("needle_end", pa.int64()),
        pa.field("answer", pa.string()),
        pa.field("generated", pa.string()),
        pa.field("predicted", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("passed", pa.bool_()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("mean_entropy", pa.float64()),
        pa.field("mean_needle_mass", pa.float64()),
        pa.field("answering_queries", pa.int64()),
        pa.field("layer", pa.int32()),
        pa.field("head", pa.int32()),
        pa.field("entropy", pa.float64()),
        pa.field("needle_mass", pa.float64()),
    ]
)

# synthetic task cells (ropelens.tasks, ropelens.taskcells): the span_* lists are the planted
# sentences (the same on every row), span_mass each one's attention mass on that row's head
TASKS = pa.schema(
    GRID
    + METHOD_INFO
    + [
        pa.field("registry_method", pa.string()),
        pa.field("prompt_format", pa.string()),
        pa.field("task", pa.string()),  # ropelens.tasks.TASKS
        pa.field("depth", pa.float64()),
        pa.field("actual_depth", pa.float64()),  # where the first span landed
        pa.field("placement", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("answer", pa.string()),  # the expected value(s), ", "-joined
        pa.field("distractor_answers", pa.string()),  # the distractors' values (multi_key)
        pa.field("span_kind", pa.list_(pa.string())),  # needle, distractor, value, hop
        pa.field("span_index", pa.list_(pa.int64())),  # index among its kind (hop number)
        pa.field("span_start", pa.list_(pa.int64())),
        pa.field("span_end", pa.list_(pa.int64())),
        pa.field("generated", pa.string()),
        pa.field("predicted", pa.string()),  # numbers read from the generation, ","-joined
        pa.field("score", pa.float64()),
        pa.field("passed", pa.bool_()),
        pa.field("predicted_distractor", pa.bool_()),  # the first number is a distractor's
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("mean_entropy", pa.float64()),
        pa.field("mean_target_mass", pa.float64()),
        pa.field("mean_distractor_mass", pa.float64()),
        pa.field("answering_queries", pa.int64()),
        pa.field("layer", pa.int32()),
        pa.field("head", pa.int32()),
        pa.field("entropy", pa.float64()),
        pa.field("target_mass", pa.float64()),  # summed over the spans that hold the answer
        pa.field("distractor_mass", pa.float64()),  # summed over the distractor spans
        pa.field("span_mass", pa.list_(pa.float64())),  # per span, in span_* order
    ]
)

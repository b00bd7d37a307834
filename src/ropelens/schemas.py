"""Every Parquet cell and table schema, declared once.

Cells carry their grid coordinates (model, method, length[, depth]) as columns as well as in their
hive-partitioned path, so a single file is self-describing. Readers that use hive partitioning on
the whole tree should pass ``hive_partitioning=false`` or read these columns from the files (see
docs/results.md).
"""

from __future__ import annotations

import pyarrow as pa

GRID = [
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("length", pa.int64()),
]

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

"""Corpora: built-in offline text, local files or ``datasets``, materialised once as Parquet.

Built-in corpora are made from text that ships with Python itself, so the default workflow runs
with no network:

- ``stdlib``: the standard library's ``.py`` sources, one document per file (long, code-like text in
  the spirit of Proof-pile);
- ``pydoc``: the prose of ``pydoc_data.topics``, one document per topic (haystacks).

Documents get a deterministic train/validation/test split from a hash of their id, and the Parquet
file records provenance (Python version, file-list and content hashes) in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from pathlib import Path

from ropelens.errors import ConfigError, DataError

SPLITS = (("train", 80), ("validation", 90), ("test", 100))  # cumulative percent


def split_of(doc_id: str) -> str:
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 100
    return next(name for name, upto in SPLITS if bucket < upto)


def _stdlib_docs():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/site-packages/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield rel, text


def _pydoc_docs():
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield name, text


BUILTIN = {"stdlib": _stdlib_docs, "pydoc": _pydoc_docs}


def read_local(path: Path, column: str = "text"):
    """Yield (doc_id, text) from a .txt file, a folder of .txt files, .jsonl or .parquet."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        for f in files:
            yield f.relative_to(path).as_posix(), f.read_text(encoding="utf-8", errors="replace")
        return
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield path.name, path.read_text(encoding="utf-8", errors="replace")
    elif suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if line.strip():
                    row = json.loads(line)
                    if column not in row:
                        raise DataError(f"{path}: line {i + 1} has no '{column}' field")
                    yield str(row.get("id", i)), row[column]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise DataError(
                f"{path}: no column '{column}' (columns: {', '.join(table.column_names)})"
            )
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        for i, text in enumerate(table.column(column).to_pylist()):
            yield str(ids[i] if ids else i), text
    else:
        raise DataError(
            f"{path}: unsupported corpus format '{suffix}' (use .txt, .jsonl, .parquet)"
        )


def check_local(path: Path, corpus: dict, min_length: int, key: str) -> None:
    """DAG-time check: the file exists and holds a document of at least ``min_length`` chars."""
    if not path.exists():
        raise ConfigError(f"{key}: '{path}' does not exist; fix the path or create the file")
    if not path.is_dir() and path.stat().st_size > 512 * 2**20:
        return  # too large to scan at DAG-build time; the data rule checks it
    try:
        longest = max((len(text) for _, text in read_local(path, corpus["column"])), default=0)
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None
    if longest < min_length:
        raise ConfigError(
            f"{key}: no document is as long as the shortest requested length ({min_length} tokens; "
            f"longest document has {longest} characters); add longer documents or shorten lengths"
        )


def _dataset_docs(corpus: dict):
    from datasets import load_dataset

    ds = load_dataset(corpus["dataset"], corpus.get("name"), split=corpus["split"])
    if corpus["column"] not in ds.column_names:
        raise DataError(
            f"dataset {corpus['dataset']}: no column '{corpus['column']}' "
            f"(columns: {', '.join(ds.column_names)})"
        )
    for i, row in enumerate(ds):
        yield str(row.get("id", i)), row[corpus["column"]]


def build(corpus: dict, out: str | Path, base_dir: str | Path = ".") -> dict:
    """Materialise a corpus config entry as Parquet (doc_id, split, text). Returns provenance."""
    import pyarrow as pa

    from ropelens.io import write_table

    if "builtin" in corpus:
        docs = list(BUILTIN[corpus["builtin"]]())
        docs = [(d, t, split_of(d)) for d, t in docs]
        docs = [x for x in docs if x[2] == corpus.get("split", "test")]
        origin = {"builtin": corpus["builtin"], "python": platform.python_version()}
    elif "path" in corpus:
        path = Path(base_dir) / corpus["path"]
        docs = [(d, t, "all") for d, t in read_local(path, corpus.get("column", "text"))]
        origin = {"path": str(corpus["path"])}
    else:
        docs = [(d, t, corpus["split"]) for d, t in _dataset_docs(corpus)]
        origin = {
            "dataset": corpus["dataset"],
            "name": corpus.get("name"),
            "split": corpus["split"],
        }
    if corpus.get("max_documents"):
        docs = docs[: corpus["max_documents"]]
    if not docs:
        raise DataError(f"corpus {origin} has no documents")
    content = hashlib.sha256()
    for doc_id, text, _ in docs:
        content.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
    provenance = {
        **origin,
        "documents": len(docs),
        "file_list_sha256": hashlib.sha256("\n".join(d for d, _, _ in docs).encode()).hexdigest(),
        "content_sha256": content.hexdigest(),
    }
    table = pa.table(
        {
            "doc_id": [d for d, _, _ in docs],
            "split": [s for _, _, s in docs],
            "text": [t for _, t, _ in docs],
        }
    )
    write_table(table, out, metadata={"ropelens.provenance": json.dumps(provenance)})
    return provenance


def tokenize(corpus_parquet: str | Path, tokenizer_source: dict, out: str | Path) -> int:
    """Tokenise every document once per tokenizer: (doc_id, n_tokens, input_ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from ropelens.io import write_table
    from ropelens.models import _source_args

    name, kwargs = _source_args(tokenizer_source)
    tok = AutoTokenizer.from_pretrained(name, **kwargs)
    table = pq.read_table(corpus_parquet)
    texts = table.column("text").to_pylist()
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    out_table = pa.table(
        {
            "doc_id": table.column("doc_id"),
            "n_tokens": pa.array([len(x) for x in ids], pa.int64()),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
        }
    )
    meta = table.schema.metadata or {}
    write_table(out_table, out, metadata={k.decode(): v.decode() for k, v in meta.items()})
    return len(ids)

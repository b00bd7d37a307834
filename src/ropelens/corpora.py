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
    """Yield (doc_id, text) from a .txt file, a folder of .txt files, .jsonl or .parquet.

    A file that is not UTF-8, a JSONL line that is not a JSON object, or a text that is not a string
    is a :class:`DataError` naming the file and the line (or row)."""
    if path.is_dir():
        for f in sorted(path.rglob("*.txt")):
            yield f.relative_to(path).as_posix(), _read_text(f)
        return
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield path.name, _read_text(path)
    elif suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path, column)
    elif suffix == ".parquet":
        yield from _read_parquet(path, column)
    else:
        raise DataError(
            f"{path}: unsupported corpus format '{suffix}' (use .txt, .jsonl, .parquet)"
        )


def _read_text(path: Path) -> str:
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 (line {line}, byte {e.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8"
        ) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _read_jsonl(path: Path, column: str):
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(
                f"{path}: line {i} is not JSON ({e.msg}, column {e.colno}); "
                "JSONL needs one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i} is a {type(row).__name__}, not a JSON object")
        if column not in row:
            raise DataError(f"{path}: line {i} has no '{column}' field")
        yield str(row.get("id", i - 1)), _text(row[column], path, f"line {i}", column)


def _read_parquet(path: Path, column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if column not in table.column_names:
        raise DataError(f"{path}: no column '{column}' (columns: {', '.join(table.column_names)})")
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    for i, text in enumerate(table.column(column).to_pylist()):
        yield str(ids[i] if ids else i), _text(text, path, f"row {i}", column)


def _text(value, path: Path, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise DataError(f"{path}: {where}: '{column}' is {kind}, not a string; give each document text")


def check_local(path: Path, corpus: dict, min_length: int, key: str) -> None:
    """DAG-time check: the file exists and holds a document of at least ``min_length`` chars."""
    if not path.exists():
        raise ConfigError(f"{key}: '{path}' does not exist; fix the path or create the file")
    if not path.is_dir() and path.is_file() and path.stat().st_size > 512 * 2**20:
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

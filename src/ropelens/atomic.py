"""Atomic writes: every file and folder ropelens writes appears whole or not at all.

One scheme for all of them. The content goes to a temporary name in the destination's own folder,
``.<name>.<random>.tmp`` (hidden, unique per writer, so two jobs writing one output never share a
temp), which is then renamed over the destination (``os.replace``: atomic within a filesystem).
On any failure — an exception, Ctrl-C — the temp is removed and an existing destination is left
as it was. Only a process killed by a signal (SIGTERM, SIGKILL, a lost node) can leave a hidden
``.tmp`` behind; it is never read as a result.

A folder (a model directory) cannot be renamed over a non-empty one: the old folder is first
renamed aside (``.<name>.<random>.old``), the new one into place, then the old one removed, so the
destination is never half-written (between the two renames it is briefly absent).

fsync policy: none. The rename protects against this process failing and against readers seeing a
partial file, which is what a workflow needs; it does not make the data durable against a power
loss or kernel crash before the page cache is written back. That case is caught when the file is
next used: ``ropelens verify`` and the aggregates check every cell's footer and schema, preflight
checks model weight files against their headers. Syncing every cell, chart and checkpoint would
cost a disk flush per file on shared cluster filesystems for a failure those checks already catch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(out: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out`` (an empty file, or an empty folder with
    ``folder=True``) to write into; when the block ends without an error it replaces ``out``,
    otherwise it is removed and ``out`` is untouched. The destination's parent is created."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp make 0600/0700; results are shared like any file the umask allows
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
        if folder:
            _replace_folder(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def write_text(out: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``out`` atomically."""
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(out)


def _replace_folder(tmp: Path, out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = tmp.with_suffix(".old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

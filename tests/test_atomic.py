"""ropelens.atomic: an output appears whole or not at all; no other module renames by hand."""

import ast
import os
import re
import stat
from pathlib import Path

import pytest

from ropelens import atomic
from ropelens.atomic import atomic_path, write_text

SRC = Path(__file__).resolve().parents[1] / "src" / "ropelens"


class Boom(Exception):
    pass


def test_write_text_replaces_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "sub" / "a.md"  # the parent is created
    write_text(out, "old")
    write_text(out, "new — ünïcode")
    assert out.read_text(encoding="utf-8") == "new — ünïcode"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.md"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path, error):
    out = tmp_path / "t.csv"
    out.write_text("old")
    with pytest.raises(error), atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".t.csv.")
        assert tmp.name.endswith(".tmp")
        tmp.write_text("half a ta")
        raise error()
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_failure_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom), atomic_path(tmp_path / "new.parquet") as tmp:
        tmp.write_bytes(b"PAR1")
        raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_two_writers_get_their_own_temps(tmp_path):
    out = tmp_path / "x"
    with atomic_path(out) as a, atomic_path(out) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert out.read_text() == "a"  # the outer block ends last and wins
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_files_and_folders_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "f", "x")
        with atomic_path(tmp_path / "d", folder=True) as tmp:
            (tmp / "inside").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750  # not mkdtemp's 0700


def test_folder_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "model"
    with atomic_path(out, folder=True) as tmp:
        (tmp / "config.json").write_text("1")
        (tmp / "stale.bin").write_text("old weights")
    with atomic_path(out, folder=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "config.json").write_text("2")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_folder_failure_keeps_the_old_folder_and_no_temp(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(Boom), atomic_path(out, folder=True) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_bytes(b"\0" * 10)
        raise Boom()
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_folder_rename_failure_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"), atomic_path(out, folder=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_parquet_cell_failure_mid_write_keeps_the_old_cell(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ropelens.io import write_table

    out = tmp_path / "length=8.parquet"
    write_table(pa.table({"x": [1]}), out)
    real = pq.write_table

    def half(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", half)
    with pytest.raises(OSError):
        write_table(pa.table({"x": [2]}), out)
    monkeypatch.setattr(pq, "write_table", real)
    assert pq.read_table(out).column("x").to_pylist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def _renames_or_temps(path: Path) -> list[str]:
    """Calls that rename files or make temp names, and '.tmp' literals, in one source file
    (``x.replace(target)`` is Path.replace; ``str.replace`` takes two arguments)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, node.func.value
            on_os = isinstance(owner, ast.Name) and owner.id in ("os", "shutil", "tempfile")
            renames = name in ("rename", "mkstemp", "mkdtemp", "NamedTemporaryFile", "move")
            if renames or (name == "replace" and (on_os or len(node.args) == 1)):
                found.append((node.lineno, f"{path.name}:{node.lineno} {name}()"))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ".tmp" in node.value:
            found.append((node.lineno, f"{path.name}:{node.lineno} {node.value!r}"))
    return [hit for _, hit in sorted(found)]


#: temp names that are no write of a result: (module, call) -> why
NOT_WRITES = {
    ("preflight.py", "mkstemp()"): "a probe that a results folder is writable, deleted at once",
    ("runner_client.py", "mkdtemp()"): "a private folder for the runner's socket (issue 30)",
}


def test_no_module_writes_atomically_by_hand():
    """One scheme: every rename and temp name in src/ropelens is in ropelens.atomic (but the
    NOT_WRITES, which write no result)."""
    others = [p for p in sorted(SRC.glob("*.py")) if p.name != "atomic.py"]
    hits = [hit for p in others for hit in _renames_or_temps(p)]
    allowed = {f"{m}:{c}" for m, c in NOT_WRITES}
    assert [h for h in hits if re.sub(r":\d+ ", ":", h) not in allowed] == []
    assert len(hits) == len(NOT_WRITES)  # each exception is still there (or goes from here)


def test_the_checker_sees_a_hand_written_atomic_write(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('tmp = out.with_name(out.name + ".tmp")\ntmp.replace(out)\nos.rename(a, b)\n')
    assert [h.split(" ")[1] for h in _renames_or_temps(sample)] == [
        "'.tmp'",
        "replace()",
        "rename()",
    ]

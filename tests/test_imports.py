"""The import graph of src/ropelens has no cycle (issue 16); run `pytest tests/test_imports.py`.

Edges are read from the source with ast — every ``import ropelens.x`` and ``from ropelens[.x]
import``, at module level and inside functions alike (a deferred import is still a dependency).
The last known cycles (toy -> cli, toy -> config, and the plan-time checks -> config's grid
helpers) went with issue 16: the grid is ``ropelens.grid``, the toy zoo ``toydata`` / ``toytrain``
with its commands in cli and its train-block checks in config.

Plan time imports neither torch nor transformers (issue 27): loading the Snakefile, its input
functions, params and resources, and ``ropelens check-config``, each in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ropelens"
REPO = SRC.parents[1]


def import_graph(src: Path = SRC, top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the ropelens modules it imports."""
    modules = {p.stem for p in src.glob("*.py")}
    graph = {}
    for path in sorted(src.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = _executed_on_import(tree) if top_level_only else ast.walk(tree)
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module == "ropelens":
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ropelens."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ropelens.")}
        graph[path.stem] = deps - {path.stem, "__init__"}
    return graph


def _executed_on_import(node):
    """The nodes under ``node`` outside function bodies."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _executed_on_import(child)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"


def test_no_module_level_import_cycle_at_all():
    """What Python itself trips over: cycles of imports executed when a module is imported."""
    graph = import_graph(top_level_only=True)
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"


def test_the_checker_finds_a_deferred_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from ropelens import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from ropelens.c import x\n")
    (tmp_path / "c.py").write_text("import ropelens.a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycle(graph) == ["a", "b", "c", "a"]
    assert cycle(import_graph(tmp_path, top_level_only=True)) is None  # b's import is deferred


def test_the_library_never_imports_snakemake():
    """Snakemake is the `workflow` extra (pyproject.toml), not a dependency of the library."""
    found = []
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "snakemake"]
    assert found == []  # and tests/test_package.py: the wheel requires it only as an extra


# --- plan time: no torch, no transformers (issue 27) ----------------------------------------------
# Models whose own config must be read (a local directory, a cached hub config) do need
# transformers; here the hub cache is empty, so nothing may import either.
PROBE = """
import json, sys
from {module} import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def heavy_after(module: str, args: list[str], tmp_path: Path) -> list[str]:
    """torch / transformers as loaded after ``module``'s ``main(args)`` in a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", PROBE.format(module=module), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), proc.stderr[-3000:]
    return result["heavy"]


# hub models (paper.yaml) and models the workflow trains (zoo.yaml): no model config to read.
# config.yaml names the shipped zoo's directories, whose configs are read (transformers).
NO_LOCAL_MODELS = ["configs/paper.yaml", "configs/zoo.yaml"]


@pytest.mark.parametrize("configfile", NO_LOCAL_MODELS)
def test_check_config_imports_no_torch(configfile, tmp_path):
    args = ["check-config", str(REPO / configfile)]
    assert heavy_after("ropelens.cli", args, tmp_path) == []


@pytest.mark.workflow
@pytest.mark.parametrize("configfile", NO_LOCAL_MODELS)
def test_dry_run_imports_no_torch(configfile, tmp_path):
    """The whole plan, as `snakemake -n` makes it: the Snakefile, every input function, params
    and resources of every job (printed, so evaluated)."""
    args = ["-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1"]
    args += ["--configfile", str(REPO / configfile)]
    assert heavy_after("snakemake.cli", args, tmp_path) == []

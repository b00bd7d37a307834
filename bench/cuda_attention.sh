#!/usr/bin/env bash
# The CUDA checks of the streaming attention statistics, as one short run on a GPU machine:
# the attention tests (the CUDA ones run there), then bench/attention_stats.py on a 7B-shaped
# LLaMA (LLaMA-2-7B shapes, random bf16 weights) at 32K-128K tokens.
#
#     bash bench/cuda_attention.sh [OUTDIR]     # default bench/results/cuda
#
# Writes gpu.txt, tests.txt and one Markdown table per bench call into OUTDIR.
set -uo pipefail
out=${1:-bench/results/cuda}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tail -n 12 | tee "$out/tests.txt"

seven_b=(--device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 --layers 32
    --heads 32 --kv-heads 32 --vocab 32000 --repeat 1)
big=$((4 * 2**30))
# as the attention cells run: the last 1/16 of the queries counted, a GPU-sized chunk budget
timeout 240 $py bench/attention_stats.py "${seven_b[@]}" --lengths 32768 65536 131072 \
    --query-fraction 0.0625 --budget-bytes $big --timeout 200 --out "$out/q16.md"
# every query counted
timeout 100 $py bench/attention_stats.py "${seven_b[@]}" --lengths 32768 \
    --query-fraction 1 --budget-bytes $big --timeout 90 --out "$out/all_32k.md"
# the config's default budget (256 MiB): many small chunks
timeout 60 $py bench/attention_stats.py "${seven_b[@]}" --lengths 32768 \
    --query-fraction 0.0625 --timeout 50 --out "$out/q16_default_budget.md"
ls -l "$out"

#!/usr/bin/env bash
# The GPU measurements of the memory step, as one short script for a lent GPU machine (about 5 minutes
# on an H100): the CUDA tests, then bench/step_time.py at tiny-d12 (16 x 1024, the bank growing from
# 1.1B to 4.8B parameters, stored in bf16) and tiny-d20 (8 x 2048), each with the FFN memory rows read in
# place by the Triton gather-matmul and, side by side, gathered (gather_vs_copy). Each JSON line holds
# ratio_vs_dense_equal_flops (target <= 1.10), bank_growth_ratio (target <= 1.05) and dense_mfu.
#   bash bench/gpu_check.sh [PYTHON]
set -euo pipefail
PY=${1:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
"$PY" -m pytest -q tests/test_gpu.py tests/test_kernels.py tests/test_gather_matmul.py
"$PY" bench/step_time.py --device cuda --depth 12 --batch 16 --seq-len 1024 --steps 10 \
    --bank-dtype bfloat16 --branching 11,19
"$PY" bench/step_time.py --device cuda --depth 12 --batch 16 --seq-len 1024 --steps 10 --bank-dtype float32
"$PY" bench/step_time.py --device cuda --depth 20 --batch 8 --seq-len 2048 --steps 10 --bank-dtype bfloat16

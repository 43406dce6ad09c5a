#!/usr/bin/env bash
# One GPU session's work, prepared to run unattended: the GPU path and speed goals (gpu_check.py),
# then the recipe runs on the real data (run_recipes.py), each step bounded in time so that a slow
# or failing step leaves the others their share.
#     bash scripts/gpu_session.sh DATASET_DIR OUT_DIR [RUNS_JSON]
# Results: OUT_DIR/gpu_check/gpu_check.json, OUT_DIR/recipes/runs.jsonl (plus logs and plots).
set -uo pipefail
dataset_dir=$1
out=$2
runs=${3:-'{"ham128": {"config": ["configs/train_ham10000.json"]}, "ham64_e100": {"config": ["configs/train_ham10000.json"], "image_size": [64, 64], "max_epochs": 100}}'}
cd "$(dirname "$0")/.."
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout "${GPU_CHECK_TIMEOUT:-260}" python scripts/gpu_check.py --dataset_dir "$dataset_dir" \
    --work_dir "$out/gpu_check" --warm_rerun False --benchmark_epochs 2 || echo "gpu_check ended with $?"
timeout "${RECIPES_TIMEOUT:-300}" python scripts/run_recipes.py --dataset_dir "$dataset_dir" \
    --work_dir "$out/recipes" --runs "$runs" || echo "run_recipes ended with $?"

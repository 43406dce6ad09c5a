#!/usr/bin/env bash
# One GPU session's work, prepared to run unattended: the GPU path and speed goals (gpu_check.py),
# then the recipe runs on the real data (run_recipes.py), each step bounded in time so that a slow
# or failing step leaves the others their share.
#     bash scripts/gpu_session.sh DATASET_DIR OUT_DIR [RUNS_JSON]
# Results: OUT_DIR/gpu_check/gpu_check.json, OUT_DIR/recipes/runs.jsonl (plus logs and plots).
# Where a training step's time goes is measured right after gpu_check's first (30-epoch, ~160 s)
# training run, in ~1-2 minutes (most of it cuDNN tuning in the warm-up epoch): gpu_check.json's
# "profile" (the bundle's own trainer, 64 px, batch 512, handlers included: ms/step and img/s over 20
# steps; the synchronising CUDA calls left per step and their top 10 call sites; under torch.profiler
# the GPU's busy share of the wall, kernels per step, top 15 ops by self CPU and by self CUDA time),
# OUT_DIR/gpu_check/profile.txt (the same with torch's op tables) and profile_trace.json.gz beside it
# (3 steps, for Perfetto; left out if over 5 MiB). The two steps' timeouts sum to 560 s: one command.
set -uo pipefail
dataset_dir=$1
out=$2
# the default runs, in order of need: the 30-epoch 64 px goal with torch.compile (gpu_check's own run
# is the same without), then the recipe at 128 px with twice the steps (batch 256), then at 192 px
runs=${3:-'{"gpu64_compile": {"image_size": [64, 64], "max_epochs": 30, "compile": true}, "ham128_b256": {"config": ["configs/train_ham10000.json"], "batch_size": 256}, "ham192": {"config": ["configs/train_ham10000.json"], "image_size": [192, 192]}}'}
cd "$(dirname "$0")/.."
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout "${GPU_CHECK_TIMEOUT:-330}" python scripts/gpu_check.py --dataset_dir "$dataset_dir" \
    --work_dir "$out/gpu_check" --warm_rerun False --benchmark_epochs 2 --profile_steps 20 \
    || echo "gpu_check ended with $?"
timeout "${RECIPES_TIMEOUT:-230}" python scripts/run_recipes.py --dataset_dir "$dataset_dir" \
    --work_dir "$out/recipes" --runs "$runs" || echo "run_recipes ended with $?"

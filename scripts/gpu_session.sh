#!/usr/bin/env bash
# One GPU session's work, prepared to run unattended on the lent machine (torch preinstalled, no network),
# as one command of under 10 minutes:
#     bash scripts/gpu_session.sh DATASET_DIR OUT_DIR [RECIPES_JSON or a file holding it]
# 1. installs the carried wheels (WHEELS_DIR, default .whl: monai, pytorch-ignite, fire, termcolor);
# 2. runs the CUDA graph tests on the GPU (tests/test_cuda_graphs.py); should they fail, every training
#    falls back to the eager step (--cuda_graphs false);
# 3. scripts/gpu_check.py: the 30-epoch 64 px run from a cold cache (wall time, first step), the trainer
#    against the model alone at SPEED_SIZES, then the recipe variants (RECIPES_JSON, each over SEEDS;
#    SEEDS=None runs them as named, e.g. "<name>_s<seed>" each with its seed key, in that order), the
#    first alone, the others PARALLEL at a time (lowered to what the GPU's memory holds);
# 4. the out-of-distribution guard (scripts/evaluate_ood.py) on the first finished recipe's weights: its test
#    split against the near sets and the far sets, those in OOD_SETS (default .gpu/ood_sets, written where
#    scikit-image is installed by `python scripts/ood_sets.py --output_dir .gpu/ood_sets`) replacing the
#    built-in ones, the guard refitted with each statistics split and class weighting (--refit), and the guard's
#    share of a served batch's latency.
# Two kinds of session, for one 10-minute command each (seconds from the H200 session of 2026-12-04; an H100 is
# slower): the wheels and the graph tests take ~40 s, gpu_check.py's imports and datalist ~20 s, the guard ~100 s.
# - the speed session (issue 16), the defaults: the cold 30-epoch 64 px run (~90 s), the speed parts at 64, 128
#   and 224 px (~40 + 30 + 50 s), then the base 128 px recipe alone (~115 s with its evaluation):
#     bash scripts/gpu_session.sh .gpu/ham10000-200x150 $OUT
# - a levers session (issue 17): the recipes alone get gpu_check.py's ~400 s, the first alone, then PARALLEL at a
#   time; scripts/recipes/levers_128.json is in the order to run them (each lever over three seeds, and the
#   recipe without cuDNN autotuning), so each session takes the file's next runs:
#     EPOCHS=0 SPEED_SIZES=[] SEEDS=None bash scripts/gpu_session.sh .gpu/ham10000-200x150 $OUT scripts/recipes/levers_128.json
# Prepared here, in folders git ignores (.git/info/exclude) so that the device tool carries them (`carry`:
# [".whl", ".gpu"], about 50 MB of its 64 MiB): `pip download --no-deps -d .whl monai pytorch-ignite fire
# termcolor`, a copy of the dataset in .gpu/ham10000-200x150 (40 MB) and the far sets in .gpu/ood_sets (6 MB).
# GPU_CHECK_ARGS adds arguments to gpu_check.py (--require_cuda False rehearses the session on a CPU, as
# tests/test_gpu_check.py does); WORK_DIR (default /tmp/gpu_check) holds the runs.
# Results in OUT_DIR, seven files (the device tool brings back eight at most): gpu.txt, pytest.log, gpu_check.json
# and .log, ood.json and .log, runs.tgz (every run's histories, sidecars, metrics, plots and logs, finished or cut,
# and session/pip_freeze.txt and session/importtime.log: what a cold start imports). gpu_check.py saves after each
# part, so a step cut by CHECK_TIMEOUT leaves the earlier ones.
# Time limits: the whole script SESSION_S (580 s), gpu_check.py CHECK_TIMEOUT (430 s), the guard OOD_TIMEOUT (120 s);
# a step gets what is left of SESSION_S when that is less.
set -uo pipefail
dataset_dir=$1
out=$2
recipes=${3:-'{"ham128": {"config": ["configs/train_ham10000.json"]}}'}
[ -f "$recipes" ] && recipes=$(cat "$recipes")
cd "$(dirname "$0")/.."
mkdir -p "$out"
# the device tool ends a command at 600 s: each step's limit is cut to what is left of SESSION_S, keeping back
# the time of the steps after it, so that the guard's measurement and the archive always get their turn
deadline=$((SECONDS + ${SESSION_S:-580}))
within() {  # within LIMIT KEEP: the smaller of LIMIT and the seconds left after keeping KEEP back (at least 1)
    local left=$((deadline - SECONDS - $2))
    left=$((left < $1 ? left : $1))
    echo $((left < 1 ? 1 : left))
}
ood_limit=${OOD_TIMEOUT:-120}
export PYTHONUNBUFFERED=1
if [ -d "${WHEELS_DIR:-.whl}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${WHEELS_DIR:-.whl}"/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
# what every step needs, checked before any of them spends the session's minutes
if ! python3 -c "import monai, ignite, fire" || [ ! -d "$dataset_dir" ]; then
    echo "cannot run: monai, pytorch-ignite and fire must import (carry their wheels in ${WHEELS_DIR:-.whl}) and" \
        "the dataset folder $dataset_dir must exist (carry it)" | tee -a "$out/gpu.txt"
    exit 2
fi
work=${WORK_DIR:-/tmp/gpu_check}
mkdir -p "$work/session"
# the cold start's first 17 s are imports (docs/PERFORMANCE.md): what this environment makes MONAI import, and
# the cost of each module, taken beside the graph tests (the machine's other cores are idle then)
python3 -m pip freeze > "$work/session/pip_freeze.txt" 2>/dev/null &
python3 -X importtime -c "import monai.bundle, monai.handlers, bundle.training, bundle.handlers" \
    2> "$work/session/importtime.log" &
overrides='{}'
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tee "$out/pytest.log"
if [ "${PIPESTATUS[0]}" != 0 ]; then
    echo "CUDA graph tests failed: every training runs the eager step"
    overrides='{"cuda_graphs": false}'
fi
timeout "$(within "${CHECK_TIMEOUT:-430}" $((ood_limit + 15)))" python3 scripts/gpu_check.py --dataset_dir "$dataset_dir" --work_dir "$work" \
    --epochs "${EPOCHS:-30}" --evaluate False --speed_sizes "${SPEED_SIZES:-[64,128,224]}" \
    --speed_steps "${SPEED_STEPS:-30}" --recipes "$recipes" --seeds "${SEEDS:-[0,1,2]}" \
    --parallel "${PARALLEL:-4}" --train_overrides "$overrides" --recipe_timeout_s "${RECIPE_TIMEOUT:-400}" \
    ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_check.log"
cp "$work/gpu_check.json" "$out/" 2>/dev/null
first_run=$(head -n 1 "$work/recipes/runs.jsonl" 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["name"])' 2>/dev/null)
sets_dir=${OOD_SETS:-.gpu/ood_sets}
sets_arg=()
[ -f "$sets_dir/sets.json" ] && sets_arg=(--sets_dir "$sets_dir")
if [ -n "$first_run" ]; then
    timeout "$(within "$ood_limit" 10)" python3 scripts/evaluate_ood.py --dataset_dir "$dataset_dir" \
        --datalist "$work/recipes/datalist.json" --weights "$work/recipes/$first_run/models/model.pt" \
        "${sets_arg[@]}" --latency_batches 30 --refit true --output "$out/ood.json" 2>&1 \
        | tee "$out/ood.log"
else
    echo "no recipe run finished: the out-of-distribution guard is not measured" | tee "$out/ood.log"
fi
# the small files of every run, finished or cut: histories, sidecars, metrics, plots, logs; the session's own
wait
(cd "$work" && find . -name '*.json' -o -name '*.jsonl' -o -name '*.log' -o -name '*.png' -o -name '*.txt' \
    | grep -v /cache/ \
    | tar czf "$out/runs.tgz" -T -) 2>/dev/null
echo "gpu_session done"

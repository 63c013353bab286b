#!/usr/bin/env bash
# The CUDA path, run for real, as one command (README "GPU check"): the gpu-marked tests, then the benchmarks
# whose numbers the README and docs/BENCHMARKS.md report, each step under its own time limit, every output in
# one folder ($OUT, default results/device_check: <step>.txt and summary.txt with each step's status and time).
#
#   bash scripts/fetch_device_wheels.sh        # here, with the package registry: wheels/py312
#   bash scripts/device_check.sh               # on the GPU machine, from the repository root (about 8 minutes)
#   bash scripts/device_check.sh --dry-run     # here: the same steps on the CPU, tiny sizes (tests/test_device_check.py)
#
# On the GPU machine python3 (3.12) holds a CUDA torch; a venv that sees its packages gets the wheels it lacks
# (no index: the machine has no network) and segtrain without its dependencies, so that torch stays the machine's.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out=${OUT:-results/device_check}
mkdir -p "$out"
: > "$out/summary.txt"
failed=0

step() {  # step <name> <seconds> <command...>: output in $out/<name>.txt, a line in summary.txt
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    rc=$?
    [ $rc -ne 0 ] && failed=1
    echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
}

if [ $dry -eq 1 ]; then
    py=${PYTHON:-.venv/bin/python}
    data=$(mktemp -d)
    train_args=(--steps 2 --warmup 1 --batch-size 2 --size 64 --root "$data/bench" --only "cpu fp32")
    models=("model.encoder=resnet18")
    loss_args=(--shapes 2,3,32,32 --reps 1 --warmup 0 --no-peers)
    predict_args=(--sizes 96 --tile 64 --device cpu)
    eval_args=(--rounds 1 debug=fast "dataset.root=$data/eval")
else
    venv=/tmp/segtrain-venv
    python3 -m venv --system-site-packages "$venv"
    step setup 120 sh -c "'$venv/bin/pip' install --no-index --find-links wheels/py312 hydra-core omegaconf \
        antlr4-python3-runtime albumentations albucore pydantic monai && \
        '$venv/bin/pip' install --no-index --no-deps --no-build-isolation -e . && nvidia-smi"
    py=$venv/bin/python
    train_args=(--steps 10 --warmup 3 --batch-size 16 --size 512 --root data/synthetic_bench512)
    models=("model.encoder=resnet18" "model.encoder=resnet34" "model=deeplabv3plus model.encoder=resnet50")
    loss_args=()
    predict_args=(--sizes 4096 --device cuda)
    eval_args=(--rounds 5 trainer.device=cuda dataset.batch_size_val=32)
fi

export CUBLAS_WORKSPACE_CONFIG=:4096:8
step gpu_tests 200 "$py" -m pytest tests/test_gpu.py -m gpu -rs -q -p no:cacheprovider
for i in "${!models[@]}"; do
    # shellcheck disable=SC2086  # a model's overrides are several words
    step "bench_train_$i" 100 "$py" scripts/bench_train.py "${train_args[@]}" ${models[$i]}
done
step bench_losses 45 "$py" scripts/bench_losses.py "${loss_args[@]}"
step bench_predict 45 "$py" scripts/bench_predict.py "${predict_args[@]}"
step bench_eval 45 "$py" scripts/bench_eval.py "${eval_args[@]}"
[ $dry -eq 1 ] && rm -rf "$data"
echo "results in $out (summary.txt)"
exit $failed

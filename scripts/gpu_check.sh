#!/usr/bin/env bash
# One prepared check on a CUDA machine that already has PyTorch (run from the repository root):
# the GPU scenarios, the CUDA tests and a profile of the block-sparse backend. Everything lands in
# $OUT (default ./gpu-out): gpu-check.log and results.tgz (the result folders). Missing Python
# packages can come as wheels in ./.whl (scripts/fetch_gpu_wheels.sh; installed into /tmp/site).
# Each step has its own time limit, so a slow step cannot take the others' time; all together
# at most about 8.5 minutes (the device tool's limit per command is 10).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
RES=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")  # parallel tests where pytest-xdist is installed
step() {  # step SECONDS NAME COMMAND...: runs it under a limit, logs its time and exit status
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    step 60 env python3 -m sparsebench env
    step ${SCALING_S:-200} gpu-scaling python3 -m sparsebench run scenarios/gpu-scaling.yaml -o "$RES/gpu-scaling"
    step ${TESTS_S:-150} tests python3 -m pytest tests/test_cuda.py tests/test_decode.py -q -rf --tb=line -p no:cacheprovider $XDIST
    step ${TOUR_S:-90} gpu-tour python3 -m sparsebench run scenarios/gpu-tour.yaml -o "$RES/gpu-tour" --no-plots
    for mode in forward backward; do
        step 30 "profile $mode" python3 scripts/profile_case.py sliding_window '{"window": 1024}' --n 32768 \
            --device cuda --dtype bf16 --heads 16 --head-dim 128 --block 128 --mode $mode --rows 20
    done
} 2>&1 | tee "$OUT/gpu-check.log"
tar czf "$OUT/results.tgz" -C "$RES" .

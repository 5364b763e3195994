#!/usr/bin/env bash
# One prepared check on a CUDA machine that already has PyTorch (run from the repository root):
# the CUDA tests, the tile size of block_sparse's Triton kernels, the GPU scenarios. Everything
# lands in $OUT (default ./gpu-out): gpu-check.log and results/ (the result folders, written as
# the cases run). Missing Python packages can come as wheels in ./.whl
# (scripts/fetch_gpu_wheels.sh; installed into /tmp/site). Each step has its own time limit, so
# a slow step cannot take the others' time: about 9 minutes in all (the device tool's limit per
# command is 10). STEPS picks steps (default: all, in this order: tests tiles scaling tour rest);
# TESTS_S, TILES_S, SCALING_S, TOUR_S and REST_S set their limits in seconds (gpu-tour needs about
# 150 on an H200). Should block_sparse's tests fail (not merely run out of time), the later
# steps run it without Triton (SPARSEBENCH_TRITON=0), so that the other figures still come.
set -u
OUT=${OUT:-gpu-out}
RES=$OUT/results
mkdir -p "$RES"
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
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}
STEPS=" ${STEPS:-tests tiles scaling tour rest} "
want() { [[ $STEPS == *" $1 "* ]]; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    # the autotuner's choice does not change results: the tests take the first launch setting
    if want tests; then
        SPARSEBENCH_TRITON_TUNE=0 step ${TESTS_S:-110} "tests block_sparse" python3 -m pytest tests/test_cuda.py -q -rf \
            --tb=short -p no:cacheprovider -k "${TESTS_K:-block_sparse}" $XDIST
        rc=$?
        if [[ $rc != 0 && $rc != 124 ]]; then export SPARSEBENCH_TRITON=0; fi
    fi
    want tiles && step ${TILES_S:-45} tiles python3 scripts/triton_tiles.py --n 16384
    want scaling && step ${SCALING_S:-150} gpu-scaling python3 -m sparsebench run scenarios/gpu-scaling.yaml -o "$RES/gpu-scaling" --no-plots
    want tour && step ${TOUR_S:-170} gpu-tour python3 -m sparsebench run scenarios/gpu-tour.yaml -o "$RES/gpu-tour" --no-plots
    want rest && step ${REST_S:-60} "tests other" python3 -m pytest tests/test_cuda.py tests/test_decode.py -q -rf --tb=line \
        -p no:cacheprovider -k "not block_sparse" $XDIST
} 2>&1 | tee "$OUT/gpu-check.log"

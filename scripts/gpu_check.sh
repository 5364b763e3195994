#!/usr/bin/env bash
# One prepared check on a CUDA machine that already has PyTorch (run from the repository root):
# the CUDA tests, the GPU scenarios, the tile size of block_sparse's Triton kernels. Everything
# lands in $OUT (default ./gpu-out): gpu-check.log and results/ (the result folders, written as
# the cases run). Missing Python packages can come as wheels in ./.whl
# (scripts/fetch_gpu_wheels.sh; installed into /tmp/site). Each step has its own time limit, so
# a slow step cannot take the others' time: about 9 minutes in all (the device tool's limit per
# command is 10). STEPS picks steps, in this order (default: selected tests rest dynamic models):
# selected (the content-selected Triton kernels' tests), tests (block_sparse's other CUDA tests),
# rest (the other backends' CUDA tests, decode on CUDA), dynamic (scenarios/dynamic-gpu.yaml),
# models (scenarios/models-gpu.yaml at MODELS_N tokens, default 8192 32768), tiles, scaling
# (gpu-scaling.yaml), tour (gpu-tour.yaml); SELECTED_S, TESTS_S, REST_S, DYNAMIC_S, MODELS_S,
# TILES_S, SCALING_S and TOUR_S set their limits in seconds (gpu-tour needs about 160 on an H200);
# SELECTED_K and TESTS_K narrow the first two steps' tests (pytest -k).
# A failing test does not turn Triton off for the later steps: their figures are then the Triton
# kernels' or none (SPARSEBENCH_TRITON=0 set by hand runs the plain PyTorch path instead).
set -u
OUT=${OUT:-gpu-out}
RES=$OUT/results
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${XDIST_N:-8}")  # parallel tests where pytest-xdist is installed
step() {  # step SECONDS NAME COMMAND...: runs it under a limit, logs its time and exit status
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}
STEPS=" ${STEPS:-selected tests rest dynamic models} "
want() { [[ $STEPS == *" $1 "* ]]; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    # the autotuner's choice does not change results: the tests take the first launch setting
    cuda_tests() {  # cuda_tests SECONDS NAME FILES... -k EXPR
        local limit=$1 name=$2; shift 2
        SPARSEBENCH_TRITON_TUNE=0 step "$limit" "$name" python3 -m pytest "$@" -q -rf --tb=short -p no:cacheprovider $XDIST
    }
    want selected && cuda_tests ${SELECTED_S:-150} "tests block_sparse content-selected" tests/test_cuda.py -k "${SELECTED_K:-content_selected}"
    want tests && cuda_tests ${TESTS_S:-120} "tests block_sparse" tests/test_cuda.py -k "${TESTS_K:-block_sparse and not content_selected}"
    want rest && cuda_tests ${REST_S:-60} "tests other" tests/test_cuda.py tests/test_decode.py -k "not block_sparse and not content_selected and (cuda or not decode)"
    want dynamic && step ${DYNAMIC_S:-150} dynamic-gpu python3 -m sparsebench run scenarios/dynamic-gpu.yaml -o "$RES/dynamic-gpu" --no-plots
    if want models; then  # the model stacks at MODELS_N tokens only
        python3 -c "import sys, yaml; s = yaml.safe_load(open('scenarios/models-gpu.yaml')); \
s['seq_lens'] = [int(n) for n in sys.argv[2:]]; yaml.safe_dump(s, open(sys.argv[1], 'w'))" \
            "$OUT/models-gpu.yaml" ${MODELS_N:-8192 32768}
        step ${MODELS_S:-100} models-gpu python3 -m sparsebench run "$OUT/models-gpu.yaml" -o "$RES/models-gpu" --no-plots
    fi
    want tiles && step ${TILES_S:-45} tiles python3 scripts/triton_tiles.py --n 16384
    want scaling && step ${SCALING_S:-150} gpu-scaling python3 -m sparsebench run scenarios/gpu-scaling.yaml -o "$RES/gpu-scaling" --no-plots
    want tour && step ${TOUR_S:-170} gpu-tour python3 -m sparsebench run scenarios/gpu-tour.yaml -o "$RES/gpu-tour" --no-plots
} 2>&1 | tee "$OUT/gpu-check.log"

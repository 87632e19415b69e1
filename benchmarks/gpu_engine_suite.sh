#!/usr/bin/env bash
# Engine GPU suite, about 6 minutes on one H200 (step time limits add up to 660 s):
#   1. the gpu-marked engine tests (CUDA graphs vs eager, fp32 parity with HF on CUDA)
#   2. bench baseline  llama-3.1-8b bf16, torch reference attention, eager
#   3. bench decode    batch {1,8,32,64,128,256} x ctx {512,2048,8192} vs HBM roofline
#   4. bench prefill   512..16k tokens vs measured matmul peak
#   5. bench hf        pdserve vs HF transformers generate, same weights
#   6. bench profile   kernel time by category: decode 1x512, 64x2048 and prefill 8k
# Usage: benchmarks/gpu_engine_suite.sh OUTDIR   (run from the repository root; pdserve must
# be installed in $PYTHON's environment, e.g. `pip install -e .`, with triton and transformers)
# Writes OUTDIR/<step>.log and OUTDIR/results/...; a failing step does not stop the others.
# STEPS="decode prefill" runs only the named steps (default: all six).
# SMOKE=1 runs every step on the tiny preset with small grids (a CPU check of the script).
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_engine_suite.sh OUTDIR}
PYTHON=${PYTHON:-python3}
if [[ ${SMOKE:-0} == 1 ]]; then
    BASE=(--model tiny --prefill-tokens 128 --context 64 --iters 2)
    DEC=(--model tiny --batch-sizes 1,4 --contexts 64,128 --iters 2)
    PRE=(--model tiny --lengths 64,256 --iters 2)
    HF=(--model tiny --prompt-len 16 --new-tokens 8 --batch 4)
    PROF=(--model tiny --decode 1x64 --prefill 128 --iters 2)
else
    BASE=() DEC=(--iters 20) PRE=(--iters 3) HF=() PROF=()
fi
mkdir -p "$OUT/results"
cd "$(dirname "$0")/.." || exit 1

if ! "$PYTHON" -c "import pdserve.engine.llm_engine, pdserve.benchmarks.engine_bench" 2>"$OUT/import.log"; then
    echo "cannot import pdserve with $PYTHON (see $OUT/import.log); run 'pip install -e .' first" >&2
    exit 2
fi

STEPS=${STEPS:-tests baseline decode prefill hf profile}
declare -a SUMMARY=()
step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name: $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
    echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/$name.log"
}

{
    date -Is
    git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.log" 2>&1

step tests 240 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_cuda_graphs.py tests/test_models.py tests/test_loader.py tests/test_fused_model.py \
    tests/test_generate_parity.py tests/test_engine_batching.py tests/test_kernels_ops.py \
    tests/test_kernels_backend.py tests/test_kernels_attention.py tests/test_kernels_skinny.py
step baseline 60 "$PYTHON" -m pdserve.benchmarks.baseline "${BASE[@]}" --out "$OUT/results"
step decode 90 "$PYTHON" -m pdserve.benchmarks.decode "${DEC[@]}" --out "$OUT/results/decode"
step prefill 60 "$PYTHON" -m pdserve.benchmarks.prefill "${PRE[@]}" --out "$OUT/results/prefill"
step hf 90 "$PYTHON" -m pdserve.benchmarks.hf "${HF[@]}" --out "$OUT/results/hf"
step profile 120 "$PYTHON" -m pdserve.benchmarks.profile "${PROF[@]}" --out "$OUT/results/profile"

printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"

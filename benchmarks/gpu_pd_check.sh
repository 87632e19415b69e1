#!/usr/bin/env bash
# The P/D acceptance measurements on two GPUs of one host:
#   bash benchmarks/gpu_pd_check.sh OUTDIR [PART ...]      (default: every part, ~10 min)
# Parts (give some per call to stay under a call's time limit; same OUTDIR):
#   transfer  the transfer suite without TTFT (benchmarks/gpu_transfer_suite.sh,
#             SKIP_TTFT=1): peer copy (clock from finish(), and from start()), staged NCCL,
#             8 x 2k, UCX, at 512/2k/8k/32k against one raw NCCL send (~4 min)
#   tests     every GPU test (pytest -m "gpu or gpu2"): P/D parity, migration, transfer,
#             kernels, graphs (about 6 min since every CUDA engine captures prefill graphs:
#             give it a call of its own)
#   ttft      bench ttft --interleave at 512/2k/8k/32k (P/D and colocated over the same
#             seconds, ABBA), TTFT_ITERS requests per length (default 24)
#   decode    bench decode, batch 1 and 8 at 512 and 2k context, on the second GPU (the HBM
#             roofline measured in the same run)
# Carry .whl (and .ucxwhl for the UCX rows). Every multi-GPU step runs with
# NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1.
set -u
OUT=$(realpath -m "${1:?usage: gpu_pd_check.sh OUTDIR [transfer] [tests] [ttft] [decode]}")
shift
PARTS=" ${*:-transfer tests ttft decode} "
mkdir -p "$OUT"/{ttft,decode}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
PP=/tmp/xfer_suite:/tmp/site  # what the transfer suite installs
if [[ $PARTS == *" transfer "* ]]; then
  SKIP_TTFT=1 bash benchmarks/gpu_transfer_suite.sh "$OUT/transfer" 0,1
elif [ ! -d /tmp/xfer_suite ]; then  # a fresh machine: install as the suite does
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/xfer_suite .
fi
export PDSERVE_COMMIT=${PDSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
REPO=$(pwd)
if [[ $PARTS == *" tests "* ]]; then
  echo "=== gpu tests (${SECONDS}s in)"
  (cd /tmp && PYTHONPATH=$PP:/tmp/ucxsite timeout ${TESTS_TIMEOUT:-540} python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
    -m "gpu or gpu2" -rs "$REPO/tests" >"$OUT/gpu_tests.log" 2>&1)
  echo "--- gpu tests rc=$?"; grep -aE "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head; tail -3 "$OUT/gpu_tests.log"
fi
if [[ $PARTS == *" ttft "* ]]; then
  echo "=== ttft interleaved (${SECONDS}s in)"
  (cd /tmp && PYTHONPATH=$PP timeout 300 python3 -m pdserve.cli bench ttft --model llama-3.1-8b \
    --devices 0,1 --transfer nccl --input-lens 512,2048,8192,32768 --iters "${TTFT_ITERS:-24}" \
    --interleave --out "$OUT/ttft" >"$OUT/ttft/ttft.log" 2>&1); echo "--- ttft rc=$?"
  grep -aE "^\| (input_len|[0-9])|target" "$OUT/ttft/ttft.log" | head -20
fi
if [[ $PARTS == *" decode "* ]]; then
  echo "=== decode (${SECONDS}s in)"
  (cd /tmp && PYTHONPATH=$PP timeout 150 python3 -m pdserve.benchmarks.decode --device cuda:1 \
    --batch-sizes 1,8 --contexts 512,2048 --iters 20 --out "$OUT/decode" >"$OUT/decode/decode.log" 2>&1)
  echo "--- decode rc=$?"; grep -aE "^\| (batch|[0-9])" "$OUT/decode/decode.log" | head -8
fi
echo "check done in ${SECONDS}s"

#!/usr/bin/env bash
# The P/D acceptance measurements on two GPUs of one host, in one call (about 6 minutes):
#   bash benchmarks/gpu_pd_check.sh OUTDIR
# 1. the transfer suite without TTFT (benchmarks/gpu_transfer_suite.sh, SKIP_TTFT=1):
#    peer copy and staged NCCL at 512/2k/8k/32k and 8 x 2k against one raw NCCL send;
# 2. bench ttft --interleave at 512/2k/8k/32k (P/D and colocated over the same seconds,
#    ABBA), TTFT_ITERS requests per length (default 24);
# 3. bench decode, batch 1 and 8 at 512 and 2k context, on the second GPU (the HBM roofline
#    measured in the same run);
# 4. the transfer GPU tests (peer copy, event landing, row copy, KV target).
# Carry .whl (and .ucxwhl for the UCX rows). Every multi-GPU step runs with
# NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1.
set -u
OUT=$(realpath -m "${1:?usage: gpu_pd_check.sh OUTDIR}")
mkdir -p "$OUT"/{ttft,decode}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
SKIP_TTFT=1 bash benchmarks/gpu_transfer_suite.sh "$OUT/transfer" 0,1
PP=/tmp/xfer_suite:/tmp/site  # what the suite installed
echo "=== ttft interleaved (${SECONDS}s in)"
(cd /tmp && PYTHONPATH=$PP timeout 300 python3 -m pdserve.cli bench ttft --model llama-3.1-8b \
  --devices 0,1 --transfer nccl --input-lens 512,2048,8192,32768 --iters "${TTFT_ITERS:-24}" \
  --interleave --out "$OUT/ttft" >"$OUT/ttft/ttft.log" 2>&1); echo "--- ttft rc=$?"
grep -aE "^\| (input_len|[0-9])|target" "$OUT/ttft/ttft.log" | head -20
echo "=== decode (${SECONDS}s in)"
(cd /tmp && PYTHONPATH=$PP timeout 150 python3 -m pdserve.benchmarks.decode --device cuda:1 \
  --batch-sizes 1,8 --contexts 512,2048 --iters 20 --out "$OUT/decode" >"$OUT/decode/decode.log" 2>&1)
echo "--- decode rc=$?"; grep -aE "^\| (batch|[0-9])" "$OUT/decode/decode.log" | head -8
echo "=== gpu tests (${SECONDS}s in)"
REPO=$(pwd)
(cd /tmp && PYTHONPATH=$PP timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu \
  "$REPO/tests/test_kvtransfer_nccl.py" "$REPO/tests/test_kvtransfer_row_copy.py" \
  "$REPO/tests/test_kv_target.py" >"$OUT/gpu_tests.log" 2>&1); echo "--- gpu tests rc=$?"
tail -3 "$OUT/gpu_tests.log"
echo "check done in ${SECONDS}s"

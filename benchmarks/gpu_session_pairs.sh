#!/usr/bin/env bash
# One call of the device tool on a 4-GPU machine, two jobs side by side:
#   GPUs 0,1: the 2-GPU capstone (benchmarks/gpu_capstone.sh, about 9 minutes);
#   GPUs 2,3: the transfer reference suite (benchmarks/gpu_transfer_suite.sh), a transfer
#             variant with whole-staging messages, the decode step bench on one GPU with
#             overlap off/on, and the demo's warm-start line (tiny model) on the pair.
#   bash benchmarks/gpu_session_pairs.sh OUTDIR
# Carry .whl, .mplwhl and .ucxwhl. Logs land in OUTDIR/{cap2,xfer,decode,demo}.
set -u
OUT=$(realpath -m "${1:?usage: gpu_session_pairs.sh OUTDIR}")
mkdir -p "$OUT"/{decode,demo,variant}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n
WALL_S=${WALL_S:-540} bash benchmarks/gpu_capstone.sh "$OUT/cap2" 0,1 >"$OUT/cap2.log" 2>&1 &
CAP=$!
{
  BUDGET_S=270 bash benchmarks/gpu_transfer_suite.sh "$OUT/xfer" 2,3
  export CUDA_VISIBLE_DEVICES=2,3 PYTHONPATH=/tmp/xfer_suite:/tmp/site
  cd /tmp || exit 1
  echo "=== variant: whole staging buffers as messages (--min-message-mib 64)"
  timeout 45 python3 -m pdserve.cli bench transfer --device cuda --geometry llama-3.1-8b \
    --iters 8 --backend nccl --input-lens 512,2048,8192 --min-message-mib 64 \
    --out "$OUT/variant" 2>&1 | grep -aE "^\| (input_len|[0-9])"
  echo "=== decode step, overlap off/on (GPU 2)"
  CUDA_VISIBLE_DEVICES=2 timeout 120 python3 -m pdserve.benchmarks.decode \
    --batch-sizes 1,8,64 --contexts 512,2048 --out "$OUT/decode" >"$OUT/decode/decode.log" 2>&1
  grep -aE "^\| (batch|[0-9])" "$OUT/decode/decode.log" || tail -20 "$OUT/decode/decode.log"
  echo "=== demo (tiny model) on GPUs 2,3: warm start"
  timeout 100 python3 -m pdserve.cli demo --model tiny --devices 0,1 >"$OUT/demo/demo.log" 2>&1
  grep -aE "warm start|PASS|FAIL|TTFT" "$OUT/demo/demo.log" | tail -6
} >"$OUT/pair23.log" 2>&1
wait $CAP
cat "$OUT/pair23.log"
echo "=== capstone 2 GPUs"; tail -60 "$OUT/cap2.log"

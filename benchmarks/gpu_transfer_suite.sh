#!/usr/bin/env bash
# The KV transfer reference measurement on two GPUs of one host, in under 5 minutes:
#   bash benchmarks/gpu_transfer_suite.sh OUTDIR [GPU_PAIR]        (GPU_PAIR default 0,1)
# 1. bench transfer, llama-3.1-8b at 512/2k/8k/32k, as workers move KV on one host (peer
#    copy: CUDA IPC into the receiver's pool), against one raw NCCL send of the same bytes;
#    constrained fits and the physical line (peer-to-peer copy_ measured in the same run)
#    (the clock starts at finish(), start() called before, as workers do: --start ahead),
#    and again with start() on the clock (--start with-finish)
# 2. the same through NCCL with staging (--no-peer-copy): what goes between hosts
# 3. both with --concurrency 8 at 2k (aggregate vs one raw send of all 8 requests' bytes)
# 4. bench transfer, ucx on cuda (ucxx device memory, staged), same lengths; skipped with
#    the reason when ucxx does not import; UCX's protocol choice goes to ucx/proto.txt
# 5. bench ttft at 512/2k/8k/32k (P/D against colocated) in what is left of BUDGET_S
#    (at least 120 s), then at 512 and 2k again with SHORT_ITERS requests (default 100:
#    their TTFT is launch-bound and moves with the host, medians of few requests are noise);
#    SKIP_TTFT=1 leaves both out
# Runs this tree installed into /tmp (so ./pdserve does not shadow it) with the runtime
# wheels of .whl, the ucxx-cu13 set of .ucxwhl and, without matplotlib, .mplwhl.
# Writes OUTDIR/{peercopy,peercopy_start,peercopy_c8,nccl,nccl_c8,ucx,ttft,ttft_short}/ (each NAME.log + csv/md/png) and OUTDIR/env.txt,
# and prints every table.
set -u
OUT=$(realpath -m "${1:?usage: gpu_transfer_suite.sh OUTDIR [GPU_PAIR]}")
PAIR=${2:-0,1}
BUDGET_S=${BUDGET_S:-290}  # the whole suite; bench ttft gets what is left of it (>= 120 s)
mkdir -p "$OUT"/{peercopy,peercopy_start,peercopy_c8,nccl,nccl_c8,ucx,ttft,ttft_short}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n CUDA_VISIBLE_DEVICES=$PAIR
wheels() {  # wheels DIR TARGET: install DIR/*.whl into TARGET (no index, no deps)
  ls "$1"/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$2" "$1"/*.whl >>"$OUT/env.txt" 2>&1
}
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  echo "CUDA_VISIBLE_DEVICES=$PAIR"; } >"$OUT/env.txt" 2>&1
wheels .whl /tmp/site
python3 -c "import matplotlib" 2>/dev/null || wheels .mplwhl /tmp/site  # the PNGs need it
wheels .ucxwhl /tmp/ucxsite
rm -rf /tmp/xfer_suite  # this tree, installed afresh (a warm machine may hold an older one)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/xfer_suite . \
  >>"$OUT/env.txt" 2>&1 || echo "install of this tree failed: see env.txt"
export PDSERVE_COMMIT=${PDSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PP=/tmp/xfer_suite:/tmp/site
UCX_OK=1
UCX_WHY=$(cd /tmp && PYTHONPATH=$PP:/tmp/ucxsite python3 -c \
  "import ucxx; from ucxx._lib import libucxx; print('ucxx', ucxx.__version__)" 2>&1) || UCX_OK=0
echo "$UCX_WHY" | tail -1 >>"$OUT/env.txt"
(cd /tmp && PYTHONPATH=$PP python3 -c "import matplotlib" 2>/dev/null) \
  || echo "no matplotlib: no PNG" >>"$OUT/env.txt"
cat "$OUT/env.txt"
step() {  # step NAME TIMEOUT_S PYTHONPATH ARGS...: one benchmark into OUT/NAME/
  local name=$1 t=$2 pp=$3; shift 3
  echo "=== $name ($(date +%T), ${SECONDS}s in, limit ${t}s)"
  (cd /tmp && PYTHONPATH=$pp timeout "$t" python3 -m pdserve.cli "$@" --out "$OUT/$name" \
    >"$OUT/$name/$name.log" 2>&1); local rc=$?
  echo "--- $name rc=$rc$([ $rc = 124 ] && echo ' (timed out)')"
  grep -aE "^\| (input_len|[0-9])|^fit |^physical|^no physical|^fitted" "$OUT/$name/$name.log" \
    || tail -n 15 "$OUT/$name/$name.log"
}
XFER="bench transfer --device cuda --geometry llama-3.1-8b --iters 20 --warmup 3"
LENS=512,2048,8192,32768
step peercopy 60 "$PP" $XFER --backend nccl --input-lens $LENS
# the same with start() timed too (called with finish(), not before the forward)
step peercopy_start 60 "$PP" $XFER --backend nccl --input-lens $LENS --start with-finish
step nccl 60 "$PP" $XFER --backend nccl --input-lens $LENS --no-peer-copy
step peercopy_c8 45 "$PP" $XFER --backend nccl --input-lens 2048 --concurrency 8
step nccl_c8 45 "$PP" $XFER --backend nccl --input-lens 2048 --concurrency 8 --no-peer-copy
if [ $UCX_OK = 1 ]; then
  UCX_PROTO_INFO=y step ucx 60 "$PP:/tmp/ucxsite" $XFER --backend ucx --input-lens $LENS \
    --no-peer-copy
  grep -aiE "ucp_context|cuda_ipc|cuda_copy|zero-copy|rendezvous|rndv" "$OUT/ucx/ucx.log" \
    | head -n 60 >"$OUT/ucx/proto.txt"
  echo "UCX protocols chosen (ucx/proto.txt):"; head -n 12 "$OUT/ucx/proto.txt"
else
  echo "=== ucx skipped: ucxx does not import: $(echo "$UCX_WHY" | tail -1)" | tee "$OUT/ucx/ucx.log"
fi
left=$((BUDGET_S - SECONDS)); [ $left -lt 120 ] && left=120  # two cluster starts need it
if [ "${SKIP_TTFT:-0}" = 0 ]; then
  step ttft $left "$PP" bench ttft --model llama-3.1-8b --devices 0,1 --transfer nccl \
    --input-lens $LENS --iters 8
  step ttft_short 150 "$PP" bench ttft --model llama-3.1-8b --devices 0,1 --transfer nccl \
    --input-lens 512,2048 --iters "${SHORT_ITERS:-100}"
else
  echo "=== ttft skipped (SKIP_TTFT)" | tee "$OUT/ttft/ttft.log"
fi
echo "suite done in ${SECONDS}s"
exit 0

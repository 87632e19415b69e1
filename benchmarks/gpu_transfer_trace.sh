#!/usr/bin/env bash
# Profile of the transfer path on two GPUs: bench transfer (nccl) with PDSERVE_KV_TRACE on,
# at 512/2k/32k and 8 x 2k, then the per-step timelines (transfer_trace.py), the row-copy
# GPU tests and one 512-token request event by event. Per-message GPU and host costs:
# `python -m pdserve.benchmarks.transfer_micro` (one GPU).
#   bash benchmarks/gpu_transfer_trace.sh OUTDIR
set -u
OUT=$(realpath -m "${1:?usage: gpu_transfer_trace.sh OUTDIR}")
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUT/env.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
rm -rf /tmp/xfer_trace
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/xfer_trace . \
  >/dev/null 2>&1 || echo "install failed"
PP=/tmp/xfer_trace:/tmp/site
run() {  # run NAME ARGS...
  local name=$1; shift
  mkdir -p "$OUT/$name"
  echo "=== $name ($SECONDS s)"
  (cd /tmp && PDSERVE_KV_TRACE=$OUT/$name/tr PYTHONPATH=$PP timeout 90 python3 -m pdserve.cli \
    bench transfer --device cuda --geometry llama-3.1-8b --backend nccl --out "$OUT/$name" "$@" \
    >"$OUT/$name/log" 2>&1) || echo "rc=$?"
  grep -aE "^\| (input_len|[0-9])|^fit " "$OUT/$name/log" || tail -5 "$OUT/$name/log"
  (cd /tmp && PYTHONPATH=$PP python3 -m pdserve.benchmarks.transfer_trace "$OUT/$name/tr")
}
run one --input-lens 512,2048,32768 --iters 8 --warmup 2 ${EXTRA:-}
run c8 --input-lens 2048 --concurrency 8 --iters 6 --warmup 2 ${EXTRA:-}
echo "=== gpu tests ($SECONDS s)"
REPO=$PWD  # pytest from /tmp: the repository's ./pdserve would shadow the installed tree
(cd /tmp && PYTHONPATH=$PP timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
  "$REPO/tests/test_kvtransfer_row_copy.py" 2>&1 | tail -3)
(cd /tmp && PYTHONPATH=$PP python3 -m pdserve.benchmarks.transfer_trace "$OUT/one/tr" --window 32)
echo "done in $SECONDS s"

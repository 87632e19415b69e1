#!/usr/bin/env bash
# Cluster-level checks on a lent machine of 3+ GPUs: the demo on two GPUs (P/D == colocated,
# warm start), migration over NCCL after kill -9 of a decode worker (3 GPUs), the NCCL
# transfer tests. Carry the runtime wheels in .whl (grpcio, protobuf, msgpack, xxhash, uvloop).
#   bash benchmarks/gpu_cluster_check.sh OUTDIR
set -u
OUT=$(realpath -m "${1:?usage: gpu_cluster_check.sh OUTDIR}"); REPO=$(pwd)
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/new . \
  >"$OUT/install.log" 2>&1 || { echo "install failed"; tail -5 "$OUT/install.log"; }
export PYTHONPATH=/tmp/new:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd /tmp  # the repository's ./pdserve would shadow the installed tree
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1; echo "--- $name rc=$?"
  grep -v "capturing\|it/s]" "$OUT/$name.log" | tail -n 14
}
step demo 240 python3 -m pdserve.cli demo --model tiny --devices auto
step migration 300 python3 -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" \
  "$REPO/tests/test_e2e_migration.py" -k nccl
step nccl_tests 200 python3 -m pytest -q -p no:cacheprovider -rs --rootdir "$REPO" \
  "$REPO/tests/test_kvtransfer_nccl.py"

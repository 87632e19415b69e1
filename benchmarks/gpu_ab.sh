#!/usr/bin/env bash
# A/B on the lent GPU machine: the same command against a baseline tree and this tree.
#   bash benchmarks/gpu_ab.sh OUTDIR BASELINE_TREE NAME "ARGS" [NAME "ARGS"]...
# Runs `python3 -m pdserve.cli ARGS --out OUTDIR/<tree>_NAME` for tree in old, new, old, new
# (from /tmp, so that the repository's ./pdserve does not shadow the installed trees) and
# prints each log's table rows. Carry the runtime wheels in .whl (grpcio, msgpack, ...).
# TREES="new new" runs only this tree.
set -u
OUT=$(realpath -m "${1:?usage: gpu_ab.sh OUTDIR BASELINE_TREE NAME ARGS ...}")
OLD=$(realpath "${2:?baseline tree}"); shift 2
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
for t in new old; do
  src=.; [ $t = old ] && src=$OLD
  [ -d /tmp/$t/pdserve ] || python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target /tmp/$t "$src" >"$OUT/install_$t.log" 2>&1 || echo "install $t failed"
done
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
while [ $# -ge 2 ]; do
  name=$1; args=$2; shift 2
  for t in ${TREES:-old new old new}; do
    n=0; while [ -e "$OUT/${t}_${name}_$n.log" ]; do n=$((n + 1)); done
    tag=${t}_${name}_$n
    (cd /tmp && PYTHONPATH=/tmp/$t:/tmp/site timeout 280 python3 -m pdserve.cli $args \
      --out "$OUT/$tag" >"$OUT/$tag.log" 2>&1); echo "--- $tag rc=$?"
    grep -E "^\| *[0-9]" "$OUT/$tag.log" | head -8
  done
done

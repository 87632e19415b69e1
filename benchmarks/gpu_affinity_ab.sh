#!/usr/bin/env bash
# bench transfer (nccl) with and without CPU affinity to the GPU's NUMA node, alternating,
# plus the baseline tree (.old) once; ROUNDS (default 3) rounds.
#   bash benchmarks/gpu_affinity_ab.sh OUTDIR
set -u
OUT=$(realpath -m "${1:?usage: gpu_affinity_ab.sh OUTDIR}")
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi topo -m | tee "$OUT/topo.txt"; lscpu | grep -i "numa\|model name" | tee -a "$OUT/topo.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
for t in new old; do src=.; [ $t = old ] && src=.old
  rm -rf /tmp/$t; python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/$t $src >/dev/null 2>&1
done
X="bench transfer --backend nccl --device cuda --geometry llama-3.1-8b --iters 8 ${XARGS:-}"
one() {  # one TAG TREE AFFINITY ARGS...
  local tag=$1 tree=$2 aff=$3; shift 3
  (cd /tmp && PDSERVE_CPU_AFFINITY=$aff PYTHONPATH=/tmp/$tree:/tmp/site timeout 120 python3 -m pdserve.cli \
    $X "$@" --out "$OUT/$tag" >"$OUT/$tag.log" 2>&1); echo "--- $tag rc=$? $(grep -a 'cpu affinity' "$OUT/$tag.log")"
  grep -aE "^\| *[0-9]" "$OUT/$tag.log" | cut -d'|' -f2,4,8 | tr '\n' ' '; echo
}
for r in $(seq 1 ${ROUNDS:-3}); do
  one pin_$r new on --input-lens 512,2048,8192,32768
  one nopin_$r new off --input-lens 512,2048,8192,32768
  one c8pin_$r new on --input-lens 2048 --concurrency 8
  one c8nopin_$r new off --input-lens 2048 --concurrency 8
done
one old_1 old on --input-lens 512,2048,8192,32768
one c8old_1 old on --input-lens 2048 --concurrency 8
echo "done in $SECONDS s"

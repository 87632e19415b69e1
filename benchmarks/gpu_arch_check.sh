#!/usr/bin/env bash
# Same-run check that a change left the engine no slower: decode and prefill benchmarks of a
# baseline tree and of this tree, interleaved on the same GPUs, plus the 2-GPU demo.
#   bash benchmarks/gpu_arch_check.sh OUTDIR BASELINE_TREE
# BASELINE_TREE is an exported older commit (git archive). Needs 2 GPUs for the demo.
set -u
OUT=$(realpath -m "${1:?usage: gpu_arch_check.sh OUTDIR BASELINE_TREE}")
OLD=$(realpath "${2:?baseline tree}"); REPO=$(pwd)
mkdir -p "$OUT"
# Installed trees run from /tmp: in the repository root, ./pdserve would shadow them.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
for t in new old; do
  src=.; [ $t = old ] && src=$OLD
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/$t "$src" \
    >"$OUT/install_$t.log" 2>&1 || { echo "install $t failed"; tail -5 "$OUT/install_$t.log"; }
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
DEC="-m pdserve.benchmarks.decode --batch-sizes 1,64 --contexts 512,2048 --iters 20"
PRE="-m pdserve.benchmarks.prefill --lengths 512,8192 --iters 3"
run() {  # run TREE GPU NAME ARGS...
  local tree=$1 gpu=$2 name=$3; shift 3
  (cd /tmp && CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH=/tmp/$tree:/tmp/site timeout 240 \
    python3 "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1)
  echo "--- $name rc=$?"; grep -E "^\s*[0-9]|ratio|TFLOP|ms" "$OUT/$name.log" | tail -8
}
# round 1: old on GPU 0, new on GPU 1; round 2 swapped (each pair runs at once)
for round in 1 2; do
  if [ $round = 1 ]; then go=0; gn=1; else go=1; gn=0; fi
  run old $go dec_old_$round $DEC & run new $gn dec_new_$round $DEC & wait
  run old $go pre_old_$round $PRE & run new $gn pre_new_$round $PRE & wait
done
echo "=== demo (2 GPUs, this tree)"
(cd /tmp && PYTHONPATH=/tmp/new:/tmp/site timeout 300 python3 -m pdserve.cli demo \
  --devices auto >"$OUT/demo.log" 2>&1); echo "--- demo rc=$?"; tail -30 "$OUT/demo.log"
echo "=== gpu tests (this tree)"
(cd /tmp && PYTHONPATH=/tmp/new:/tmp/site timeout 400 python3 -m pytest -q -p no:cacheprovider \
  -m "gpu or gpu2" -rs --timeout 120 --rootdir "$REPO" "$REPO/tests" >"$OUT/gpu_tests.log" 2>&1)
echo "--- gpu tests rc=$?"; tail -15 "$OUT/gpu_tests.log"

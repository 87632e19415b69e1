#!/usr/bin/env bash
# GPU suite for a lent 2-GPU machine (torch/triton from the image; ucxx carried as wheels).
#   bash benchmarks/gpu_suite.sh OUTDIR [setup] [tests] [nccltests] [kernels] [skinny] [transfer] [ttft] [engine]
# Each part writes a log and its results under OUTDIR; a part's failure does not stop the rest.
set -u
OUT=${1:?usage: gpu_suite.sh OUTDIR [parts...]}; shift
PARTS=${*:-setup tests nccltests kernels transfer ttft engine}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "pip install -e . failed"; tail -20 "$OUT/install.log"; }
PD="python3 -m pdserve.cli"
part() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "--- $name rc=$rc"; tail -n 25 "$OUT/$name.log" | grep -v "it/s]$"
}
if part setup; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m | head -5
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())"
  python3 -c "import ucxx; print('ucxx', ucxx.__version__)" 2>&1 | tail -1
fi
part tests && step gpu_tests 200 python3 -m pytest -q -m "gpu or gpu2" -rs --timeout 60 -k "not nccl" tests
part graphtests && step graph_tests 120 python3 -m pytest -q -m gpu -rs --timeout 60 tests/test_cuda_graphs.py
part nccltests && step nccl_tests 90 python3 -m pytest -q -rs --timeout 40 tests/test_kvtransfer_nccl.py
part kernels && step kernels 170 python3 -m pdserve.benchmarks.kernels --quick --json "$OUT/kernels.json"
part skinny && step skinny 200 python3 -m pdserve.benchmarks.skinny --ms 1,2,4,8,16
if part transfer; then  # whole request (all layers ready) vs one raw send of the same bytes
  B="$PD bench transfer --device cuda --geometry llama-3.1-8b --input-lens 128,512,2048,8192,32768"
  step transfer_nccl 130 $B --backend nccl --out "$OUT/transfer"
  step transfer_ucx 130 $B --backend ucx --out "$OUT/transfer"
fi
part ttft && step ttft 250 $PD bench ttft --model llama-3.1-8b --devices 0,1 --transfer nccl \
  --input-lens 512,2048,8192 --iters 5 --out "$OUT/ttft"
if part engine && [ -f benchmarks/gpu_engine_suite.sh ]; then
  step engine 560 bash benchmarks/gpu_engine_suite.sh "$OUT/engine"
  tar czf "$OUT/engine_results.tgz" -C "$OUT/engine" results  # results/ is too deep to return
fi
exit 0

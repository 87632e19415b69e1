#!/usr/bin/env bash
# KV transfer layer on a 2-GPU machine: GPU tests, then `bench transfer` for nccl and ucx.
#   bash benchmarks/gpu_transfer_check.sh OUTDIR [tests] [nccl] [ucx] [sweep]
# Writes OUTDIR/*.log, OUTDIR/transfer/*.{csv,md,png} and OUTDIR/sweep.jsonl; a failing part
# does not stop the others. Total well under 10 minutes on 2xH200.
set -u
OUT=${1:?usage: gpu_transfer_check.sh OUTDIR [parts...]}; shift
PARTS=${*:-tests nccl ucx sweep}
mkdir -p "$OUT/transfer"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # ucxx etc. carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import pdserve.kvtransfer" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
BENCH="python3 -m pdserve.cli bench transfer --device cuda --geometry llama-3.1-8b"
LENS=128,512,2048,8192,32768
part() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "--- $name rc=$rc"; grep -v "it/s]$" "$OUT/$name.log" | tail -n 30
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
try:
    from pdserve.kvtransfer.pynccl import NcclLibrary
    lib = NcclLibrary(); print("nccl", lib.version, lib.path)
except Exception as e:
    print("nccl: not usable:", e)
try:
    import ucxx; print("ucxx", ucxx.__version__)
except Exception as e:
    print("ucxx: not usable:", e)
EOF
if part tests; then
  step tests_gpu 300 python3 -m pytest -q -rs -m "gpu or gpu2" --timeout 280 tests/test_kvtransfer_nccl.py
  step tests_cpu 200 python3 -m pytest -q -rs --timeout 120 tests/test_kvtransfer.py tests/test_kvtransfer_pack.py
fi
if part nccl; then  # the target: whole request, all layers ready, >= 90% of baseline from 512 up
  step bench_nccl 240 $BENCH --backend nccl --input-lens $LENS --out "$OUT/transfer"
  step bench_nccl_layerwise 240 $BENCH --backend nccl --input-lens $LENS --layerwise --out "$OUT/transfer"
fi
if part ucx; then
  step bench_ucx 240 $BENCH --backend ucx --input-lens $LENS --out "$OUT/transfer"
fi
if part sweep; then  # message sizing: staging (largest message) x first/last message size
  : >"$OUT/sweep.jsonl"
  for staging in 64 128; do
    for minmsg in 8 16 32; do
      echo "=== sweep staging=${staging}MiB min=${minmsg}MiB"
      timeout 150 $BENCH --backend nccl --input-lens 512,2048,8192 --iters 8 --json \
        --staging-mib $staging --min-message-mib $minmsg --out "$OUT/sweep" 2>>"$OUT/sweep.log" \
        | sed "s/^{/{\"staging_mib\": $staging, \"min_message_mib\": $minmsg, /" \
        | tee -a "$OUT/sweep.jsonl" | cut -c1-160
    done
  done
fi
exit 0

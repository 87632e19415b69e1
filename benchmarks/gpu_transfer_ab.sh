#!/usr/bin/env bash
# Transfer and TTFT A/B on 2 GPUs: a baseline tree (.old, e.g. `git archive COMMIT | tar -x -C
# .old`) against this tree, in one call of the device tool (about 6 minutes on 2 x H100):
#   bash benchmarks/gpu_transfer_ab.sh OUTDIR
# 1. bench transfer, NCCL, llama-3.1-8b geometry, 512..32k tokens: old, new, old, new;
# 2. this tree with the torch index ops (--copy-ctas 0: stream priority only) and with
#    other grid sizes of the bounded row-copy kernel;
# 3. bench ttft (P/D against colocated, 512/2k/8k): old, new.
set -u
OUT=$(realpath -m "${1:?usage: gpu_transfer_ab.sh OUTDIR}")
mkdir -p "$OUT"
X="bench transfer --backend nccl --device cuda --geometry llama-3.1-8b --input-lens 512,2048,8192,32768 --iters 8"
bash benchmarks/gpu_ab.sh "$OUT" .old xfer "$X"
TREES="new" bash benchmarks/gpu_ab.sh "$OUT" .old ctas0 "$X --copy-ctas 0" \
  ctas16 "$X --copy-ctas 16" ctas64 "$X --copy-ctas 64"
TREES="old new" bash benchmarks/gpu_ab.sh "$OUT" .old ttft \
  "bench ttft --devices 0,1 --model llama-3.1-8b --input-lens 512,2048,8192 --iters 8"

#!/usr/bin/env bash
# Where a short prompt's TTFT goes, P/D against colocated, on two GPUs of one host:
#   bash benchmarks/gpu_ttft_profile.sh OUTDIR [LEN] [ITERS]       (default 512 tokens, 150)
# Runs `bench ttft` at one length with many requests (stable medians), and while each
# phase serves, samples the serving worker (the prefill worker, then the colocated one)
# with py-spy --gil: who holds the GIL, thread by thread (.pyspywhl carries the wheel).
# Writes OUTDIR/ttft/ (the table), OUTDIR/{prefill,both}.raw (collapsed stacks) and
# OUTDIR/gil.txt (GIL share per thread and the top frames of each).
set -u
OUT=$(realpath -m "${1:?usage: gpu_ttft_profile.sh OUTDIR [LEN] [ITERS]}")
LEN=${2:-512}; ITERS=${3:-150}
mkdir -p "$OUT/ttft"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/spy .pyspywhl/*.whl >/dev/null 2>&1
SPY=/tmp/spy/bin/py-spy
rm -rf /tmp/ttft_prof
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/ttft_prof . \
  >/dev/null 2>&1 || echo "install failed"
PP=/tmp/ttft_prof:/tmp/site
(cd /tmp && PYTHONPATH=$PP python3 -m pdserve.cli bench ttft --model llama-3.1-8b --devices 0,1 \
  --transfer nccl --input-lens "$LEN" --iters "$ITERS" --out "$OUT/ttft" >"$OUT/ttft/log" 2>&1) &
BENCH=$!
sample() {  # sample ROLE LABEL: once LABEL's progress bar moved, record ROLE's worker 3 s
  for _ in $(seq 600); do
    grep -aq "$2: *[0-9]*%.*| *[1-9][0-9]*/" "$OUT/ttft/log" 2>/dev/null && break
    kill -0 $BENCH 2>/dev/null || return; sleep 0.2
  done
  local pid; pid=$(pgrep -f "pdserve.cli worker --role $1" | head -1)
  [ -n "$pid" ] && $SPY record --gil --threads --full-filenames -r 1000 -d 3 -f raw -o "$OUT/$1.raw" \
    -p "$pid" >"$OUT/$1.spy.log" 2>&1
}
sample prefill disaggregated
sample both prefill-only
wait $BENCH
grep -aE "^\| (input_len|[0-9])" "$OUT/ttft/log"
python3 - "$OUT" <<'EOF' | tee "$OUT/gil.txt"
import collections, os, sys
out = sys.argv[1]
for role in ("prefill", "both"):
    path = os.path.join(out, role + ".raw")
    if not os.path.exists(path):
        print(f"== {role}: no profile"); continue
    threads, frames = collections.Counter(), collections.defaultdict(collections.Counter)
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        parts = stack.split(";")
        th = next((p for p in parts if p.startswith("thread")), parts[0])
        threads[th] += int(n)
        leafish = [p for p in parts[1:] if "site-packages" not in p and "python3." not in p]
        frames[th][(leafish or parts)[-1][:110]] += int(n)
    total = sum(threads.values())
    print(f"== {role}: {total} samples holding the GIL")
    for th, n in threads.most_common(8):
        print(f"  {100 * n / total:5.1f}%  {th}")
        for f, m in frames[th].most_common(6):
            print(f"         {100 * m / total:5.1f}%  {f}")
EOF

#!/usr/bin/env bash
# The capstone report on lent GPUs, in one time-boxed call:
#   bash benchmarks/gpu_capstone.sh OUT 0,1        # 1P1D, 2both, 1P1D-cond512
#   bash benchmarks/gpu_capstone.sh OUT 0,1,2,3    # 1P3D, 2P2D, 3P1D, 4both, 2P2D-cond512
# Run from the repository root, with the runtime wheels carried in .whl (grpcio, protobuf,
# msgpack, xxhash, uvloop) and matplotlib's in .mplwhl. It installs a copy of pdserve in
# /tmp and runs it from /tmp (the repository's ./pdserve would shadow the installed tree).
# OUT gets report.md, results.json, requests.json.gz, calibration.json, the PNGs (w0/, w1/,
# ...: one folder per workload) and capstone.log (the GPUs, nvidia-smi's view, first):
# at most 8 files per folder, 2 levels deep. Through the device tool, which returns a
# limited number of files per call, pack several runs' outputs into one file under $OUT
# (tar czf $OUT/runs.tgz -C DIR ...): in session 15 a call's second OUT came back without
# its results.json.
#
# Time (WALL_S, default 420 s on 2 GPUs, 560 s on 4: the call's 9.5 min less a margin):
# the harness gets --budget-s = WALL_S - (seconds already spent installing) - 20 s, and
# divides it itself (benchmarks/capstone_budget.py): first the dedicated transfer step
# (benchmarks/capstone_transfer_step.py: `bench transfer` from the first P/D setup's
# prefill GPU to its decode GPU, llama-3.1-8b's KV geometry, TRANSFER_LENS tokens, 5 timed
# iterations each; stopped at min(40 s, 15% of the budget)), then equal shares of what is
# left per setup, start-up included, then per workload, then per run (each run sends for
# its share less the drain it measured). Arithmetic, 2 GPUs at 420 s: install ~5-25 s;
# the transfer step ~15-40 s (two processes importing torch, CUDA and NCCL set-up, 8 GiB
# pools per GPU; the transfers themselves, up to 4 GiB each, a few seconds); the
# planner's predictions ~5 s; each setup's start (llama-3.1-8b random weights, warm-up
# ladder, CUDA graphs, the coordinator's P/D warm-up) ~12-26 s and the harness's warm-up
# (--warmup-burst: 4 shaped prompts, then 16 requests of each workload at once) ~3-6 s,
# so 3 setups ~60-100 s; the report (plots, planner validation with its +-5% band,
# simulated) ~15-40 s (capstone.py keeps 20 s + 1 s per planned run: 47 s on 2 GPUs, 50 s
# on 4; a sweep that still ends without report.md gets one from --report-from, below).
# That leaves ~180-260 s (the budget less all that) for 3 setups x 3 workloads = 9
# searches of ~20-29 s: 3 runs of ~6-9 s, 4-8 s of arrivals each (decode-heavy runs drain ~4 s after the last send). 4
# GPUs at 560 s: the transfer step ~15-40 s, 5 setups ~150 s of starts, 2 workloads: 10
# searches of ~29-33 s, 3 runs each.
# Measured on CPU with the tiny model (SMOKE=1 WALL_S=240, 3 setups x 2 workloads, 2
# cores): install 3 s, the transfer step 21 s (limit 33 s: 15% of the 217 s budget), a
# setup's start 8-9 s; the script ended after 198 s of its 240 (every search ran its 3
# runs). Before the transfer step, on a shared, loaded machine: install 7-17 s, a setup's
# start 19-26 s, the report (plots, validation, extrapolation) 13 s; the script ended
# after 230 s of its 240, the harness after 194 s of its 203 s budget, 3 searches cut
# after 1-2 runs.
# What the budget cut is listed in report.md ("cut by the time budget").
#
# Searches that bracket: each search starts at START_RATE (the same for every setup, so
# the CDFs and the SLO map compare setups at one rate), and with START_FROM (default: the
# committed report of the same GPU count, benchmarks/results/capstone-<N>gpu) its second
# run goes just past the max rate the planner predicts from that report's calibration
# (under it when the start failed) instead of doubling: the 4-GPU run, doubling from 16,
# left 5 of its 10 searches unbracketed.
#
# What the run records for the planner: requests.json.gz (every request's timeline and
# server timings: the prefill steps are rebuilt from them, as the workers expose no step
# times; the decode step from token times; transfers per receiver), the GPU samples with
# SM clock and power, each run's time limit and each search's guess, and per run when the
# coordinator received each worker's heartbeat (requests.json.gz "heartbeats": the planner
# replays them; benchmarks/capstone_heartbeats.py). results.json and requests.json.gz are
# written after every setup, so a sweep cut by `timeout` keeps them for --report-from.
#
# Knobs (environment): WALL_S, MODEL (llama-3.1-8b), COND (512), WORKLOADS (space-separated
# specs), GOODPUT ("ttft:750 tpot:20"), START_RATE (16 on 2 GPUs, 16 on 4), START_FROM (a
# calibration.json or run directory; "none": plain doubling), WARMUP_BURST (16), MAX_RUNS
# (3), RUN_DURATION (20 s, the longest run), CALL_S (595: the call's limit, for the
# report fallback), TRANSFER_LENS (the transfer step's prompt lengths; default auto: 512,2048,8192,32768 on GPUs, 64,256,1024 on CPU; none: skip it),
# RELAY_PROBE (1: --relay-probe, the host path measured below its knee before the setups
# start, ~40 s; 0: none), STREAM_INTERVAL (1: the workers' --stream-interval, tokens a
# message after a stream's first; the planner counts messages by it, and a run with more
# than 1 fits no mixed profile: calibrate at 1, check at K), PYTHON (python3), SMOKE=1 (tiny model on CPU, a check of this script), CHECK_FROM (a
# capstone run directory or calibration.json: instead of searching, check the planner out
# of sample, `--plan-check-from`: it predicts each setup and workload's max rate p from that
# calibration and measures p/1.15 and p/0.85 only, each run sending for at most 15 s (as
# the predictions simulate) and at least 10 s (a shorter held run decides nothing: a
# workload whose share cannot pay for that is not run); the transfer step is skipped
# unless TRANSFER_LENS is set; the report's "Planner check" section gives the verdicts).
set -u
T0=$(date +%s)
OUT=$(realpath -m "${1:?usage: gpu_capstone.sh OUT DEVICES}"); DEVICES=${2:?usage: gpu_capstone.sh OUT DEVICES}
REPO=$(pwd)
# The commit of the code that runs: $PDSERVE_COMMIT when the caller sets it (a copied tree's
# .git may be stale: set it from the machine that made the copy), else git's HEAD with
# "+dirty" when tracked files differ from it (which a stale .git shows). Exported, so the
# report's "commit" line (plotting.commit_id) says the same from the installed copy.
if [ -z "${PDSERVE_COMMIT:-}" ]; then
  PDSERVE_COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    PDSERVE_COMMIT="$PDSERVE_COMMIT+dirty"
  fi
fi
export PDSERVE_COMMIT
PYTHON=${PYTHON:-python3}
TMPD=${TMPD:-/tmp/pdserve-capstone}  # the installed copy (new/) and the wheels (site/)
mkdir -p "$OUT"
LOG="$OUT/capstone.log"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n TQDM_DISABLE=1 MPLBACKEND=Agg

N=$(echo "$DEVICES" | tr ',' '\n' | grep -c .)
COND=${COND:-512}
if [[ ${SMOKE:-0} == 1 ]]; then
  MODEL=${MODEL:-tiny} DEVICES=cpu
  WORKLOADS=${WORKLOADS:-"uniform:in=8-64,out=4-16 uniform:in=4-16,out=16-32"}
  GOODPUT=${GOODPUT:-"ttft:2000 tpot:200"} START_RATE=${START_RATE:-2} COND=${COND_SMOKE:-32}
fi
MODEL=${MODEL:-llama-3.1-8b}
case $N in
  2) CONFIGS=${CONFIGS:-1P1D,2both,1P1D-cond$COND}
     WORKLOADS=${WORKLOADS:-"prefill-heavy:in=256-2048,out=8-32 decode-heavy:in=16-64,out=128-256 sharegpt-synth"}
     START_RATE=${START_RATE:-16} WALL_S=${WALL_S:-420} ;;
  4) CONFIGS=${CONFIGS:-1P3D,2P2D,3P1D,4both,2P2D-cond$COND}
     WORKLOADS=${WORKLOADS:-"prefill-heavy:in=256-2048,out=8-32 decode-heavy:in=16-64,out=128-256"}
     START_RATE=${START_RATE:-16} WALL_S=${WALL_S:-560} ;;
  *) echo "DEVICES: give 2 or 4 GPUs (0,1 or 0,1,2,3), got '$DEVICES'" >&2; exit 2 ;;
esac
START_FROM=${START_FROM:-$REPO/benchmarks/results/capstone-${N}gpu}
[[ ${SMOKE:-0} == 1 && $START_FROM == "$REPO/benchmarks/results/capstone-${N}gpu" ]] && START_FROM=none
GUIDE=(); if [[ $START_FROM != none && -e $START_FROM ]]; then GUIDE=(--start-rate-from "$(realpath "$START_FROM")"); fi
if [[ -n ${CHECK_FROM:-} ]]; then  # the planner checked out of sample: 2 runs per search
  [[ -e $CHECK_FROM ]] || { echo "CHECK_FROM=$CHECK_FROM: no such file or directory" >&2; exit 2; }
  GUIDE=(--plan-check-from "$(realpath "$CHECK_FROM")"); TRANSFER_LENS=${TRANSFER_LENS:-none}
fi
GOODPUT=${GOODPUT:-"ttft:750 tpot:20"}
PROBE=(); [[ ${RELAY_PROBE:-1} == 1 ]] && PROBE=(--relay-probe)  # the host path, below its knee
SI=(); [[ ${STREAM_INTERVAL:-1} != 1 ]] && SI=(--worker-arg="--stream-interval=$STREAM_INTERVAL")

{
  echo "gpu_capstone.sh $OUT $DEVICES: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1
  nvidia-smi topo -m 2>&1 | head -6
} >"$LOG"  # the GPUs first: one file less (8 at most per folder come back)
{
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$TMPD/site" .whl/*.whl
  fi
  if ls .mplwhl/*.whl >/dev/null 2>&1 && ! $PYTHON -c "import matplotlib" 2>/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$TMPD/site" .mplwhl/*.whl
  fi
  rm -rf "$TMPD/new"
  $PYTHON -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target "$TMPD/new" . || echo "INSTALL FAILED"
} >>"$LOG" 2>&1
export PYTHONPATH=$TMPD/new:$TMPD/site${PYTHONPATH:+:$PYTHONPATH}
cd /tmp || exit 1
if ! $PYTHON -c "import pdserve.benchmarks.capstone" >>"$LOG" 2>&1; then
  echo "cannot import the installed pdserve (see $LOG)"; tail -20 "$LOG"; exit 2
fi

BUDGET=$(( WALL_S - ($(date +%s) - T0) - 20 ))
echo "installed in $(( $(date +%s) - T0 )) s; budget $BUDGET s for $CONFIGS on $DEVICES" | tee -a "$LOG"
WL_ARGS=(); for w in $WORKLOADS; do WL_ARGS+=(--workload "$w"); done
# shellcheck disable=SC2086
timeout $(( WALL_S - ($(date +%s) - T0) - 5 )) $PYTHON -m pdserve.cli bench capstone --model "$MODEL" \
  --devices "$DEVICES" --configs "$CONFIGS" "${WL_ARGS[@]}" --goodput $GOODPUT \
  --start-rate "$START_RATE" "${GUIDE[@]}" "${PROBE[@]}" "${SI[@]}" --max-runs "${MAX_RUNS:-3}" --rel-tol 0.25 \
  --warmup-burst "${WARMUP_BURST:-16}" --transfer-lens "${TRANSFER_LENS:-auto}" \
  --budget-s "$BUDGET" --run-duration "${RUN_DURATION:-20}" --num-requests 16 \
  --warmup-requests 2 --timeout 60 --start-timeout 240 \
  --label "gpu_capstone.sh on $N GPUs ($DEVICES), budget $BUDGET s" \
  --out "$OUT" \
  >>"$LOG" 2>&1
RC=$?
if [[ ! -f $OUT/report.md && -f $OUT/results.json ]]; then  # the sweep ran out of time
  LEFT=$(( ${CALL_S:-595} - ($(date +%s) - T0) ))
  echo "no report.md: --report-from with ${LEFT} s left of the call" | tee -a "$LOG"
  (( LEFT > 10 )) && timeout $LEFT $PYTHON -m pdserve.cli bench capstone --report-from "$OUT" \
    --meta "run=gpu_capstone.sh on $N GPUs ($DEVICES), budget $BUDGET s (report re-rendered)" \
    >>"$LOG" 2>&1
fi
cd "$REPO" || true
echo "capstone rc=$RC after $(( $(date +%s) - T0 )) s"
grep -E "^(starting|error|wrote|predicted max rates|transfer step)|ready after|req/s holds|no measured rate|plan check:|cut by" "$LOG" | grep -v "it/s]" | tail -n 30
if [[ -f $OUT/report.md ]]; then
  echo "=== report.md (summary)"
  sed -n '/^## Where P\/D wins and loses/,/^## Plots/p' "$OUT/report.md" | head -n 100
  sed -n '/^### Planner check/,/^### Planner validation/p' "$OUT/report.md" | head -n 30
  sed -n '/^### Planner validation/,/^### Extrapolation/p' "$OUT/report.md" \
    | grep -E "Mean \|error\||within" | head -n 12
  grep -E "^- (time budget|cut by the time budget)" "$OUT/report.md"
else
  tail -n 30 "$LOG"
fi
exit $RC

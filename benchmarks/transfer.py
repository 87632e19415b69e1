"""`pdserve bench transfer`: whole-request KV transfer time vs input length.

The sender (this process, cuda:0 or cpu) pushes a request's blocks, scattered at random in
its pool, to a receiver in a second process (cuda:1 or cpu) whose reserved blocks are also
scattered at random. All times are taken on the sender's clock:

- the clock: with --start ahead (the default), start() (the begin message, the block ids'
  upload) is called with the decode side's reservation, before a 2 ms pause that stands
  for the prompt's forward, and the clock starts at finish(), when every layer is written:
  the prefill worker calls start() when the step that completes the prompt begins
  (prefill/kv_push.py), so a request's KV waits only for what follows finish(). With
  --start with-finish, start() and finish() are called back to back when the clock starts:
  the request's setup is timed too. "start" below is the clock's start.
- transfer: from the clock's start to the sender's progress thread receiving the
  receiver's "done" (every block scattered in place), minus the median of the same round
  trip for an empty request (begin/end header and done ack, no data): what is left is the
  data movement, including gather, every message, scatter and the receiver's detection.
  With --concurrency N, N requests (each its own random src/dst blocks) start together and
  the time runs from the first start() to the last request's done; bytes are all N's.
- rx: from the clock's start to the receiver's own result (every block in place,
  known on the decode side: perf_counter is CLOCK_MONOTONIC, one time axis for the two
  processes of a host), nothing subtracted: what a decode worker waits from the moment the
  prefill side starts the transfer; rx_ratio is the baseline's time over it. The
  empty-request subtraction of `transfer` over-corrects where a request's `end` overlaps
  its copy (peer copy on GPU), so there `ratio` can pass 1; rx_ratio never hides a hop.
- baseline: ONE contiguous send of the same byte count on a separate connection of the same
  backend, receive pre-posted: from post_send to the receiver process seeing its receive
  complete and telling us over a pipe, minus half the pipe's median round trip. With
  --concurrency N also one send of one request's bytes (baseline1_gbps, ratio1).
- verified: a position-weighted checksum of every sent block equals that of the blocks
  received (all layers), for every request.
- fit: time = fixed + bytes / bandwidth with fixed >= 0, over the lengths where the line
  holds (transfer_fit.py), for pdserve and for the raw baseline; resid_pct per length.
- physical: on two GPUs, the bandwidth of one large copy_ from the sender's GPU to the
  receiver's (copy engines over NVLink, one direction), measured in the same run.
Bytes are whole blocks: ceil(input_len / block_size) blocks x layers x block bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from typing import Any

from pdserve.benchmarks import plotting
from pdserve.benchmarks.transfer_bench import TransferBench
from pdserve.benchmarks.transfer_fit import LineFit, fit_line
from pdserve.benchmarks.transfer_peer import GEOMETRIES, geometry, receiver_main
from pdserve.benchmarks.transfer_plot import plot_transfer

KEYS = ["input_len", "bytes", "p50_ms", "p90_ms", "gbps", "baseline_gbps", "ratio", "verified"]
TABLE = KEYS + ["rx_p50_ms", "rx_ratio", "baseline_p50_ms", "via", "messages", "fit_ms",
                "resid_pct", "in_fit", "raw_resid_pct", "phys_ms"]
CONCURRENT = ["concurrency", "baseline1_gbps", "ratio1"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__
    p.add_argument("--backend", choices=["ucx", "nccl"], default="ucx",
                   help="connects the pair, and carries the data with --no-peer-copy")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--geometry", type=_geometry, default="tiny",
                   help=f"the KV's shape: {', '.join(GEOMETRIES)}, or any model's as "
                        "LAYERSxKV_HEADSxHEAD_DIM:DTYPE, e.g. 32x8x128:bfloat16 (default tiny)")
    p.add_argument("--input-lens", default="128,512,2048,8192,32768",
                   help="comma-separated prompt lengths in tokens")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests moved at once per length (aggregate bandwidth vs one raw send "
                        "of all their bytes)")
    p.add_argument("--start", choices=["ahead", "with-finish"], default="ahead",
                   help="when start() is called: with the reservation, before the forward, "
                        "as workers do (the clock starts at finish()); or together with "
                        "finish() (the clock starts at start(), setup timed too)")
    p.add_argument("--layerwise", action="store_true",
                   help="mark layers ready one by one (default: all ready at once, coalesced)")
    p.add_argument("--json", action="store_true", help="one JSON object per input length on stdout")
    p.add_argument("--out", default="benchmarks/results/transfer", help="directory for csv/md/png")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per length")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per length")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--staging-mib", type=float, default=64.0, help="staging buffer = largest message")
    p.add_argument("--num-staging", type=int, default=4, help="staging buffers per side")
    p.add_argument("--min-message-mib", type=float, default=64.0,
                   help="first/last message size of a coalesced run")
    p.add_argument("--copy-ctas", type=int, default=None,
                   help="CUDA gather/scatter thread blocks (0: torch index ops; default: "
                        "TransferOptions.copy_ctas)")
    p.add_argument("--solo-copy-ctas", type=int, default=None,
                   help="thread blocks of a gather/scatter with nothing else in flight (-1: 2 "
                        "per SM; 0: --copy-ctas; default: TransferOptions.solo_copy_ctas)")
    p.add_argument("--poll-us", type=float, default=None,
                   help="progress-loop poll interval while busy (default 0 = spin on cuda, 100 on cpu)")
    p.add_argument("--ucx-progress", choices=["blocking", "polling"], default=None,
                   help="ucx progress thread mode (default: polling on cuda, blocking on cpu)")
    p.add_argument("--no-peer-copy", action="store_true",
                   help="stage and send through --backend even though both ends share a host "
                        "(default: the sender writes into the receiver's pool directly, CUDA "
                        "IPC between GPUs, as workers do; the backend then only connects)")
    p.add_argument("--seed", type=int, default=0)


def _geometry(spec: str) -> str:
    try:
        geometry(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def run(args: argparse.Namespace) -> int:
    bench = TransferBench(args)
    ctx = mp.get_context("spawn")
    bench.conn, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, bench.cfg), daemon=True)
    proc.start()
    try:
        rows = bench.run()
    finally:
        try:
            bench.conn.send(("quit",))
            bench.conn.poll(10)
        except OSError:
            pass
        for obj in ("tx", "base"):
            if hasattr(bench, obj):
                getattr(bench, obj).close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    fit, raw_fit = add_fits(rows, bench.phys_gbps)
    lines = summary_lines(args.backend, fit, raw_fit, bench.phys_gbps, bench.phys_note)
    if len(rows) > 1 and all(r["rx_p50_ms"] == r["rx_p50_ms"] for r in rows):  # no nan
        rx_fit = fit_line([r["bytes"] for r in rows], [r["rx_p50_ms"] / 1e3 for r in rows],
                          [r["input_len"] for r in rows])
        clock = "finish()" if args.start == "ahead" else "start()"
        lines.insert(1, rx_fit.describe(f"pdserve rx ({clock} -> the receiver's result)"))
    cols = TABLE + (CONCURRENT if bench.conc > 1 else [])
    out = sys.stderr if args.json else sys.stdout
    if args.json:
        for r in rows:
            print(plotting.json_line({k: r[k] for k in KEYS} | {k: v for k, v in r.items() if k not in KEYS}))
    else:
        print(plotting.markdown_table(rows, cols), file=out)
    for line in lines:
        print(line, file=out)
    write_outputs(args, bench, rows, cols, lines, fit, raw_fit)
    return 0 if all(r["verified"] for r in rows) else 1


def add_fits(rows: list[dict[str, Any]], phys_gbps: float | None) -> tuple[LineFit, LineFit]:
    """Fit pdserve's and the raw send's p50 times; add each row's fit columns in place."""
    nbytes = [r["bytes"] for r in rows]
    labels = [r["input_len"] for r in rows]
    fit = fit_line(nbytes, [r["p50_ms"] / 1e3 for r in rows], labels)
    raw_fit = fit_line(nbytes, [r["baseline_p50_ms"] / 1e3 for r in rows], labels)
    for i, r in enumerate(rows):
        r["fit_ms"] = float(fit.predict_s(r["bytes"])) * 1e3
        r["resid_pct"] = fit.resid_pct[i]
        r["in_fit"] = "yes" if i in fit.used else "no"
        r["raw_fit_ms"] = float(raw_fit.predict_s(r["bytes"])) * 1e3
        r["raw_resid_pct"] = raw_fit.resid_pct[i]
        r["raw_in_fit"] = "yes" if i in raw_fit.used else "no"
        r["phys_ms"] = r["bytes"] / (phys_gbps * 1e9) * 1e3 if phys_gbps else float("nan")
    return fit, raw_fit


def summary_lines(backend: str, fit: LineFit, raw_fit: LineFit, phys_gbps: float | None,
                  phys_note: str) -> list[str]:
    lines = [fit.describe("pdserve"), raw_fit.describe(f"raw {backend}"), phys_note]
    if phys_gbps and fit.ok and raw_fit.ok:
        lines.append(f"fitted bandwidth / physical: pdserve {fit.gbps / phys_gbps:.2f}, "
                     f"raw {backend} {raw_fit.gbps / phys_gbps:.2f}")
    return lines


def write_outputs(args: argparse.Namespace, bench: TransferBench, rows: list[dict[str, Any]],
                  cols: list[str], lines: list[str], fit: LineFit, raw_fit: LineFit) -> None:
    stem = (f"transfer_{args.backend}_{args.device}_{args.geometry.replace(':', '-')}"
            + ("_layerwise" if args.layerwise else "")
            + ("" if args.no_peer_copy else "_peercopy")
            + (f"_c{bench.conc}" if bench.conc > 1 else "")
            + ("" if args.start == "ahead" else "_startclock"))
    out = plotting.ensure_dir(args.out)
    meta = {**plotting.run_metadata(args.device), "backend": args.backend,
            "geometry": args.geometry, "block_size": args.block_size, "layerwise": args.layerwise,
            "start": args.start,
            "concurrency": bench.conc, "iters": args.iters, "options": bench.options,
            "via": ", ".join(sorted({r["via"] for r in rows})),
            "fit_pdserve": f"fixed {fit.fixed_us:.1f} us, {fit.gbps:.2f} GB/s",
            f"fit_raw_{args.backend}": f"fixed {raw_fit.fixed_us:.1f} us, {raw_fit.gbps:.2f} GB/s",
            "physical_gbps": f"{bench.phys_gbps:.2f}" if bench.phys_gbps else "none"}
    notes = [f"- {line}" for line in lines] + [
        f"- clock: from the first {'finish() (start() called 2 ms before, with the reservation)' if args.start == 'ahead' else 'start() (finish() right after it)'}",
        "- transfer: the clock's start -> receiver's done ack, minus an empty request's round trip; "
        "rx: the clock's start -> the receiver's result, nothing subtracted"
        + (f"; {bench.conc} requests at once, first start -> last done" if bench.conc > 1 else ""),
        "- baseline: one contiguous send of the same bytes, same backend, receive pre-posted",
        "- fit_ms / resid_pct: the constrained fit (fixed >= 0) and (p50 - fit) / fit; in_fit: "
        "whether the length was in the fit; raw_resid_pct: the same for the raw send's fit",
        "- phys_ms: bytes / the peer-to-peer copy_ bandwidth measured in this run"]
    plotting.write_csv(f"{out}/{stem}.csv", rows)
    plotting.write_markdown(f"{out}/{stem}.md", rows, cols,
                            title=f"KV transfer: {args.backend} on {args.device}, {args.geometry}"
                            + (f", {bench.conc} at once" if bench.conc > 1 else ""),
                            notes=notes, meta=meta)
    title = (f"{args.backend}/{args.device}/{args.geometry}, concurrency {bench.conc}; "
             f"{meta['device']}; {meta['date'][:10]}; {meta['commit']}")
    plot_transfer(f"{out}/{stem}.png", rows, fit, raw_fit, bench.phys_gbps, title,
                  raw_name=f"raw {args.backend}")
    print(f"wrote {out}/{stem}.csv, .md, .png", file=sys.stderr)

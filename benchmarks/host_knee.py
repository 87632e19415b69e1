"""The host path's knee on CPU: where an open loop of requests makes token 0 wait, and where
the wait is, with fake workers (no model) and the capstone's load generator.

Why: on 4 x H100 the decode-heavy runs give way at 70-80 req/s with the wait in front of
the coordinator's handler, while the relay probe (a closed loop) measures the path's
message capacity and varies by a quarter between calls (docs/capstone.md, "Session 15").
This reproduces that knee on any machine, so a change to the path (fewer token messages, a
faster accept) or to the simulator's relay can be checked without a GPU.

How: a coordinator and fake workers in their own processes (one prefill and `--decode`
decode workers, `bench coordinator`'s `fake_cluster`), each stream paced at one token per
`--step-ms` (a chunk of K tokens every K steps, so K only changes how many messages carry
the same tokens), and at each rate `--seconds` of Poisson arrivals of `--workload`'s
lengths from the capstone's load generator (`--load-procs` processes). Per rate, the
client's TTFT split three ways (medians, and p90 in the table's second line of each cell):
`accept_ms` (the client's send to the coordinator handler's start: the gRPC server's
accept path), `ttft_ms` (the handler to its send of token 0) and the rest (the delivery of
token 0 to the client).

    pdserve bench host_knee --rates 20,40,60 --tokens-per-message 1,4
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import tempfile

from pdserve.benchmarks import coordinator as bench
from pdserve.benchmarks import plotting

COLUMNS = ["tokens_per_msg", "rate", "requests", "tokens_per_s", "messages_per_s",
           "ttft_ms_p50", "ttft_ms_p90", "accept_ms_p50", "accept_ms_p90", "handler_ms_p50",
           "delivery_ms_p50", "errors"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pdserve.benchmarks.capstone_load import parse_procs

    p.add_argument("--rates", type=bench.int_list, default=[10, 20, 30, 40, 50, 60],
                   help="request rates to offer, req/s (default 10,20,30,40,50,60)")
    p.add_argument("--tokens-per-message", type=bench.int_list, default=[1, 4],
                   help="tokens per streamed message, one cluster each (default 1,4)")
    p.add_argument("--step-ms", type=float, default=10.0,
                   help="a stream's time per token, the decode step (default 10)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--workload", default="decode-heavy:in=16-64,out=128-256",
                   help="lengths of the requests (a capstone workload spec)")
    p.add_argument("--seconds", type=float, default=8.0, help="arrivals per rate (default 8)")
    p.add_argument("--load-procs", type=parse_procs, default="1", metavar="N|auto",
                   help="load generator processes (default 1)")
    p.add_argument("--out", default=None, help="write host_knee.md and .csv here")


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def split(results) -> dict:
    """The TTFT split of one rate's requests (module docstring), in ms."""
    ok = [r for r in results if r.chunks and "accept_ms" in r.server and "ttft_ms" in r.server]
    ttft = [r.ttft_s * 1e3 for r in ok]
    accept = [r.server["accept_ms"] for r in ok]
    handler = [r.server["ttft_ms"] for r in ok]
    span = (max((r.t_end for r in ok), default=0.0) - min((r.t_send for r in ok), default=0.0))
    return {"requests": len(ok), "errors": sum(1 for r in results if r.error),
            "tokens_per_s": sum(r.output_tokens for r in ok) / span if span > 0 else 0.0,
            "messages_per_s": sum(len(r.chunks) for r in ok) / span if span > 0 else 0.0,
            "ttft_ms_p50": quantile(ttft, 0.5), "ttft_ms_p90": quantile(ttft, 0.9),
            "accept_ms_p50": quantile(accept, 0.5), "accept_ms_p90": quantile(accept, 0.9),
            "handler_ms_p50": quantile(handler, 0.5),
            "delivery_ms_p50": quantile([t - a - h for t, a, h in zip(ttft, accept, handler)],
                                        0.5)}


def measure(k: int, args: argparse.Namespace, log) -> list[dict]:
    """Every rate against one cluster streaming `k` tokens a message."""
    from pdserve.benchmarks.capstone_client import GrpcTarget
    from pdserve.benchmarks.capstone_load import LoadProcs
    from pdserve.benchmarks.capstone_workloads import make_requests, parse_workload

    wl = parse_workload(args.workload)
    roles = [["--prefill", "1", "--decode", "0", "--kv-elsewhere"]] + \
        [["--prefill", "0", "--decode", "1", "--kv-elsewhere"]] * args.decode
    rows = []
    with bench.fake_cluster(roles, k, log) as (address, _, workers), \
            LoadProcs(args.load_procs) as load:
        for w in workers:  # a chunk of k tokens every k steps
            w.stdin.write(f"chunk_delay_s {k * args.step_ms / 1e3}\n")
            w.stdin.flush()
            if w.stdout.readline().strip() != "ok":
                raise RuntimeError("a fake worker refused its pacing")
        loop = asyncio.new_event_loop()
        target = GrpcTarget(address)
        try:
            for i, rate in enumerate(args.rates):
                reqs = make_requests(wl, max(1, int(rate * args.seconds)), rate, 0, 1000, 1.0,
                                     1 << 16, None, i + 1)
                res = loop.run_until_complete(load.run(
                    target, reqs, 120.0, desc=f"{k} tok/msg @ {rate:g} req/s",
                    time_limit_s=args.seconds + 60))
                rows.append({"tokens_per_msg": k, "rate": rate, **split(res)})
                r = rows[-1]
                print(f"{k} token(s) a message, {rate:g} req/s: TTFT {r['ttft_ms_p50']:.0f}/"
                      f"{r['ttft_ms_p90']:.0f} ms (p50/p90), of which in front of the handler "
                      f"{r['accept_ms_p50']:.0f}/{r['accept_ms_p90']:.0f}; "
                      f"{r['tokens_per_s']:,.0f} tokens/s in {r['messages_per_s']:,.0f} "
                      "messages/s", flush=True)
        finally:
            loop.run_until_complete(target.close())
            loop.close()
    return rows


def write(out_dir: str, rows: list[dict], args: argparse.Namespace) -> list[str]:
    notes = [f"Workload {args.workload}; {args.decode} decode worker(s); a token every "
             f"{args.step_ms:g} ms per stream; {args.seconds:g} s of Poisson arrivals per rate; "
             f"{args.load_procs} load process(es).",
             "TTFT split (ms): accept = the client's send to the coordinator handler's start; "
             "handler = its start to its send of token 0; delivery = the rest."]
    return [plotting.write_markdown(os.path.join(out_dir, "host_knee.md"), rows, COLUMNS,
                                    "Host path knee (CPU, fake workers)", notes,
                                    bench.run_meta(), floatfmt=".4g"),
            plotting.write_csv(os.path.join(out_dir, "host_knee.csv"), rows, COLUMNS)]


def run(args: argparse.Namespace) -> int:
    if not args.rates or min(args.rates) <= 0 or min(args.tokens_per_message) < 1 \
            or args.step_ms <= 0 or args.seconds <= 0 or args.decode < 1:
        print("error: rates, --step-ms, --seconds > 0; --tokens-per-message, --decode >= 1",
              flush=True)
        return 2
    rows: list[dict] = []
    with tempfile.NamedTemporaryFile("w+", prefix="pdserve-host-knee-", suffix=".log") as log:
        for k in args.tokens_per_message:
            rows += measure(k, args, log)
    by_k = {k: [r for r in rows if r["tokens_per_msg"] == k] for k in args.tokens_per_message}
    for k, rs in by_k.items():
        worst = max(rs, key=lambda r: r["accept_ms_p50"])
        print(f"{k} token(s) a message: largest median wait in front of the handler "
              f"{worst['accept_ms_p50']:.0f} ms at {worst['rate']:g} req/s (median over rates "
              f"{statistics.median(r['accept_ms_p50'] for r in rs):.0f} ms)", flush=True)
    if args.out:
        for path in write(args.out, rows, args):
            print("wrote", path)
    return 0

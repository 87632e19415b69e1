"""`pdserve bench ttft`: TTFT breakdown of disaggregated serving against a prefill-only run.

Starts a 1 prefill + 1 decode cluster (cuda:0 / cuda:1 over NCCL, or CPU over UCX) and,
as the baseline, one colocated worker on the prefill device. For each input length it sends
sequential requests and reports, as medians over the requests:
  ttft_ms      client-side time to the first token; baseline_ttft_ms for the colocated run
  hops_ms      client <-> coordinator: client TTFT minus the coordinator's own TTFT (from
               accepting the request to building token 0's response)
  queue_ms     time queued in the coordinator for decode KV blocks (only when every decode
               worker refused the reservation: the request then runs sequentially)
  prefill_ms   the prefill forward (first token sampled), reported by the prefill worker
  tail_ms      KV transfer still running after the last layer's compute (transfer tail)
  rest_ms      what is left: ttft - (hops + queue + prefill + tail), per request. It holds
               the coordinator -> prefill worker RPC and its reply, and the prefill worker's
               own queue and admission. The decode worker's reservation is no longer before
               the prefill: the coordinator sends Reserve and Prefill at once, and the
               reservation is in the TTFT only where token 0 waited for it at the
               coordinator (reserve_wait_ms, a part of rest_ms). When token 0 reaches the
               client before the transfer tail ends, the tail is not in the TTFT and
               rest_ms goes negative by up to tail_ms.
  reserve_wait_ms  token 0 held at the coordinator until the decode worker's reservation
               came (0 when the Reserve answered before token 0 was sampled)
  decode1_ms   first decode step: client-side gap between token 0 and token 1 (a tail
               that token 0 no longer waits for shows up here)
  base_*       the colocated run's hops and prefill (same definitions): P/D's TTFT minus
               the baseline's is explained by the differences of these parts, the tail
               and rest_ms
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tqdm import tqdm

PARTS = ["ttft_ms", "hops_ms", "queue_ms", "prefill_ms", "tail_ms", "rest_ms", "reserve_wait_ms",
         "decode1_ms"]  # per request; a row holds their medians
COLUMNS = ["input_len", *PARTS, "kv_mib", "baseline_ttft_ms", "base_hops_ms", "base_prefill_ms",
           "ttft_ratio", "target_ms"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--devices", default="0,1", help="'0,1' (prefill, decode GPUs) or 'cpu'")
    p.add_argument("--transfer", default=None, choices=["nccl", "ucx"],
                   help="default: nccl on GPUs, ucx on cpu")
    p.add_argument("--input-lens", default="512,2048,8192,32768")
    p.add_argument("--iters", type=int, default=5, help="requests per input length")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--no-baseline", action="store_true", help="skip the colocated prefill-only run")
    p.add_argument("--interleave", action="store_true",
                   help="run the colocated worker beside the P/D cluster (on the first device, "
                        "both with --num-blocks for one request at a time unless given) and "
                        "alternate requests between them: the comparison then sees one host "
                        "state, not two runs minutes apart")
    p.add_argument("--worker-arg", action="append", default=[],
                   help="extra worker flag (repeatable), e.g. --worker-arg=--enforce-eager")
    p.add_argument("--out", default="benchmarks/results/ttft")
    p.add_argument("--json", action="store_true")


def _prompt(n: int, salt: int) -> list[int]:
    return [(salt * 7919 + 31 * i) % 251 + 1 for i in range(n)]  # distinct: no prefix hits


def breakdown(client_ttft_ms: float, decode1_ms: float | None, metrics: dict) -> dict[str, float]:
    """One request's parts (ms) from the client's stamps and the coordinator's metrics."""
    server_ttft = metrics.get("ttft_ms", 0.0) or client_ttft_ms  # 0: not reported
    parts = {"ttft_ms": client_ttft_ms, "hops_ms": client_ttft_ms - server_ttft,
             "queue_ms": metrics.get("queue_ms", 0.0), "prefill_ms": metrics.get("prefill_ms", 0.0),
             "tail_ms": metrics.get("transfer_ms", 0.0),
             "reserve_wait_ms": metrics.get("reserve_wait_ms", 0.0),
             "kv_bytes": float(metrics.get("kv_bytes", 0))}
    parts["rest_ms"] = client_ttft_ms - sum(parts[k] for k in ("hops_ms", "queue_ms", "prefill_ms",
                                                               "tail_ms"))
    if decode1_ms is not None:
        parts["decode1_ms"] = decode1_ms
    return parts


def medians(records: list[dict[str, float]]) -> dict[str, float]:
    """Per-column median over the requests (a column no request has: nan)."""
    keys = (*PARTS, "kv_bytes")
    return {k: statistics.median(v) if (v := [r[k] for r in records if k in r]) else float("nan")
            for k in keys}


def _one(cl, n: int, salt: int, max_tokens: int) -> dict[str, float]:
    """One request of n prompt tokens: its breakdown."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    metrics: dict = {}
    for ch in cl.stream(_prompt(n, salt), max_tokens=max_tokens, temperature=0.0,
                        ignore_eos=True, skip_text=True):
        stamps += [time.perf_counter()] * len(ch.token_ids)
        if ch.finished:
            metrics = ch.metrics or {}
    d1 = (stamps[1] - stamps[0]) * 1e3 if len(stamps) > 1 else None
    return breakdown((stamps[0] - t0) * 1e3, d1, metrics)


def _measure(addresses: dict[str, str], lens: list[int], iters: int,
             max_tokens: int) -> dict[str, dict[int, dict[str, float]]]:
    """{label: {length: medians}}. With several clusters the requests alternate between
    them (ABBA: each pair's order flips), so both see the same host over the same seconds."""
    from contextlib import ExitStack

    from pdserve.coordinator.client import Client

    with ExitStack() as stack:
        clients = {k: stack.enter_context(Client(a, timeout_s=600)) for k, a in addresses.items()}
        for cl in clients.values():
            cl.generate(_prompt(64, 0), max_tokens=2, temperature=0.0, ignore_eos=True)  # warm-up
        recs: dict[str, dict[int, list]] = {k: {n: [] for n in lens} for k in clients}
        bar = tqdm(total=len(lens) * (iters + 1) * len(clients), desc=" + ".join(clients))
        for n in lens:
            for it in range(iters + 1):  # the first one of each length warms it up
                order = list(clients) if it % 2 == 0 else list(clients)[::-1]
                for k in order:
                    r = _one(clients[k], n, it + 1, max_tokens)
                    bar.update()
                    if it:
                        recs[k][n].append(r)
        bar.close()
    return {k: {n: medians(v) for n, v in per.items()} for k, per in recs.items()}


def make_row(n: int, d: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """One length's row: the P/D medians beside the colocated run's (base, may be empty).
    target_ms is issue 12's bound: 1.03 x the colocated TTFT + 1 ms."""
    nan = float("nan")
    b = base.get("ttft_ms", nan)
    return {"input_len": n, **{k: d[k] for k in PARTS},
            "kv_mib": d["kv_bytes"] / 2**20, "baseline_ttft_ms": b,
            "base_hops_ms": base.get("hops_ms", nan), "base_prefill_ms": base.get("prefill_ms", nan),
            "ttft_ratio": d["ttft_ms"] / b if b == b else nan, "target_ms": 1.03 * b + 1.0}


def run(args: argparse.Namespace) -> int:
    from pdserve.cluster import LocalCluster

    lens = [int(x) for x in args.input_lens.split(",") if x]
    devs = args.devices
    first = devs.split(",")[0] if devs != "cpu" else "cpu"
    pd = {"prefill": 1, "decode": 1, "devices": devs, "transfer": args.transfer}
    colo = {"prefill": 0, "decode": 0, "both": 1, "devices": first}
    wargs = list(args.worker_arg)
    if args.interleave and not any(a.startswith("--num-blocks") for a in wargs):
        # two workers share the first GPU: each takes what one request at a time needs
        blocks = 2 * -(-(max(lens) + args.max_tokens) // 16) + 64
        wargs.append(f"--num-blocks={blocks}")

    def cluster(spec: dict) -> LocalCluster:
        return LocalCluster(args.model, **spec, worker_args=wargs, start_timeout_s=600)
    base: dict = {}
    if args.interleave and not args.no_baseline:
        with cluster(pd) as c1, cluster(colo) as c2:
            c1.wait_ready(600)
            c2.wait_ready(600)
            got = _measure({"disaggregated": c1.address, "colocated": c2.address}, lens,
                           args.iters, args.max_tokens)
        disagg, base = got["disaggregated"], got["colocated"]
    else:
        with cluster(pd) as c:
            c.wait_ready(600)
            disagg = _measure({"disaggregated": c.address}, lens, args.iters,
                              args.max_tokens)["disaggregated"]
        if not args.no_baseline:
            with cluster(colo) as c:
                c.wait_ready(600)
                base = _measure({"prefill-only": c.address}, lens, args.iters,
                                args.max_tokens)["prefill-only"]
    rows = []
    for n in lens:
        rows.append(make_row(n, disagg[n], base.get(n, {})))
        if args.json:
            print(json.dumps(rows[-1]))
    _write(args.out, rows, f"TTFT breakdown, 1P1D {args.model}, devices {devs}")
    return 0


def _write(out_dir: str, rows: list[dict], title: str) -> None:
    from pdserve.benchmarks import plotting

    device = "cpu" if title.endswith("cpu") else "cuda"
    meta = plotting.run_metadata(device)
    stem = f"{out_dir}/ttft"
    plotting.write_csv(stem + ".csv", rows)
    plotting.write_markdown(stem + ".md", rows, COLUMNS, title=title, meta=meta, floatfmt=".2f",
                            notes=["```", (__doc__ or "").strip(), "```"])
    print(plotting.markdown_table(rows, COLUMNS, floatfmt=".2f"))
    x = [r["input_len"] for r in rows]
    shown = ("ttft_ms", "baseline_ttft_ms", "prefill_ms", "tail_ms", "rest_ms", "reserve_wait_ms",
             "decode1_ms")
    plotting.plot_lines(stem + ".png", {k: (x, [r[k] for r in rows]) for k in shown},
                        xlabel="input tokens", ylabel="ms", logx=True,
                        title=f"{title}\n{meta['device']}; {meta['date'][:10]}; {meta['commit']}")

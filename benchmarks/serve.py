"""`pdserve bench serve`: end-to-end serving under a Poisson arrival stream; P/D vs colocated.

Sends `--num-requests` requests per `--rate` (req/s; `inf` sends them all at once) with
exponentially distributed gaps, to an existing coordinator (`--coordinator HOST:PORT`) or to a
LocalCluster it starts (`--model`, `--prefill/--decode/--both`, `--devices`, `--transfer`).
Prompts are random token ids (no prefix-cache hits); `--input-len`/`--output-len` are fixed
("128") or uniform ranges ("64:256"); outputs ignore EOS, so every request produces exactly
its output length. `--compare` runs the same workload (same seed: same prompts and arrival
times) on the P/D cluster and on colocated `both` workers on the same devices (one per
device), and reports both in one table and one plot.

Per rate, from client-side timestamps:
  throughput_rps, output_tok_s  finished requests and output tokens per second, over the
                                time from the first send to the last finish
  ttft_ms p50/p90/p99           send -> first token
  tpot_ms p50/p90               (last token - first token) / (output tokens - 1)
  e2e_ms p50/p90                send -> last token
  goodput                       fraction of sent requests that finished with TTFT <=
                                --slo-ttft-ms and TPOT <= --slo-tpot-ms (failures count as
                                misses); goodput_rps is those requests per second
Tokens that arrive in one message share its arrival time (as a user sees them), so when a
worker or the coordinator batches tokens into few messages, TPOT can be far below the decode
step time and TTFT includes the batching delay.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time

from pdserve.benchmarks import plotting
from pdserve.benchmarks.serve_workload import Job, Record, make_jobs, summarize
from pdserve.proto.convert import ROLES

NAME = "serve"


# -- argument parsing ------------------------------------------------------------------------
def length_spec(value: str) -> tuple[int, int]:
    """"128" -> (128, 128); "64:256" -> (64, 256) (uniform, inclusive)."""
    try:
        parts = [int(x) for x in value.replace(" ", "").split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {value!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI with 1 <= LO <= HI, got {value!r}")
    return parts[0], parts[1]


def rate_list(value: str) -> list[float]:
    out = []
    for x in (s for s in value.replace(" ", "").split(",") if s):
        try:
            r = float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"rates are numbers or 'inf', got {x!r}") from None
        if not r > 0:
            raise argparse.ArgumentTypeError(f"rates must be > 0, got {x!r}")
        out.append(r)
    if not out:
        raise argparse.ArgumentTypeError("give at least one rate")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="use this running coordinator (default: start a LocalCluster)")
    g.add_argument("--model", default="tiny", help="LocalCluster: preset name or HF directory")
    g.add_argument("--prefill", type=int, default=1, help="LocalCluster: prefill workers (default 1)")
    g.add_argument("--decode", type=int, default=1, help="LocalCluster: decode workers (default 1)")
    g.add_argument("--both", type=int, default=0, help="LocalCluster: colocated workers (default 0)")
    g.add_argument("--devices", default="auto", help="LocalCluster: cpu, auto or GPUs '0,1'")
    g.add_argument("--transfer", default=None, choices=["nccl", "ucx"],
                   help="LocalCluster: KV transfer (default: nccl on GPUs, ucx on cpu)")
    g.add_argument("--worker-arg", action="append", default=[],
                   help="LocalCluster: extra worker flag (repeatable), e.g. --worker-arg=--num-blocks=4096")
    g.add_argument("--compare", action="store_true",
                   help="LocalCluster: run the workload on the P/D cluster and on colocated "
                        "'both' workers on the same devices")
    g.add_argument("--start-timeout", type=float, default=600.0,
                   help="LocalCluster: seconds to wait for the workers (default 600)")
    w = p.add_argument_group("workload")
    w.add_argument("--rate", type=rate_list, default=[1.0],
                   help="arrival rate(s), req/s, comma-separated; 'inf' = all at once (default 1)")
    w.add_argument("--num-requests", type=int, default=100, help="requests per rate (default 100)")
    w.add_argument("--input-len", type=length_spec, default=(128, 128),
                   help="prompt tokens: N or LO:HI (default 128)")
    w.add_argument("--output-len", type=length_spec, default=(128, 128),
                   help="output tokens: N or LO:HI (default 128)")
    w.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals")
    w.add_argument("--warmup", type=int, default=2,
                   help="sequential requests before the first rate of each setup (default 2)")
    w.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    w.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="TTFT SLO (default 1000)")
    w.add_argument("--slo-tpot-ms", type=float, default=100.0, help="TPOT SLO (default 100)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=f"benchmarks/results/{NAME}", help="output directory")
    o.add_argument("--name", default=NAME, help=f"file stem of the outputs (default {NAME})")
    o.add_argument("--label", default="", help="a line added to the title and the markdown")
    o.add_argument("--json", action="store_true", help="also print each row as JSON")


def check_args(args: argparse.Namespace) -> str | None:
    """A message for an invalid combination, else None."""
    if args.num_requests < 1:
        return "--num-requests must be at least 1"
    if args.coordinator and args.compare:
        return "--compare starts its own clusters; it cannot be used with --coordinator"
    if not args.coordinator:
        if min(args.prefill, args.decode, args.both) < 0:
            return "--prefill/--decode/--both must be >= 0"
        if args.compare and not (args.prefill and args.decode):
            return "--compare needs a P/D setup (--prefill and --decode >= 1)"
        if args.prefill + args.decode + args.both == 0:
            return "no workers: give --prefill/--decode and/or --both"
    if args.slo_ttft_ms <= 0 or args.slo_tpot_ms <= 0:
        return "--slo-ttft-ms and --slo-tpot-ms must be > 0"
    if args.timeout <= 0 or args.warmup < 0:
        return "--timeout must be > 0 and --warmup >= 0"
    return None


# -- running requests ------------------------------------------------------------------------
async def _one(client, job: Job, rec: Record, timeout_s: float) -> None:
    from pdserve.coordinator.client import ClientError

    try:
        async for ch in client.stream(prompt_token_ids=job.prompt, max_tokens=job.output_len,
                                      temperature=0.0, ignore_eos=True, skip_text=True,
                                      timeout_s=timeout_s):
            if ch.token_ids:
                now = time.perf_counter()
                if rec.output_tokens == 0:
                    rec.t_first = now
                rec.output_tokens += len(ch.token_ids)
                rec.t_end = now
    except ClientError as e:
        rec.error = f"{e.code.name}: {e.details}"
    except Exception as e:  # noqa: BLE001 - reported in the summary, the run goes on
        rec.error = f"{type(e).__name__}: {e}"


async def _run_rate(address: str, jobs: list[Job], timeout_s: float, desc: str) -> list[Record]:
    from tqdm import tqdm

    from pdserve.coordinator.client import AsyncClient

    async with AsyncClient(address) as client:
        bar = tqdm(total=len(jobs), desc=desc, unit="req", leave=False)
        records: list[Record] = []
        tasks = []
        start = time.perf_counter()
        for job in jobs:
            delay = start + job.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Record(time.perf_counter(), len(job.prompt))
            records.append(rec)
            task = asyncio.ensure_future(_one(client, job, rec, timeout_s))
            task.add_done_callback(lambda _: bar.update())
            tasks.append(task)
        await asyncio.gather(*tasks)
        bar.close()
    return records


async def _warmup(address: str, n: int, vocab: int, timeout_s: float) -> None:
    from pdserve.coordinator.client import AsyncClient

    async with AsyncClient(address) as client:
        for i in range(n):
            await client.generate(prompt_token_ids=[(7 * i + j) % (vocab - 1) + 1 for j in range(16)],
                                  max_tokens=4, temperature=0.0, ignore_eos=True, skip_text=True,
                                  timeout_s=timeout_s)


def _describe_workers(workers: list[dict]) -> tuple[str, str, int, int]:
    """(setup label like '1P1D' or '2both', 'role@device, ...', min vocab, min max_model_len)."""
    roles = {r: [w for w in workers if w["info"]["role"] == r] for r in ROLES}
    label = "".join(f"{len(roles[r])}{s}" for r, s in (("prefill", "P"), ("decode", "D"))
                    if roles[r])
    if roles["both"]:
        label += ("+" if label else "") + f"{len(roles['both'])}both"
    devices = ", ".join(f"{w['info']['role']}@{w['info']['device']}" for w in workers)
    vocab = min((w["info"]["vocab_size"] for w in workers if w["info"]["vocab_size"]), default=256)
    max_len = min((w["info"]["max_model_len"] for w in workers if w["info"]["max_model_len"]),
                  default=0)
    return label or "none", devices, vocab, max_len


def bench_setup(address: str, args: argparse.Namespace, label: str | None = None) -> list[dict]:
    """Every rate against one coordinator; one summary row per rate."""
    from pdserve.coordinator.client import Client

    with Client(address, timeout_s=30) as c:
        setup, devices, vocab, max_len = _describe_workers(c.list_workers())
    if max_len and args.input_len[1] + args.output_len[1] > max_len:
        raise ValueError(f"--input-len + --output-len can reach {args.input_len[1] + args.output_len[1]} "
                         f"tokens, more than the workers' max_model_len {max_len}")
    label = label or setup
    asyncio.run(_warmup(address, args.warmup, vocab, args.timeout))
    rows = []
    for i, rate in enumerate(args.rate):
        jobs = make_jobs(args.num_requests, rate, args.input_len, args.output_len, vocab,
                         args.seed + 1000 * i)
        records = asyncio.run(_run_rate(address, jobs, args.timeout, f"{label} @ {rate:g} req/s"))
        row = {"setup": label, "rate": rate,
               **summarize(records, args.slo_ttft_ms, args.slo_tpot_ms), "workers": devices}
        errors = [r.error for r in records if r.error]
        if errors:
            print(f"{label} @ {rate:g} req/s: {len(errors)} failed; first: {errors[0]}",
                  file=sys.stderr)
        print(_row_line(row), flush=True)
        rows.append(row)
    return rows


def _row_line(r: dict) -> str:
    return (f"{r['setup']:>8} rate {r['rate']:>6g}: {r['throughput_rps']:.2f} req/s, "
            f"{r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.1f} ms, TPOT p50 "
            f"{r['tpot_p50_ms']:.2f} ms, goodput {r['goodput']:.2f}, failed {r['failed']}")


def _cluster_rows(args: argparse.Namespace, prefill: int, decode: int, both: int,
                  label: str) -> list[dict]:
    from pdserve.cluster import LocalCluster

    print(f"starting {label}: {prefill} prefill, {decode} decode, {both} both on {args.devices} "
          f"({args.model})", flush=True)
    with LocalCluster(args.model, prefill=prefill, decode=decode, both=both,
                      devices=args.devices, transfer=args.transfer, worker_args=args.worker_arg,
                      start_timeout_s=args.start_timeout) as c:
        c.wait_ready(args.start_timeout)
        return bench_setup(c.address, args, label)


def setups(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(label, prefill, decode, both) of each LocalCluster to run."""
    pd_label = f"{args.prefill}P{args.decode}D" + (f"+{args.both}both" if args.both else "")
    if args.prefill == 0 and args.decode == 0:
        pd_label = f"{args.both}both"
    out = [(pd_label, args.prefill, args.decode, args.both)]
    if args.compare:
        n = args.prefill + args.decode + args.both  # the same devices, one `both` each
        out.append((f"{n}both", 0, 0, n))
    return out


# -- output ----------------------------------------------------------------------------------
COLUMNS = ["setup", "rate", "requests", "completed", "failed", "duration_s", "throughput_rps",
           "output_tok_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms",
           "tpot_p90_ms", "e2e_p50_ms", "e2e_p90_ms", "goodput", "goodput_rps"]


def device_description(args: argparse.Namespace) -> str:
    host_cpu = plotting.cpu_description()
    if args.coordinator or str(args.devices).strip().lower() == "cpu":
        return host_cpu
    import subprocess
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
    except (OSError, subprocess.SubprocessError):
        names = []
    gpus = f"{len(names)} x {names[0]}" if names else "no GPU found"
    return f"{gpus}; host {host_cpu}"


def run_meta(args: argparse.Namespace) -> dict[str, str]:
    import datetime as dt

    meta = {"device": device_description(args),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": plotting.commit_id(),
            "load average (1/5/15 min) at start": plotting.load_average()}
    if args.label:
        meta = {"run": args.label, **meta}
    return meta


def workload_line(args: argparse.Namespace) -> str:
    span = lambda t: str(t[0]) if t[0] == t[1] else f"uniform {t[0]}..{t[1]}"  # noqa: E731
    cpu = str(args.devices).strip().lower() == "cpu"
    transfer = args.transfer or ("ucx" if cpu else "default (nccl on GPUs, ucx on cpu)")
    where = f"coordinator {args.coordinator}" if args.coordinator else \
        f"model {args.model}, devices {args.devices}, transfer {transfer}"
    return (f"Workload: {args.num_requests} requests per rate, Poisson arrivals, input "
            f"{span(args.input_len)} tokens, output {span(args.output_len)} tokens (ignore_eos, "
            f"greedy), seed {args.seed}; SLOs: TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= "
            f"{args.slo_tpot_ms:g} ms; {where}.")


def plot(path: str, rows: list[dict], title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    finite = [r["rate"] for r in rows if not math.isinf(r["rate"])]
    inf_x = max(finite, default=1.0) * 2  # where `inf` is drawn
    for setup in dict.fromkeys(r["setup"] for r in rows):
        sel = sorted((r for r in rows if r["setup"] == setup), key=lambda r: r["rate"])
        xs = [inf_x if math.isinf(r["rate"]) else r["rate"] for r in sel]
        for ax, key in ((axes[0], "ttft"), (axes[1], "tpot")):
            line, = ax.plot(xs, [r[f"{key}_p50_ms"] for r in sel], "o-", label=f"{setup} p50")
            ax.plot(xs, [r[f"{key}_p90_ms"] for r in sel], "s--", color=line.get_color(),
                    alpha=0.6, label=f"{setup} p90")
    for ax, name in ((axes[0], "TTFT (ms)"), (axes[1], "TPOT (ms)")):
        ax.set_xlabel("arrival rate (req/s)" + ("; rightmost = inf" if len(finite) < len(rows) else ""))
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plotting.save_png(fig, path)
    plt.close(fig)
    return path


def write_results(args: argparse.Namespace, rows: list[dict], meta: dict[str, str]) -> list[str]:

    stem = os.path.join(args.out, args.name)
    setups_ = list(dict.fromkeys(r["setup"] for r in rows))
    title = "Serving: " + " vs ".join(setups_) + f" ({args.model if not args.coordinator else args.coordinator})"
    if args.label:
        title = f"{args.label}. {title}"
    notes = [workload_line(args), "",
             "Workers: " + "; ".join(f"{s}: {next(r['workers'] for r in rows if r['setup'] == s)}"
                                     for s in setups_), "",
             "```", (__doc__ or "").strip(), "```"]
    paths = [plotting.write_csv(stem + ".csv", rows, [*COLUMNS, "workers"]),
             plotting.write_markdown(stem + ".md", rows, COLUMNS, title=title, notes=notes,
                                     meta=meta, floatfmt=".4g")]
    png = plot(stem + ".png", rows, f"{title}\n{meta['device']}; {meta['date'][:10]}; "
                                    f"{meta['commit']}")
    return paths + ([png] if png else [])


def run(args: argparse.Namespace) -> int:
    from pdserve.coordinator.client import ClientError
    from pdserve.proto.grpc_util import install_uvloop

    err = check_args(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    install_uvloop()
    meta = run_meta(args)
    rows: list[dict] = []
    try:
        if args.coordinator:
            rows = bench_setup(args.coordinator, args)
        else:
            for label, p, d, b in setups(args):
                rows += _cluster_rows(args, p, d, b, label)
    except (ClientError, TimeoutError, RuntimeError, OSError, ValueError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    meta["load average (1/5/15 min) at end"] = plotting.load_average()
    plotting.print_rows(rows, COLUMNS, args.json)
    for path in write_results(args, rows, meta):
        print("wrote", path)
    return 1 if any(r["completed"] == 0 for r in rows) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="pdserve bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

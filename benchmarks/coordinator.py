"""`pdserve bench coordinator`: the coordinator's streaming throughput with fast fake workers.

Processes on this machine: the coordinator, one process of fake workers (fake_workers.py:
no model, every token ready at once) and clients holding N Generate streams in a closed loop
(a finished request is replaced at once). For each tokens-per-decode-message K (the fake
decode worker's TokenChunk size) and each N, it counts the tokens the clients receive in a
window after a warm-up, and each process's CPU time in it (/proc). Columns:
  tokens_per_s         output tokens delivered to clients per second
  client_msgs_per_s    messages per second; tok_per_client_msg their mean size (> K: merged)
  coord_cpu            CPU cores the coordinator process used (1.0 = one core busy)
  tok_per_coord_cpu_s, req_per_coord_cpu_s   tokens, requests finished per coordinator CPU-s
  workers_cpu, clients_cpu, other_cpu   the rest of the machine (other_cpu: the background load)
Target (docs/architecture.md, "Performance targets"): at least 100k tokens/s on 2 CPU cores.
All processes share the cores (on 2 the load generators compete with the coordinator).
The capstone's relay probe runs cells of this bench (`fake_cluster`, `run_cell`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from pdserve.benchmarks import plotting
from pdserve.benchmarks.cpu_sample import CpuSample, cpu_usage

TARGET_TOKENS_PER_S = 100_000
NAME = "coordinator"


def int_list(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def mode_list(value: str) -> list[str]:
    out = [x for x in value.replace(" ", "").split(",") if x]
    bad = [m for m in out if m not in ("pd", "both")]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"modes are 'pd' and 'both', got {value!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", type=int_list, default=[16, 64, 256],
                   help="concurrent client streams, comma-separated (default 16,64,256)")
    p.add_argument("--tokens-per-msg", type=int_list, default=[1, 4, 16, 64],
                   help="tokens per decode-worker message (default 1,4,16,64)")
    p.add_argument("--mode", type=mode_list, default=["pd"],
                   help="'pd' (1 prefill + 1 decode fake worker), 'both' (1 colocated), or "
                        "'pd,both' (default pd)")
    p.add_argument("--output-len", type=int, default=1024, help="tokens per request (default 1024)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell")
    p.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--text", action="store_true",
                   help="have the coordinator detokenize (byte tokenizer); default: token ids only")
    p.add_argument("--out", default=f"benchmarks/results/{NAME}", help="output directory")
    p.add_argument("--json", action="store_true", help="also print each row as JSON")


def check_args(args: argparse.Namespace) -> str | None:
    """A message for an invalid combination, else None."""
    if args.output_len < 2:
        return "--output-len must be at least 2 (the decode worker streams tokens 1..)"
    if args.prompt_len < 1:
        return "--prompt-len must be at least 1"
    if args.warmup < 0 or args.duration <= 0:
        return "--warmup must be >= 0 and --duration > 0"
    if args.client_procs < 1 or args.client_procs > min(args.streams):
        return "--client-procs must be between 1 and the smallest --streams value"
    return None


# -- CPU accounting from /proc ---------------------------------------------------------------
def summarize(mode: str, streams: int, k: int, client_results: Sequence[dict], window_s: float,
              cpu: dict[str, float], target: float = TARGET_TOKENS_PER_S) -> dict:
    tokens = sum(r["tokens"] for r in client_results)
    msgs = sum(r["msgs"] for r in client_results)
    done = sum(r["done"] for r in client_results)
    errors = sum(r["errors"] for r in client_results)
    tps = tokens / window_s if window_s > 0 else 0.0
    coord = cpu.get("coordinator", 0.0)
    return {"mode": mode, "streams": streams, "tokens_per_msg": k, "tokens_per_s": tps,
            "client_msgs_per_s": msgs / window_s if window_s > 0 else 0.0,
            "tok_per_client_msg": tokens / msgs if msgs else 0.0,
            "requests_per_s": done / window_s if window_s > 0 else 0.0, "errors": errors,
            "coord_cpu": coord,
            "tok_per_coord_cpu_s": tps / coord if coord > 0 else float("nan"),
            "req_per_coord_cpu_s": done / window_s / coord if coord > 0 and window_s > 0
            else float("nan"),
            "workers_cpu": cpu.get("workers", 0.0), "clients_cpu": cpu.get("clients", 0.0),
            "other_cpu": cpu.get("other", 0.0), "meets_target": tps >= target}


def best_row(rows: Sequence[dict]) -> dict | None:
    return max(rows, key=lambda r: r["tokens_per_s"], default=None)


# -- child processes -------------------------------------------------------------------------
def _read_line(proc: subprocess.Popen, prefix: str, timeout_s: float, what: str) -> str:
    """The first stdout line of `proc` starting with `prefix` (other lines are skipped)."""
    end = time.monotonic() + timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{what}: no {prefix!r} line after {timeout_s:g} s")
            if sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{what} exited (status {proc.wait()}) before {prefix!r}")
                if line.startswith(prefix):
                    return line.strip()
    finally:
        sel.close()


def _spawn(cmd: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True, bufsize=1)


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _client_cmd(address: str, streams: int, args: argparse.Namespace, seed: int) -> list[str]:
    spec = {"address": address, "streams": streams, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "skip_text": not args.text, "seed": seed}
    return [sys.executable, "-m", "pdserve.benchmarks.coordinator", "--client", json.dumps(spec)]


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def run_cell(address: str, pids: dict[str, list[int]], mode: str, n: int, k: int,
              args: argparse.Namespace, log) -> dict:
    clients = [_spawn(_client_cmd(address, s, args, seed=i), log)
               for i, s in enumerate(_split(n, args.client_procs))]
    try:
        for c in clients:
            _read_line(c, "ready", 60, "client")
        t_start = time.time() + args.warmup
        t_end = t_start + args.duration
        for c in clients:
            c.stdin.write(f"{t_start} {t_end}\n")
            c.stdin.flush()
        groups = {**pids, "clients": [c.pid for c in clients]}
        time.sleep(max(0.0, t_start - time.time()))
        a = CpuSample.take(groups)
        time.sleep(max(0.0, t_end - time.time()))
        b = CpuSample.take(groups)
        results = [json.loads(_read_line(c, "{", 60, "client")) for c in clients]
    finally:
        _stop(clients)
    row = summarize(mode, n, k, results, args.duration, cpu_usage(a, b))
    first_error = next((r["first_error"] for r in results if r.get("first_error")), "")
    if first_error:
        print(f"  {row['errors']} errors, first: {first_error}", file=sys.stderr)
    return row


def _wait_tokenizer(address: str) -> None:
    """One text request before any window: the coordinator's tokenizer load (a thread that
    imports torch, seconds of CPU) must not fall in a cell's window."""
    import grpc

    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    req = pb.GenerateRequest(text="warm", sampling=pb.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(address) as channel:
        try:
            list(pb_grpc.CoordinatorStub(channel).Generate(req, timeout=120))
        except grpc.RpcError as e:
            raise RuntimeError(f"warm-up request: {e.code().name}: {e.details()}") from None


@contextlib.contextmanager
def fake_cluster(roles: list[list[str]], chunk_tokens: int, log):
    """A coordinator and fake workers (one process per entry of `roles`, its role flags),
    registered, tokenizer loaded: (address, pids by CpuSample group, worker processes)."""
    procs = [_spawn([sys.executable, "-m", "pdserve.cli", "coordinator", "--port", "0",
                    "--log-level", "WARNING"], log)]
    try:
        address = _read_line(procs[0], "coordinator listening on", 60, "coordinator").split()[-1]
        workers = [_spawn([sys.executable, "-m", "pdserve.benchmarks.fake_workers", "--model",
                           "tiny", "--coordinator", address, "--chunk-tokens", str(chunk_tokens),
                           *r], log) for r in roles]
        procs += workers
        for w in workers:
            _read_line(w, "fake workers ready", 60, "fake workers")
        _wait_tokenizer(address)
        yield address, {"coordinator": [procs[0].pid], "workers": [w.pid for w in workers]}, workers
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
        _stop(list(reversed(procs)))


def _run_mode(mode: str, args: argparse.Namespace, log, bar) -> list[dict]:
    roles = ["--prefill", "1", "--decode", "1"] if mode == "pd" else \
        ["--prefill", "0", "--decode", "0", "--both", "1"]
    with fake_cluster([roles], args.tokens_per_msg[0], log) as (address, pids, (workers,)):
        rows = []
        for k in args.tokens_per_msg:
            workers.stdin.write(f"chunk_tokens {k}\n")
            workers.stdin.flush()
            reply = _read_line(workers, "", 10, "fake workers")
            if reply != "ok":
                raise RuntimeError(f"fake workers: {reply}")
            for n in args.streams:
                rows.append(run_cell(address, pids, mode, n, k, args, log))
                bar.update()
                r = rows[-1]
                bar.write(f"{mode:>4} streams={n:<4} tok/msg={k:<3} {r['tokens_per_s']:>10,.0f} "
                          f"tok/s  coordinator {r['coord_cpu']:.2f} cores  "
                          f"other load {r['other_cpu']:.2f} cores")
        return rows


# -- run metadata ---------------------------------------------------------------------------
def run_meta() -> dict[str, str]:
    import datetime as dt

    return {"device": plotting.cpu_description(),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": plotting.commit_id(),
            "load average (1/5/15 min) at start": plotting.load_average()}


# -- main -----------------------------------------------------------------------------------
COLUMNS = ["mode", "streams", "tokens_per_msg", "tokens_per_s", "client_msgs_per_s",
           "tok_per_client_msg", "requests_per_s", "errors", "coord_cpu", "tok_per_coord_cpu_s",
           "req_per_coord_cpu_s", "workers_cpu", "clients_cpu", "other_cpu", "meets_target"]


def write_results(out_dir: str, rows: list[dict], meta: dict[str, str],
                  args: argparse.Namespace) -> list[str]:
    best = best_row(rows)
    notes = [f"Target (docs/architecture.md, 'Performance targets'): >= {TARGET_TOKENS_PER_S:,} tokens/s on 2 CPU cores.",
             f"Best: {best['tokens_per_s']:,.0f} tokens/s ({best['mode']}, {best['streams']} "
             f"streams, {best['tokens_per_msg']} tokens per decode message), coordinator at "
             f"{best['coord_cpu']:.2f} cores; target "
             f"{'met' if best['meets_target'] else 'NOT met'}." if best else "No rows.",
             "Tokens per coordinator CPU-second (median over --streams; independent of the "
             "other load): " + ", ".join(
                 f"{k} tok/msg: {statistics.median(r['tok_per_coord_cpu_s'] for r in rows if r['tokens_per_msg'] == k):,.0f}"
                 for k in dict.fromkeys(r["tokens_per_msg"] for r in rows)) + ".",
             "", f"Requests: {args.prompt_len} prompt tokens, {args.output_len} output tokens, "
             f"ignore_eos, {'text' if args.text else 'token ids only (skip_text)'}; "
             f"{args.client_procs} client process(es); warm-up {args.warmup:g} s, window "
             f"{args.duration:g} s per cell.", "", "```", (__doc__ or "").strip(), "```"]
    title = "Coordinator streaming throughput (fake workers)"
    paths = [plotting.write_csv(os.path.join(out_dir, f"{NAME}.csv"), rows, COLUMNS),
             plotting.write_markdown(os.path.join(out_dir, f"{NAME}.md"), rows, COLUMNS,
                                     title=title, notes=notes, meta=meta, floatfmt=".4g")]
    series = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for n in dict.fromkeys(r["streams"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode and r["streams"] == n]
            if sel:
                series[f"{mode}, {n} streams"] = ([r["tokens_per_msg"] for r in sel],
                                                  [r["tokens_per_s"] for r in sel])
    ks = sorted({r["tokens_per_msg"] for r in rows})
    series["target (100k tok/s)"] = ([ks[0], ks[-1]], [TARGET_TOKENS_PER_S] * 2)
    png = plotting.plot_lines(
        os.path.join(out_dir, f"{NAME}.png"), series, xlabel="tokens per decode message",
        ylabel="tokens/s delivered to clients", logx=True, logy=True,
        title=f"{title}\n{meta['device']}; {meta['date'][:10]}; {meta['commit']}",
        styles={"target (100k tok/s)": "k--"})
    return paths + ([png] if png else [])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    err = check_args(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = run_meta()
    print(f"# {meta['device']}; load average {meta['load average (1/5/15 min) at start']}")
    rows: list[dict] = []
    with tempfile.NamedTemporaryFile("w+", prefix="pdserve-bench-coord-", suffix=".log") as log:
        cells = len(args.mode) * len(args.streams) * len(args.tokens_per_msg)
        bar = tqdm(total=cells, desc="coordinator", unit="cell")
        try:
            for mode in args.mode:
                rows += _run_mode(mode, args, log, bar)
        except (RuntimeError, OSError, ValueError) as e:
            bar.close()
            log.seek(0)
            tail = log.read()[-3000:]
            print(f"error: {e}\n{tail}", file=sys.stderr)
            return 1
        bar.close()
    meta["load average (1/5/15 min) at end"] = plotting.load_average()
    plotting.print_rows(rows, COLUMNS, args.json)
    best = best_row(rows)
    print(f"best: {best['tokens_per_s']:,.0f} tokens/s ({best['mode']}, {best['streams']} streams, "
          f"{best['tokens_per_msg']} tok/msg); target {TARGET_TOKENS_PER_S:,}: "
          f"{'met' if best['meets_target'] else 'NOT met'}")
    for p in write_results(args.out, rows, meta, args):
        print("wrote", p)
    return 0


# -- the client process ----------------------------------------------------------------------
async def _client_main(spec: dict) -> dict:
    import grpc

    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc
    from pdserve.proto.grpc_util import CHANNEL_OPTIONS

    loop = asyncio.get_running_loop()
    channel = grpc.aio.insecure_channel(spec["address"], options=CHANNEL_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), 30)
    stub = pb_grpc.CoordinatorStub(channel)
    print("ready", flush=True)
    t_start, t_end = map(float, (await loop.run_in_executor(None, sys.stdin.readline)).split())
    stats = {"tokens": 0, "msgs": 0, "done": 0, "errors": 0, "first_error": ""}
    sampling = pb.SamplingParams(max_tokens=spec["output_len"], ignore_eos=True, temperature=0.0)
    plen = spec["prompt_len"]

    async def one(i: int) -> None:
        k = 0
        while time.time() < t_end:
            base = (spec["seed"] * 7919 + i * 131 + k * 17) % 900
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[base + j % 90 for j in range(plen)]),
                                     sampling=sampling, skip_text=spec["skip_text"])
            k += 1
            call = stub.Generate(req)
            try:
                async for r in call:
                    now = time.time()
                    if now >= t_end:
                        break
                    if now >= t_start:
                        stats["tokens"] += len(r.token_ids)
                        stats["msgs"] += 1
                        stats["done"] += r.finished
            except grpc.aio.AioRpcError as e:
                if time.time() < t_end:
                    stats["errors"] += 1
                    stats["first_error"] = stats["first_error"] or f"{e.code().name}: {e.details()}"
                    await asyncio.sleep(0.01)
            finally:
                call.cancel()

    await asyncio.gather(*(one(i) for i in range(spec["streams"])))
    await channel.close(grace=None)
    return stats


def _client_entry(argv: list[str]) -> int:
    from pdserve.proto.grpc_util import install_uvloop

    spec = json.loads(argv[argv.index("--client") + 1])
    install_uvloop()
    print(json.dumps(asyncio.run(_client_main(spec))), flush=True)
    return 0


if __name__ == "__main__":
    if "--client" in sys.argv:
        raise SystemExit(_client_entry(sys.argv))
    parser = argparse.ArgumentParser(prog="pdserve bench coordinator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

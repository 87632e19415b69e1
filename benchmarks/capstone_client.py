"""The load generator of `pdserve bench capstone`: sends requests at their arrival times
(or with a fixed concurrency) to a pdserve coordinator (gRPC) or to any OpenAI-compatible
server (`/v1/completions`, streaming), and records each request's chunk timeline. Also a
GPU sampler (NVML) for utilization and memory per pool.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from pdserve.benchmarks.capstone_metrics import CUT, RequestResult
from pdserve.benchmarks.capstone_workloads import Request

# reserve_wait_ms (since plan7): how long token 0 waited at the coordinator for the decode
# worker's Reserve, the host-side wait in front of token 0 that the planner does not model
# (docs/capstone.md, "What branch plan7 found"); absent from the runs recorded before it
# ttft_ms (since branch hostsim's follow-up): the coordinator's own, from its receipt of the
# request to its send of token 0: against the client's TTFT it tells a wait inside the
# coordinator's path from one in the client's end of the stream (docs/capstone.md, "relay")
# accept_ms (since session 15): the client's send to the coordinator's handler start, from
# the handler's wall clock (`received_unix_s`) on the client's clocks: the wait in front of
# the handler, the gRPC server's accept path (docs/capstone.md, "Session 15")
SERVER_KEYS = ("queue_ms", "prefill_ms", "transfer_ms", "kv_bytes", "prefill_worker",
               "decode_worker", "reserve_wait_ms", "ttft_ms", "received_unix_s")


class Target(Protocol):
    """Where requests go. `stream` yields (tokens in this chunk, final server metrics or None)."""

    name: str

    def stream(self, req: Request, timeout_s: float) -> AsyncIterator[tuple[int, dict | None]]: ...

    async def close(self) -> None: ...


class GrpcTarget:
    """A pdserve coordinator through `AsyncClient` (greedy, ignore_eos, no detokenization)."""

    def __init__(self, address: str) -> None:
        from pdserve.coordinator.client import AsyncClient

        self.name = f"pdserve coordinator {address}"
        self.spec = ("grpc", address)  # what another process makes it from (make_target)
        self._client = AsyncClient(address)

    async def stream(self, req: Request, timeout_s: float):
        async for ch in self._client.stream(prompt_token_ids=req.prompt, max_tokens=req.output_len,
                                            temperature=0.0, ignore_eos=True, skip_text=True,
                                            timeout_s=timeout_s):
            server = None
            if ch.finished and ch.metrics:
                server = {k: ch.metrics[k] for k in SERVER_KEYS if k in ch.metrics}
            yield len(ch.token_ids), server

    async def close(self) -> None:
        await self._client.close()


def make_target(spec: tuple) -> Target:
    """The target a `spec` attribute names (GrpcTarget, OpenAITarget), made in this process."""
    return GrpcTarget(spec[1]) if spec[0] == "grpc" else OpenAITarget(spec[1], spec[2])


class OpenAITarget:
    """Any OpenAI-compatible server: POST {base_url}/v1/completions with "stream": true and
    the prompt as token ids. Tokens per SSE event: len(choices[0].token_ids) when the server
    sends them (pdserve's gateway does), else 1 per event with text (as vLLM's benchmark
    counts). Uses httpx, else aiohttp, else a minimal HTTP/1.1 client on asyncio streams."""

    def __init__(self, base_url: str, model: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"OpenAI-compatible {self.base_url}"
        self.spec = ("openai", self.base_url, model)
        self._httpx = self._aiohttp = self._aiohttp_mod = None
        try:
            import httpx
            self._httpx = httpx.AsyncClient(timeout=None)
        except ImportError:
            try:
                import aiohttp
                self._aiohttp_mod = aiohttp  # the session is created inside the running loop
            except ImportError:
                pass  # the plain-asyncio HTTP/1.1 client below

    def _body(self, req: Request, timeout_s: float) -> dict[str, Any]:
        body = {"prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "timeout": timeout_s,
                "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        return body

    async def _lines(self, req: Request, timeout_s: float) -> AsyncIterator[str]:
        url = self.base_url + "/v1/completions"
        if self._httpx is not None:
            async with self._httpx.stream("POST", url, json=self._body(req, timeout_s),
                                          timeout=timeout_s) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                async for line in resp.aiter_lines():
                    yield line
            return
        if self._aiohttp_mod is None:
            async for line in _plain_sse(url, self._body(req, timeout_s)):
                yield line
            return
        if self._aiohttp is None:
            aio = self._aiohttp_mod
            self._aiohttp = aio.ClientSession(timeout=aio.ClientTimeout(total=None))
        async with self._aiohttp.post(url, json=self._body(req, timeout_s)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]!r}")
            async for raw in resp.content:
                yield raw.decode()

    async def stream(self, req: Request, timeout_s: float):
        async for line in self._lines(req, timeout_s):
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(str(obj["error"]))
            choices = obj.get("choices") or [{}]
            ids = choices[0].get("token_ids")
            n = len(ids) if ids is not None else (1 if choices[0].get("text") else 0)
            yield n, None

    async def close(self) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()
        if self._aiohttp is not None:
            await self._aiohttp.close()


async def _plain_sse(url: str, body: dict[str, Any]) -> AsyncIterator[str]:
    """POST JSON and yield the response's lines (HTTP/1.1, plain or chunked body)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    tls = u.scheme == "https"
    reader, writer = await asyncio.open_connection(u.hostname, u.port or (443 if tls else 80),
                                                   ssl=tls or None)
    data = json.dumps(body).encode()
    writer.write(f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                 "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    try:
        status = (await reader.readline()).decode().split()
        headers = {}
        while (line := (await reader.readline()).decode().strip()):
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        if len(status) < 2 or status[1] != "200":
            raise RuntimeError(f"HTTP {' '.join(status[1:])}: {(await reader.read(300))!r}")
        if headers.get("transfer-encoding") == "chunked":
            buf = b""
            while (size := int((await reader.readline()).strip() or b"0", 16)):
                buf += await reader.readexactly(size)
                await reader.readline()
                *lines, buf = buf.split(b"\n")
                for ln in lines:
                    yield ln.decode()
            if buf:
                yield buf.decode()
        else:
            while (raw := await reader.readline()):
                yield raw.decode()
    finally:
        writer.close()


def with_accept_ms(server: dict, t_send: float) -> dict:
    """`server` with the coordinator's `received_unix_s` (wall clock) replaced by accept_ms:
    how long after `t_send` (time.perf_counter()) its handler started the call."""
    received = server.pop("received_unix_s", 0.0)
    if received > 0:
        server["accept_ms"] = (received - time.time() + time.perf_counter() - t_send) * 1e3
    return server


async def _one(target: Target, req: Request, res: RequestResult, timeout_s: float) -> None:
    try:
        async for n, server in target.stream(req, timeout_s):
            if n:
                res.chunks.append((time.perf_counter(), n))
            if server:
                res.server = with_accept_ms(server, res.t_send)
    except Exception as e:  # noqa: BLE001 - a failed request is a result, the run goes on
        res.error = f"{type(e).__name__}: {e}"[:300]


async def run_load(target: Target, requests: Sequence[Request], timeout_s: float,
                   concurrency: int = 0, desc: str = "",
                   time_limit_s: float = math.inf, start_at: float | None = None,
                   on_done: Callable[[], None] | None = None) -> list[RequestResult]:
    """Send every request at its `at_s` (or, with `concurrency` > 0, keep that many in
    flight, ignoring `at_s`); results in send order. Requests still running (or not sent)
    `time_limit_s` after the start are cancelled and end with the error CUT. The start is
    now, or `start_at` (time.perf_counter(): one clock for the processes of one host, so
    the load processes of capstone_load.py share it); `on_done` is called as each request
    ends (no progress bar then)."""
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc=desc, unit="req", leave=False,
               disable=on_done is not None)
    sem = asyncio.Semaphore(concurrency) if concurrency > 0 else None
    results: list[RequestResult] = []
    tasks = []

    async def go(req: Request, res: RequestResult) -> None:
        try:
            await _one(target, req, res, timeout_s)
        except asyncio.CancelledError:  # the run's time limit (the client cancels the RPC)
            res.error = CUT
        finally:
            if sem is not None:
                sem.release()
            bar.update()
            if on_done is not None:
                on_done()

    start = time.perf_counter() if start_at is None else start_at
    end = start + time_limit_s

    async def send_all() -> None:
        for req in requests:
            if sem is not None:
                await sem.acquire()
            else:
                delay = start + req.at_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            res = RequestResult(time.perf_counter(), len(req.prompt), target_tokens=req.output_len)
            results.append(res)
            tasks.append(asyncio.ensure_future(go(req, res)))

    sender = asyncio.ensure_future(send_all())
    try:
        await asyncio.wait_for(asyncio.shield(sender), None if math.isinf(end) else
                               max(0.0, end - time.perf_counter()))
        if tasks:
            left = None if math.isinf(end) else max(0.0, end - time.perf_counter())
            await asyncio.wait(tasks, timeout=left)
    except asyncio.TimeoutError:
        pass
    finally:
        sender.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(sender, *tasks, return_exceptions=True)
        bar.close()
    return results


def _nvml_or_nan(read) -> float:
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and the like
        return math.nan


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]", ""
        return math.nan


class BackgroundPoller:
    """A context manager running `_loop` on a daemon thread while the block runs, when
    `_active()`; `_loop` ends once `_stop` is set (`period_s` is its pace)."""

    join_s = 5.0
    thread_name = "poller"
    period_s: float

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _active(self) -> bool:
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        if self._active():
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name=self.thread_name)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.join_s)


class GpuSampler(BackgroundPoller):
    """Samples utilization (%), memory used (GiB), SM clock (MHz) and power (W) of the given
    GPU indices every `period_s` on a thread: through NVML (pynvml), else by running
    `nvidia-smi --query-gpu`. The clock and the power say whether a busy GPU ran slower
    (power or thermal capping), which profiles measured at low load do not show.
    `available` is False (with `note`) without either, or without GPUs."""

    def __init__(self, gpus: Sequence[int], period_s: float = 0.25) -> None:
        self.gpus, self.period_s = list(gpus), period_s
        # (time, util %, memory GiB, SM clock MHz, power W); NaN where not read
        self.samples: dict[int, list[tuple[float, ...]]] = {g: [] for g in self.gpus}
        self.available, self.note, self.source = False, "", ""
        super().__init__()
        if not self.gpus:
            self.note = "no GPU in this run (devices cpu): GPU utilization not measured"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handles = {g: pynvml.nvmlDeviceGetHandleByIndex(g) for g in self.gpus}
            self._nvml = pynvml
            self.available, self.source = True, "NVML"
        except Exception as e:  # noqa: BLE001 - ImportError or NVMLError: optional
            import shutil
            self._smi = shutil.which("nvidia-smi")
            if self._smi:
                self.available, self.source = True, "nvidia-smi --query-gpu"
                self.period_s = max(period_s, 0.5)  # one process per sample
            else:
                self.note = (f"NVML not available ({type(e).__name__}: {e}) and no nvidia-smi; "
                             "pip install nvidia-ml-py")

    def _read(self) -> dict[int, tuple[float, ...]]:
        """{gpu: (util %, memory GiB, SM clock MHz, power W)} now."""
        if self.source == "NVML":
            nv, out = self._nvml, {}
            for g, h in self._handles.items():
                try:
                    util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                    mem = nv.nvmlDeviceGetMemoryInfo(h).used / 2**30
                except Exception:  # noqa: BLE001
                    continue
                clock = _nvml_or_nan(lambda h=h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
                watts = _nvml_or_nan(lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1e3)
                out[g] = (util, mem, clock, watts)
            return out
        import subprocess
        try:
            text = subprocess.run(
                [self._smi, "--query-gpu=index,utilization.gpu,memory.used,clocks.sm,power.draw",
                 "--format=csv,noheader,nounits", "-i", ",".join(map(str, self.gpus))],
                capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        out = {}
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                extra = tuple(_float_or_nan(x) for x in (parts[3:5] + ["", ""])[:2])
                out[int(parts[0])] = (float(parts[1]), float(parts[2]) / 1024) + extra  # GiB
            except (ValueError, IndexError):
                continue
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            now = time.perf_counter()
            for g, vals in self._read().items():
                if g in self.samples:
                    self.samples[g].append((now, *vals))

    thread_name = "gpu-sampler"

    def _active(self) -> bool:
        return self.available

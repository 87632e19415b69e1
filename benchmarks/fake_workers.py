"""Fake workers (prefill / decode / both) that speak the Worker protocol with no model.

The fake "model": output token 0 = (last prompt token + 1) % vocab, then each next token is
(previous + 1) % vocab; `fake_outputs()` gives the expected ids. KV "transfer" from a fake
prefill to a fake decode worker is a direct call looked up by kv_address (given in the
Prefill, or later by SetKvTarget, as the engine's prefill role takes it): both in one
process, or with --kv-elsewhere in any (the KV then counts as sent). Block counts are real
enough for leak checks (Stats: free == total when idle). Knobs inject refusal, slowness
and death. Used by the coordinator tests (tests/fake_worker.py) and by `pdserve bench
coordinator`, which runs them as a separate process:

    python -m pdserve.benchmarks.fake_workers --coordinator HOST:PORT --prefill 1 --decode 1

That process prints `fake workers ready` once every worker is registered, then reads
commands on stdin, one per line, answering `ok` (or `error: ...`): `chunk_tokens K` (tokens
per streamed TokenChunk), `chunk_delay_s S` (pause before each chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import dataclass

import grpc

from pdserve.benchmarks.fake_model import (  # noqa: F401 - the fake workers' API
    EOS,
    VOCAB,
    FakeTokenizer,
    fake_logprobs,
    fake_outputs,
)
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import cluster_secret
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import ROLE_BY_NAME, sampling_fields
from pdserve.proto.faults import PEER
from pdserve.proto.grpc_util import WORKER_SERVICE, add_standard_services
from pdserve.proto.guard import WORKER_PLANES, Guard
from pdserve.worker.coordinator_link import CoordinatorLink

_ENDPOINTS: dict[bytes, FakeWorker] = {}  # fake transfer addresses -> decode workers


@dataclass
class Knobs:
    refuse_reserve: bool = False
    prefill_delay_s: float = 0.0
    chunk_delay_s: float = 0.0  # between streamed chunks
    chunk_tokens: int = 4
    die_on_prefill: bool = False  # stop the server when a Prefill arrives
    die_after_chunks: int = 0  # > 0: stop the server after streaming this many chunks
    stall_after_chunks: int = 0  # > 0: a stream goes silent (alive) after this many chunks
    bad_kv_address: bool = False  # decode: Reserve answers a KV endpoint nobody can reach
    reserve_delay_s: float = 0.0  # decode: Reserve answers after this long
    fail_reserve: bool = False  # decode: Reserve fails (INTERNAL)
    target_timeout_s: float = 5.0  # prefill: a KV target that does not come ends the Prefill
    extra_queued_tokens: int = 0  # reported in heartbeats (steers least_loaded)
    kv_elsewhere: bool = False  # KV counts as sent and landed: P and D in separate processes


class _Req:
    def __init__(self, prompt: list[int], sampling: pb.SamplingParams, blocks: int,
                 num_output_tokens: int = 0) -> None:
        self.prompt, self.blocks = prompt, blocks
        sp = SamplingParams(**sampling_fields(sampling))
        self.outputs, self.reason = fake_outputs(prompt, sp.max_tokens - num_output_tokens,
                                                 sp.stop_token_ids, sp.ignore_eos)
        self.logprobs = sp.logprobs  # None, or k
        self.kv_ready = asyncio.Event()
        self.aborted = asyncio.Event()
        self.kv_target: asyncio.Future | None = None  # prefill: (kv_address, reachable)

    def logprobs_of(self, tokens: list[int]) -> list[pb.TokenLogprobs]:
        return [] if self.logprobs is None else [fake_logprobs(t, self.logprobs) for t in tokens]


class FakeWorker(pb_grpc.WorkerServicer):
    def __init__(self, role: str, coordinator: str | None = None, *, num_blocks: int = 64,
                 block_size: int = 16, max_model_len: int = 512, worker_id: str = "",
                 model: str = "fake-model", auth_token: str | None = None,
                 knobs: Knobs | None = None, cluster_secret: str | None = None) -> None:
        self.role, self.coordinator, self.auth_token = role, coordinator, auth_token
        self.cluster_secret = cluster_secret  # required of Worker RPCs, sent to the coordinator
        self.total, self.free, self.block_size = num_blocks, num_blocks, block_size
        self.max_model_len, self.model = max_model_len, model
        self.worker_id, self.knobs = worker_id, knobs or Knobs()
        self.reqs: dict[str, _Req] = {}
        self.aborts: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (rpc, request_id)
        self.dead = False

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> FakeWorker:
        self.server = grpc.aio.server(interceptors=[Guard(WORKER_PLANES,
                                                          cluster_secret=self.cluster_secret)])
        pb_grpc.add_WorkerServicer_to_server(self, self.server)
        await add_standard_services(self.server, [WORKER_SERVICE])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.link = None
        # the KV endpoint is named by the server's address: it exists before registration
        # (a coordinator may warm this worker's transfer paths first)
        self.kv_address = f"fake://{self.address}".encode()
        _ENDPOINTS[self.kv_address] = self
        if self.coordinator:
            self.link = CoordinatorLink(self.coordinator, self.info(), self.load,
                                        self.cluster_secret or self.auth_token)
            self.worker_id = await self.link.start(timeout_s=5)
        return self

    def info(self) -> pb.WorkerInfo:
        return pb.WorkerInfo(
            worker_id=self.worker_id, role=ROLE_BY_NAME[self.role], address=self.address,
            model=self.model, max_model_len=self.max_model_len, vocab_size=VOCAB,
            kv=pb.KVGeometry(num_layers=2, num_kv_heads=1, head_dim=8, block_size=self.block_size,
                             dtype="float32"), total_blocks=self.total, device="cpu",
            transfer_backend="fake")

    async def kill(self) -> None:
        """Die: heartbeats stop, the server goes away, in-flight RPCs break."""
        self.dead = True
        _ENDPOINTS.pop(self.kv_address, None)
        if self.link is not None:
            await self.link.stop()
        await self.server.stop(0)

    # -- blocks ------------------------------------------------------------------------
    def load(self) -> pb.WorkerLoad:
        waiting = sum(not r.kv_ready.is_set() for r in self.reqs.values())
        return pb.WorkerLoad(free_blocks=self.free, total_blocks=self.total,
                             running=len(self.reqs) - waiting, waiting=waiting,
                             queued_prefill_tokens=self.knobs.extra_queued_tokens)

    def _alloc(self, rid: str, prompt: list[int], sampling: pb.SamplingParams,
               n_tokens: int, num_output_tokens: int = 0) -> _Req | None:
        need = math.ceil(n_tokens / self.block_size)
        if need > self.free or rid in self.reqs:
            return None
        self.free -= need
        self.reqs[rid] = r = _Req(prompt, sampling, need, num_output_tokens)
        return r

    def _release(self, rid: str) -> None:
        r = self.reqs.pop(rid, None)
        if r is not None:
            self.free += r.blocks
            r.aborted.set()

    # -- Worker service ---------------------------------------------------------------
    async def Reserve(self, request, context):
        self.calls.append(("Reserve", request.request_id))
        if self.knobs.reserve_delay_s:
            await asyncio.sleep(self.knobs.reserve_delay_s)
        if self.knobs.fail_reserve:
            await context.abort(grpc.StatusCode.INTERNAL, "fake: Reserve failed")
        if self.knobs.refuse_reserve:
            return pb.ReserveReply(accepted=False, reason="fake: refusing reservations")
        k = request.num_output_tokens
        n = len(request.prompt_token_ids) + request.sampling.max_tokens - k
        r = self._alloc(request.request_id, list(request.prompt_token_ids), request.sampling, n, k)
        if r is None:
            return pb.ReserveReply(accepted=False, reason=f"no free blocks (free {self.free})")
        if self.knobs.kv_elsewhere:
            r.kv_ready.set()
        address = b"fake://nowhere" if self.knobs.bad_kv_address else self.kv_address
        return pb.ReserveReply(accepted=True, kv_address=address,
                               block_ids=list(range(r.blocks)))

    def deliver_kv(self, rid: str, first_token: int) -> bool:
        r = self.reqs.get(rid)
        if r is None or r.aborted.is_set():
            return False
        assert r.outputs[0] == first_token
        r.kv_ready.set()
        return True

    async def Prefill(self, request, context):
        rid = request.request_id
        self.calls.append(("Prefill", rid))
        if self.knobs.die_on_prefill:
            asyncio.get_running_loop().create_task(self.kill())
            await asyncio.sleep(30)
        prompt = list(request.prompt_token_ids)
        r = self._alloc(rid, prompt, request.sampling, len(prompt), request.num_output_tokens)
        if r is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "fake: no prefill blocks")
        address = request.kv_address
        if not address:  # the target comes later, in a SetKvTarget
            r.kv_target = asyncio.get_running_loop().create_future()
        elif address not in _ENDPOINTS and not self.knobs.kv_elsewhere:  # as the engine's
            self._release(rid)
            await context.abort(grpc.StatusCode.UNAVAILABLE, _unreachable(address),
                                trailing_metadata=PEER)
        try:
            if self.knobs.prefill_delay_s:
                await asyncio.wait_for(r.aborted.wait(), self.knobs.prefill_delay_s)
        except asyncio.TimeoutError:
            pass
        try:
            if r.aborted.is_set():
                await context.abort(grpc.StatusCode.CANCELLED, f"request {rid} aborted")
            reply = pb.PrefillReply(first_token=r.outputs[0], finished=len(r.outputs) == 1,
                                    finish_reason=r.reason if len(r.outputs) == 1 else "")
            for lp in r.logprobs_of(r.outputs[:1]):
                reply.first_logprobs.CopyFrom(lp)
            yield reply  # token 0 first, as the engine's prefill role does
            if r.kv_target is not None:
                address = await self._kv_target(rid, r, context)
            dst = _ENDPOINTS.get(address)
            if not (dst.deliver_kv(rid, r.outputs[0]) if dst else self.knobs.kv_elsewhere):
                await context.abort(grpc.StatusCode.ABORTED, "fake transfer: destination gone")
            reply.kv_done, reply.kv_bytes = True, len(prompt) * 64
            reply.timings.CopyFrom(pb.Timings(prefill_ms=1.0, transfer_ms=0.5))
            yield reply
        finally:
            self._release(rid)

    async def _kv_target(self, rid: str, r: _Req, context) -> bytes:
        """The KV address a SetKvTarget gives (or the Prefill ends, as the engine's does)."""
        aborted = asyncio.ensure_future(r.aborted.wait())
        try:
            await asyncio.wait([r.kv_target, aborted], timeout=self.knobs.target_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
        if r.aborted.is_set():
            await context.abort(grpc.StatusCode.CANCELLED, f"request {rid} aborted")
        if not r.kv_target.done():
            await context.abort(grpc.StatusCode.ABORTED, "KV transfer failed: no KV target "
                                f"(SetKvTarget) came within {self.knobs.target_timeout_s:g} s")
        address, reachable = r.kv_target.result()
        if not reachable:  # SetKvTarget could not connect
            await context.abort(grpc.StatusCode.UNAVAILABLE, _unreachable(address),
                                trailing_metadata=PEER)
        return address

    async def SetKvTarget(self, request, context):
        rid = request.request_id
        self.calls.append(("SetKvTarget", rid))
        for _ in range(100):  # the Prefill may be handled second
            r = self.reqs.get(rid)
            if r is not None:
                break
            await asyncio.sleep(0.01)
        if r is None or r.kv_target is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no Prefill of request {rid!r}")
        if r.kv_target.done():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"request {rid!r} already has a KV target")
        reachable = request.kv_address in _ENDPOINTS or self.knobs.kv_elsewhere
        r.kv_target.set_result((request.kv_address, reachable))
        if not reachable:  # the Prefill ends the same way
            await context.abort(grpc.StatusCode.UNAVAILABLE, _unreachable(request.kv_address),
                                trailing_metadata=PEER)
        return pb.KvTargetReply()

    async def _stream(self, rid: str, r: _Req, tokens: list[int], context):
        k = max(1, self.knobs.chunk_tokens)
        for n, i in enumerate(range(0, len(tokens), k)):
            if n and n == self.knobs.die_after_chunks:
                asyncio.get_running_loop().create_task(self.kill())
                await asyncio.sleep(30)
            if n and n == self.knobs.stall_after_chunks:
                await r.aborted.wait()
            if self.knobs.chunk_delay_s:
                await asyncio.sleep(self.knobs.chunk_delay_s)
            if r.aborted.is_set():
                await context.abort(grpc.StatusCode.CANCELLED, f"request {rid} aborted")
            yield pb.TokenChunk(token_ids=tokens[i:i + k], logprobs=r.logprobs_of(tokens[i:i + k]))
        yield pb.TokenChunk(finished=True, finish_reason=r.reason,
                            timings=pb.Timings(decode_ms=1.0, transfer_ms=0.5))

    async def DecodeStream(self, request, context):
        rid = request.request_id
        self.calls.append(("DecodeStream", rid))
        r = self.reqs.get(rid)
        if r is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation for {rid}")
        try:
            waits = [asyncio.ensure_future(e.wait()) for e in (r.kv_ready, r.aborted)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if r.aborted.is_set():
                await context.abort(grpc.StatusCode.CANCELLED, f"request {rid} aborted")
            async for chunk in self._stream(rid, r, r.outputs[1:], context):
                yield chunk
        finally:
            self._release(rid)

    async def Generate(self, request, context):
        rid = request.request_id
        self.calls.append(("Generate", rid))
        prompt, k = list(request.prompt_token_ids), request.num_output_tokens
        r = self._alloc(rid, prompt, request.sampling,
                        len(prompt) + request.sampling.max_tokens - k, k)
        if r is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "fake: no free blocks")
        try:
            r.kv_ready.set()
            if self.knobs.prefill_delay_s:
                await asyncio.sleep(self.knobs.prefill_delay_s)
            async for chunk in self._stream(rid, r, r.outputs, context):
                yield chunk
        finally:
            self._release(rid)

    async def Abort(self, request, context):
        self.aborts.append(request.request_id)
        found = request.request_id in self.reqs
        self._release(request.request_id)
        return pb.AbortReply(found=found)

    async def Stats(self, request, context):
        return pb.WorkerStatsReply(load=self.load(), worker_id=self.worker_id)


def _unreachable(address: bytes) -> str:
    return f"cannot reach the decode worker's KV endpoint {address!r}"


# -- a process of fake workers -------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdserve.benchmarks.fake_workers",
                                description="Fake workers (no model) registered with a coordinator.")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--both", type=int, default=0)
    p.add_argument("--chunk-tokens", type=int, default=4, help="tokens per TokenChunk")
    p.add_argument("--kv-elsewhere", action="store_true", help="KV counts as sent (Knobs)")
    p.add_argument("--num-blocks", type=int, default=1 << 20)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1 << 16)
    p.add_argument("--model", default="fake-model",
                   help="model name registered (the coordinator loads its tokenizer)")
    p.add_argument("--auth-token", default=None)
    cluster_secret.add_argument(p)
    return p


def apply_command(line: str, workers: list[FakeWorker]) -> str:
    """One stdin command (see the module docstring) -> the reply line."""
    parts = line.split()
    if len(parts) != 2 or parts[0] not in ("chunk_tokens", "chunk_delay_s"):
        return f"error: unknown command {line.strip()!r}"
    try:
        value = int(parts[1]) if parts[0] == "chunk_tokens" else float(parts[1])
    except ValueError:
        return f"error: bad value {parts[1]!r}"
    if value < (1 if parts[0] == "chunk_tokens" else 0):
        return f"error: {parts[0]} out of range: {value}"
    for w in workers:
        setattr(w.knobs, parts[0], value)
        w.calls.clear()
    return "ok"


async def serve(args: argparse.Namespace) -> None:
    workers: list[FakeWorker] = []
    for role, n in (("prefill", args.prefill), ("decode", args.decode), ("both", args.both)):
        for _ in range(n):
            w = FakeWorker(role, args.coordinator, num_blocks=args.num_blocks,
                           block_size=args.block_size, max_model_len=args.max_model_len,
                           model=args.model, auth_token=args.auth_token,
                           knobs=Knobs(chunk_tokens=args.chunk_tokens,
                                       kv_elsewhere=args.kv_elsewhere),
                           cluster_secret=cluster_secret.from_args(args))
            workers.append(await w.start())
    print("fake workers ready", " ".join(f"{w.role}={w.address}" for w in workers), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:  # stdin closed: the parent is gone
            break
        if line.strip():
            print(apply_command(line, workers), flush=True)
    for w in workers:
        await w.kill()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pdserve.proto.grpc_util import install_uvloop

    install_uvloop()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

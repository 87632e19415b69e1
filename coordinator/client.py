"""Python clients of the coordinator: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as c:
        c.wait_ready(n_prefill=1, n_decode=1)
        r = c.generate("Hello", max_tokens=32, temperature=0)
        print(r.text, r.token_ids, r.finish_reason, r.metrics["ttft_ms"])
        for chunk in c.stream(prompt_token_ids=[1, 2, 3], sampling={"max_tokens": 8}):
            print(chunk.token_ids, chunk.text)
        r = c.chat([{"role": "user", "content": "Hi!"}], max_tokens=64)  # or stream(messages=...)

Sampling comes from `sampling` (SamplingParams or dict) plus keyword overrides (max_tokens,
temperature, top_p, top_k, seed, stop_token_ids, ignore_eos). `logprobs=True` (and
`top_logprobs=k`, at most 20) gives each token's log-probability (and the k most likely
tokens') in `Chunk.logprobs` / `Result.logprobs`, as SamplingParams(logprobs=k) does. Failures raise `ClientError`
with the gRPC status `code` and the coordinator's `details`. Chat messages are rendered by
the coordinator with the model's chat template, so a client needs no tokenizer.

TLS: `Client(address, tls=TLSConfig(ca_file="ca.pem"))` (proto/tls.py; add `cert_file` and
`key_file` for mutual TLS). An UNAVAILABLE error says when TLS may be the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve.coordinator.client_errors import ClientError, _hint
from pdserve.coordinator.client_logprobs import TokenLogprob, logprobs_override, response_logprobs
from pdserve.coordinator.failover import Failover, should_fail_over
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import ROLE_NAME, sampling_to_proto
from pdserve.proto.grpc_util import auth_metadata, new_channel, new_sync_channel
from pdserve.proto.tls import TLSConfig

__all__ = ["AsyncClient", "Chunk", "Client", "ClientError", "Result", "TokenLogprob"]


@dataclass(slots=True)
class Chunk:
    """One streamed message: new token ids and their text delta."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str
    metrics: dict[str, Any] | None  # on the final chunk
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked


@dataclass(slots=True)
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked


def to_dict(msg) -> dict[str, Any]:
    """A message as a plain dict (ints stay ints; enums as names; roles as 'prefill'...)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        if f.message_type is not None:
            v = [to_dict(x) for x in v] if f.is_repeated else to_dict(v)
        elif f.is_repeated:
            v = list(v)
        elif f.enum_type is not None:
            v = ROLE_NAME.get(v, "unspecified") if f.enum_type.name == "Role" else \
                f.enum_type.values_by_number[v].name
        out[f.name] = v
    return out


Messages = Sequence[Mapping[str, str]]  # [{"role": "user", "content": "..."}, ...]


def _request(prompt: str | Sequence[int] | None, prompt_token_ids: Sequence[int] | None,
             sampling: Any, request_id: str | None, skip_text: bool,
             overrides: Mapping[str, Any], messages: Messages | None = None) -> pb.GenerateRequest:
    overrides = logprobs_override(overrides)
    if prompt is not None and not isinstance(prompt, str):
        prompt, prompt_token_ids = None, prompt
    if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt (text), prompt_token_ids or messages")
    req = pb.GenerateRequest(sampling=sampling_to_proto(sampling, **overrides),
                             request_id=request_id or "", skip_text=skip_text)
    if prompt is not None:
        req.text = prompt
    elif messages is not None:
        for m in messages:
            req.chat.messages.add(role=str(m["role"]), content=str(m["content"]))
        req.chat.SetInParent()  # an empty list is still a chat (the coordinator refuses it)
    else:
        req.token_ids.ids.extend(int(t) for t in prompt_token_ids)
    return req


def _chunk(r: pb.GenerateResponse) -> Chunk:
    return Chunk(r.request_id, list(r.token_ids), r.text, r.finished, r.finish_reason,
                 to_dict(r.metrics) if r.finished else None, response_logprobs(r))


class _Accumulator:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.result = Result([], "", "")

    def add(self, c: Chunk) -> None:
        self.ids += c.token_ids
        self.texts.append(c.text)
        if c.logprobs is not None:
            self.logprobs = (self.logprobs or []) + c.logprobs
        self.result.request_id = c.request_id
        if c.finished:
            self.result = Result(self.ids, "".join(self.texts), c.finish_reason, c.metrics or {},
                                 c.request_id, self.logprobs)


class _ReadyPoll:
    """One wait_ready loop: judges each ListWorkers answer (or error) and times out with the
    last reason. Shared by Client and AsyncClient, which only differ in how they call."""

    interval_s = 0.05

    def __init__(self, address: str, n_prefill: int, n_decode: int, n_both: int,
                 timeout_s: float, tls: TLSConfig | None = None) -> None:
        self.address, self.want, self.timeout_s = address, (n_prefill, n_decode, n_both), timeout_s
        self.tls = tls
        self.end = time.monotonic() + timeout_s
        self.msg = "coordinator not reachable"

    def ready(self, reply: pb.ListWorkersReply | None,
              error: grpc.RpcError | None = None) -> list[dict[str, Any]] | None:
        """The workers once enough of each role are registered; None: ask again."""
        if error is not None:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ClientError.from_rpc(error) from None
            self.msg = (f"coordinator at {self.address}: {error.code().name}: {error.details()}"
                        + _hint(error, self.tls))
        else:
            roles = (pb.ROLE_PREFILL, pb.ROLE_DECODE, pb.ROLE_BOTH)
            have = [sum(w.info.role == r for w in reply.workers) for r in roles]
            if all(h >= w for h, w in zip(have, self.want)):
                return [to_dict(w) for w in reply.workers]
            self.msg = (f"{have[0]} prefill, {have[1]} decode, {have[2]} both registered; "
                        f"wanted {self.want[0]}, {self.want[1]}, {self.want[2]}")
        if time.monotonic() >= self.end:
            raise TimeoutError(f"workers not ready after {self.timeout_s:g} s: {self.msg}")
        return None


def _stream_error(e: grpc.RpcError, address: str, chunks: int,
                  tls: TLSConfig | None) -> ClientError:
    if chunks and should_fail_over(e):
        return ClientError(e.code(), f"coordinator {address} lost the stream after {chunks} "
                           f"chunk(s): {e.details()}")
    return ClientError.from_rpc(e, tls)


class Client:
    """Blocking client. `timeout_s` is the default deadline of each call (None: none)."""

    def __init__(self, address: str | Sequence[str], timeout_s: float | None = None,
                 auth_token: str | None = None, tls: TLSConfig | None = None) -> None:
        # several addresses ("a:1,b:2" or a list): coordinators of one cluster, with
        # failover between them (coordinator/failover.py)
        if tls is not None and tls.dials_tls:
            tls.check()  # a wrong file is TLSError here, not UNAVAILABLE at the first call
        self.tls = tls
        self._pool = Failover(address, lambda a: new_sync_channel(a, tls), lambda ch: ch.close())
        self.address = ",".join(self._pool.addresses)
        self.timeout_s = timeout_s
        self._md = auth_metadata(auth_token)

    @property
    def _stub(self) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(self._pool.get()[1])

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def stream(self, prompt: str | Sequence[int] | None = None,
               prompt_token_ids: Sequence[int] | None = None, sampling: Any = None, *,
               request_id: str | None = None, skip_text: bool = False,
               timeout_s: float | None = None, messages: Messages | None = None,
               **sampling_kw: Any) -> Iterator[Chunk]:
        req = _request(prompt, prompt_token_ids, sampling, request_id, skip_text, sampling_kw,
                       messages)
        timeout = self._timeout(timeout_s)
        end = None if timeout is None else time.monotonic() + timeout
        for attempt in range(self._pool.attempts()):
            address, channel = self._pool.get()
            left = None if end is None else max(0.0, end - time.monotonic())
            call = pb_grpc.CoordinatorStub(channel).Generate(req, timeout=left, metadata=self._md)
            chunks = 0
            try:
                for r in call:
                    chunks += 1
                    yield _chunk(r)
                return
            except grpc.RpcError as e:
                if chunks == 0 and should_fail_over(e) and attempt + 1 < self._pool.attempts():
                    self._pool.failed(address)  # nothing reached the caller: call the next one
                    continue
                raise _stream_error(e, address, chunks, self.tls) from None
            finally:
                call.cancel()  # no-op when finished; cancels when the caller stops early

    def generate(self, prompt: str | Sequence[int] | None = None,
                 prompt_token_ids: Sequence[int] | None = None, sampling: Any = None,
                 **kw: Any) -> Result:
        acc = _Accumulator()
        for c in self.stream(prompt, prompt_token_ids, sampling, **kw):
            acc.add(c)
        return acc.result

    def chat(self, messages: Messages, sampling: Any = None, **kw: Any) -> Result:
        """The next assistant turn of `messages`, rendered by the coordinator with the
        model's chat template (INVALID_ARGUMENT if the model has none)."""
        return self.generate(None, None, sampling, messages=messages, **kw)

    def _unary(self, method: str, request, timeout_s: float | None = None):
        for attempt in range(self._pool.attempts()):
            address, channel = self._pool.get()
            try:
                return getattr(pb_grpc.CoordinatorStub(channel), method)(
                    request, timeout=self._timeout(timeout_s), metadata=self._md)
            except grpc.RpcError as e:
                if should_fail_over(e) and attempt + 1 < self._pool.attempts():
                    self._pool.failed(address)
                    continue
                raise ClientError.from_rpc(e, self.tls) from None

    def abort(self, request_id: str) -> bool:
        return self._unary("Abort", pb.AbortRequest(request_id=request_id)).found

    def stats(self, live: bool = False) -> dict[str, Any]:
        return to_dict(self._unary("Stats", pb.StatsRequest(live=live)))

    def list_workers(self) -> list[dict[str, Any]]:
        return [to_dict(w) for w in self._unary("ListWorkers", pb.ListWorkersRequest()).workers]

    def wait_ready(self, n_prefill: int = 0, n_decode: int = 0, n_both: int = 0,
                   timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Block until that many workers of each role are registered; TimeoutError if not."""
        poll = _ReadyPoll(self.address, n_prefill, n_decode, n_both, timeout_s, self.tls)
        while True:
            address, channel = self._pool.get()
            try:
                reply, error = pb_grpc.CoordinatorStub(channel).ListWorkers(
                    pb.ListWorkersRequest(), timeout=2.0, metadata=self._md), None
            except grpc.RpcError as e:
                reply, error = None, e
                self._pool.failed(address)
            workers = poll.ready(reply, error)
            if workers is not None:
                return workers
            time.sleep(poll.interval_s)

    def close(self) -> None:
        self._pool.close_all()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as `Client`, as coroutines / async iterators.

    The channel is created on first use, inside the running event loop.
    """

    def __init__(self, address: str | Sequence[str], timeout_s: float | None = None,
                 auth_token: str | None = None, tls: TLSConfig | None = None) -> None:
        if tls is not None and tls.dials_tls:
            tls.check()
        self.tls = tls
        self._pool = Failover(address, lambda a: new_channel(a, tls=tls),
                              lambda ch: ch.close())  # failover as in Client
        self.address = ",".join(self._pool.addresses)
        self.timeout_s = timeout_s
        self._md = auth_metadata(auth_token)

    @property
    def _stub(self) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(self._pool.get()[1])

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    async def stream(self, prompt: str | Sequence[int] | None = None,
                     prompt_token_ids: Sequence[int] | None = None, sampling: Any = None, *,
                     request_id: str | None = None, skip_text: bool = False,
                     timeout_s: float | None = None, messages: Messages | None = None,
                     **sampling_kw: Any) -> AsyncIterator[Chunk]:
        req = _request(prompt, prompt_token_ids, sampling, request_id, skip_text, sampling_kw,
                       messages)
        timeout = self._timeout(timeout_s)
        end = None if timeout is None else time.monotonic() + timeout
        for attempt in range(self._pool.attempts()):
            address, channel = self._pool.get()
            left = None if end is None else max(0.0, end - time.monotonic())
            call = pb_grpc.CoordinatorStub(channel).Generate(req, timeout=left, metadata=self._md)
            chunks = 0
            try:
                async for r in call:
                    chunks += 1
                    yield _chunk(r)
                return
            except grpc.RpcError as e:
                if chunks == 0 and should_fail_over(e) and attempt + 1 < self._pool.attempts():
                    self._pool.failed(address)
                    continue
                raise _stream_error(e, address, chunks, self.tls) from None
            finally:
                call.cancel()

    async def generate(self, prompt: str | Sequence[int] | None = None,
                       prompt_token_ids: Sequence[int] | None = None, sampling: Any = None,
                       **kw: Any) -> Result:
        acc = _Accumulator()
        async for c in self.stream(prompt, prompt_token_ids, sampling, **kw):
            acc.add(c)
        return acc.result

    async def chat(self, messages: Messages, sampling: Any = None, **kw: Any) -> Result:
        """As Client.chat."""
        return await self.generate(None, None, sampling, messages=messages, **kw)

    async def _unary(self, method_name: str, request, timeout_s: float | None = None):
        for attempt in range(self._pool.attempts()):
            address, channel = self._pool.get()
            try:
                return await getattr(pb_grpc.CoordinatorStub(channel), method_name)(
                    request, timeout=self._timeout(timeout_s), metadata=self._md)
            except grpc.RpcError as e:
                if should_fail_over(e) and attempt + 1 < self._pool.attempts():
                    self._pool.failed(address)
                    continue
                raise ClientError.from_rpc(e, self.tls) from None

    async def abort(self, request_id: str) -> bool:
        return (await self._unary("Abort", pb.AbortRequest(request_id=request_id))).found

    async def stats(self, live: bool = False) -> dict[str, Any]:
        return to_dict(await self._unary("Stats", pb.StatsRequest(live=live)))

    async def list_workers(self) -> list[dict[str, Any]]:
        reply = await self._unary("ListWorkers", pb.ListWorkersRequest())
        return [to_dict(w) for w in reply.workers]

    async def wait_ready(self, n_prefill: int = 0, n_decode: int = 0, n_both: int = 0,
                         timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until that many workers of each role are registered; TimeoutError if not."""
        poll = _ReadyPoll(self.address, n_prefill, n_decode, n_both, timeout_s, self.tls)
        while True:
            address, channel = self._pool.get()
            try:
                reply, error = await pb_grpc.CoordinatorStub(channel).ListWorkers(
                    pb.ListWorkersRequest(), timeout=2.0, metadata=self._md), None
            except grpc.RpcError as e:
                reply, error = None, e
                self._pool.failed(address)
            workers = poll.ready(reply, error)
            if workers is not None:
                return workers
            await asyncio.sleep(poll.interval_s)

    async def close(self) -> None:
        for closing in self._pool.close_all():
            await closing

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

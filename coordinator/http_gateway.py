"""A small OpenAI-compatible HTTP/1.1 gateway in front of the coordinator's gRPC service.

    POST /v1/completions  {"prompt": "..." | [ids], "max_tokens", "temperature", "top_p",
                           "top_k", "seed", "stop_token_ids", "ignore_eos", "stream",
                           "timeout" (seconds, extension)}
    GET  /v1/models       GET /health

No dependencies beyond asyncio: one connection per request (`Connection: close`); SSE
(`data: {...}` lines, then `data: [DONE]`) for `"stream": true`. The client's
`Authorization` header is passed on to gRPC, so the coordinator's token check applies. A gRPC
status becomes an HTTP status (400, 401, 429, 499, 503, 504, ...) with an OpenAI-style body.
A client that disconnects cancels its request, which aborts it on the workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import grpc

from pdserve.coordinator.client import ClientError, _chunk, _request
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.grpc_util import CHANNEL_OPTIONS

log = logging.getLogger("pdserve.coordinator.http")
C = grpc.StatusCode
HTTP_STATUS = {C.INVALID_ARGUMENT: 400, C.OUT_OF_RANGE: 400, C.FAILED_PRECONDITION: 400,
               C.UNAUTHENTICATED: 401, C.PERMISSION_DENIED: 403, C.NOT_FOUND: 404,
               C.ALREADY_EXISTS: 409, C.RESOURCE_EXHAUSTED: 429, C.CANCELLED: 499,
               C.UNAVAILABLE: 503, C.DEADLINE_EXCEEDED: 504}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
           429: "Too Many Requests", 499: "Client Closed Request", 500: "Internal Server Error",
           503: "Service Unavailable", 504: "Gateway Timeout"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}
MAX_BODY_BYTES = 16 << 20
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids",
                   "ignore_eos")


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    @classmethod
    def from_client(cls, e: ClientError) -> HttpError:
        return cls(HTTP_STATUS.get(e.code, 500), e.details, e.code.name)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "code": self.code or None,
                          "type": ERROR_TYPES.get(self.status, "server_error")}}


def _head(status: int, ctype: str, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Content-Type: {ctype}",
             "Connection: close", "Cache-Control: no-cache"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def parse_completion(body: dict[str, Any]) -> tuple[pb.GenerateRequest, bool, float | None]:
    """OpenAI completion body -> (GenerateRequest, stream, timeout_s); HttpError(400) if bad."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if not (isinstance(prompt, str) or
            (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
        raise HttpError(400, "prompt must be a string or a list of token ids (no batches)")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise HttpError(400, "only n = 1 is supported")
    if body.get("stop"):
        raise HttpError(400, "stop strings are not supported; use stop_token_ids")
    sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    sampling.setdefault("max_tokens", 16)
    timeout = body.get("timeout")
    try:
        ids = prompt if isinstance(prompt, list) else None
        req = _request(None if ids is not None else prompt, ids, sampling, None, False, {})
    except (TypeError, ValueError) as e:
        raise HttpError(400, f"bad request: {e}") from None
    return req, bool(body.get("stream")), float(timeout) if timeout is not None else None


class HttpGateway:
    def __init__(self, grpc_address: str, auth_token: str | None = None) -> None:
        self.grpc_address = grpc_address
        self.auth_token = auth_token  # used when the HTTP client sends no Authorization
        self._server: asyncio.base_events.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CoordinatorStub | None = None
        self.address: str | None = None

    async def start(self, host: str, port: int) -> int:
        self._channel = grpc.aio.insecure_channel(self.grpc_address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._server = await asyncio.start_server(self._handle, host, port, limit=1 << 16)
        bound = self._server.sockets[0].getsockname()[1]
        self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{bound}"
        log.info("HTTP gateway listening on http://%s", self.address)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._channel is not None:
            await self._channel.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, headers, body = await self._read_request(reader)
            work = asyncio.ensure_future(self._route(method, path, headers, body, writer))
            gone = asyncio.ensure_future(reader.read(1))  # b"" when the client hangs up
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()  # client disconnected: cancels the gRPC call -> Abort
            gone.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        except HttpError as e:
            await self._send_json(writer, e.status, e.body())
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:  # noqa: BLE001
            log.exception("HTTP handler failed")
        finally:
            writer.close()

    async def _read_request(self, reader):
        line = (await reader.readline()).decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3:
            raise HttpError(400, "malformed request line")
        headers: dict[str, str] = {}
        while (h := (await reader.readline()).decode("latin-1").strip()):
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0") or 0)
        if n > MAX_BODY_BYTES:
            raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        body = await reader.readexactly(n) if n else b""
        return parts[0].upper(), parts[1].split("?", 1)[0], headers, body

    async def _send_json(self, writer, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        writer.write(_head(status, "application/json", len(data)) + data)
        await writer.drain()

    def _md(self, headers: dict[str, str]):
        auth = headers.get("authorization") or (f"Bearer {self.auth_token}" if self.auth_token else "")
        return (("authorization", auth),) if auth else None

    async def _route(self, method, path, headers, body, writer) -> None:
        try:
            if path == "/v1/completions":
                if method != "POST":
                    raise HttpError(405, "use POST")
                try:
                    obj = json.loads(body or b"{}")
                except ValueError:
                    raise HttpError(400, "request body is not valid JSON") from None
                if not isinstance(obj, dict):
                    raise HttpError(400, "request body must be a JSON object")
                await self._completions(obj, headers, writer)
            elif path in ("/v1/models", "/health") and method == "GET":
                try:
                    reply = await self._stub.ListWorkers(pb.ListWorkersRequest(), timeout=5.0,
                                                         metadata=self._md(headers))
                except grpc.RpcError as e:
                    raise HttpError.from_client(ClientError.from_rpc(e)) from None
                await self._send_json(writer, *self._listing(path, reply))
            else:
                raise HttpError(404, f"no route {method} {path}")
        except HttpError as e:
            await self._send_json(writer, e.status, e.body())

    @staticmethod
    def _listing(path: str, reply: pb.ListWorkersReply) -> tuple[int, Any]:
        models = sorted({w.info.model for w in reply.workers if w.info.model})
        if path == "/v1/models":
            return 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "pdserve"} for m in models]}
        roles = [w.info.role for w in reply.workers]
        ok = pb.ROLE_BOTH in roles or (pb.ROLE_PREFILL in roles and pb.ROLE_DECODE in roles)
        counts = {name: roles.count(r) for name, r in
                  (("prefill", pb.ROLE_PREFILL), ("decode", pb.ROLE_DECODE), ("both", pb.ROLE_BOTH))}
        return (200 if ok else 503), {"status": "ok" if ok else "no workers can serve",
                                      "workers": counts, "models": models}

    async def _completions(self, obj: dict[str, Any], headers, writer) -> None:
        req, stream, timeout = parse_completion(obj)
        call = self._stub.Generate(req, timeout=timeout, metadata=self._md(headers))
        created = int(time.time())
        model = obj.get("model") or ""

        def choice(text: str, ids: list[int], reason: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "token_ids": ids, "logprobs": None,
                    "finish_reason": reason}

        def envelope(rid: str, ch: dict[str, Any], usage: dict | None) -> dict[str, Any]:
            out = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created,
                   "model": model, "choices": [ch]}
            if usage is not None:
                out["usage"] = usage
            return out

        def usage(m: dict[str, Any] | None) -> dict[str, int]:
            p, c = (m or {}).get("prompt_tokens", 0), (m or {}).get("completion_tokens", 0)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        started = False
        ids: list[int] = []
        texts: list[str] = []
        try:
            async for r in call:
                c = _chunk(r)
                if not stream:
                    ids += c.token_ids
                    texts.append(c.text)
                    if c.finished:
                        started = True
                        await self._send_json(writer, 200, envelope(
                            c.request_id, choice("".join(texts), ids, c.finish_reason),
                            usage(c.metrics)))
                    continue
                if not started:
                    writer.write(_head(200, "text/event-stream"))
                    started = True
                writer.write(_sse(envelope(
                    c.request_id, choice(c.text, c.token_ids, c.finish_reason or None),
                    usage(c.metrics) if c.finished else None)))
                await writer.drain()
            if not started:
                raise HttpError(500, "the coordinator ended the stream without a result")
            if stream:
                writer.write(b"data: [DONE]\n\n")
                await writer.drain()
        except grpc.RpcError as e:
            err = HttpError.from_client(ClientError.from_rpc(e))
            if not started or not stream:
                raise err from None
            writer.write(_sse(err.body()) + b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            call.cancel()

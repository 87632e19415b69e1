"""The OpenAI-compatible HTTP gateway (FastAPI on uvicorn), inside the coordinator process.

    POST /v1/completions, POST /v1/chat/completions   (SSE with "stream": true)
    GET  /v1/models, GET /v1/models/{id}, GET|HEAD /health, GET /metrics (Prometheus)

It runs on the coordinator's event loop and calls its Orchestrator directly (no gRPC hop);
request semantics are in openai_serving.py, bodies and errors in openai_protocol.py. With
an auth token, /v1/* need `Authorization: Bearer TOKEN`; /health and /metrics do not.
A client that disconnects cancels its request, which aborts it on the workers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pdserve.coordinator.metrics import NoMetrics
from pdserve.coordinator.openai_logprobs import LogprobFormatter, TokenEntry
from pdserve.coordinator.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
)
from pdserve.coordinator.openai_serving import Delta, Job, OpenAIServing
from pdserve.coordinator.orchestrator import Orchestrator
from pdserve.proto import pdserve_pb2 as pb

log = logging.getLogger("pdserve.coordinator.http")
MAX_BODY_BYTES = 16 << 20  # long prompts as token id arrays
BODY_TIMEOUT_S = 30.0  # longest wait for the next piece of a request body
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
T = TypeVar("T")


async def read_body(request: Request) -> bytes:
    """The request body, at most MAX_BODY_BYTES (413), each piece within BODY_TIMEOUT_S (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    parts, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            part = await asyncio.wait_for(stream.__anext__(), BODY_TIMEOUT_S)
        except StopAsyncIteration:
            return b"".join(parts)
        except asyncio.TimeoutError:
            raise ApiError(408, "timed out reading the request body") from None
        except ClientDisconnect:
            raise ApiError(499, "client disconnected") from None
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        parts.append(part)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then ApiError 499)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ApiError(499, "client disconnected")
    return task.result()


def _usage(job: Job, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def _envelope(job: Job, choices: list[dict], stream: bool) -> dict[str, Any]:
    chat = job.kind == "chat"
    obj = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", "object": obj,
            "created": job.created, "model": job.model, "choices": choices}


def _logprobs(job: Job, entries: list[TokenEntry] | None) -> dict[str, Any] | None:
    """choices[].logprobs in the job's OpenAI shape; None when not asked (or none here)."""
    if job.logprobs is None or entries is None or job.tokenizer is None:
        return None
    fmt = LogprobFormatter(job.tokenizer)
    return fmt.chat(entries) if job.kind == "chat" else fmt.completion(entries, 0)


def _choice(job: Job, index: int, text: str | None, reason: str | None, stream: bool,
            role: bool = False, logprobs: list[TokenEntry] | None = None) -> dict[str, Any]:
    lp = _logprobs(job, logprobs)
    if job.kind == "completion":
        return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": reason}
    if stream:
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text or role:
            delta["content"] = text or ""
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text or ""},
            "logprobs": lp, "finish_reason": reason}


async def collect(job: Job, deltas: AsyncIterator[Delta]) -> dict[str, Any]:
    texts = {c.index: [job.echo[c.index // job.n]] if job.echo else [] for c in job.choices}
    lps: dict[int, list[TokenEntry]] = {c.index: [] for c in job.choices}
    reasons: dict[int, str | None] = {}
    tokens = 0
    async for d in deltas:
        texts[d.index].append(d.text)
        lps[d.index] += d.logprobs or []
        tokens += d.n_tokens
        if d.finish_reason:
            reasons[d.index] = d.finish_reason
    choices = [_choice(job, i, "".join(texts[i]), reasons.get(i), False, logprobs=lps[i])
               for i in sorted(texts)]
    return {**_envelope(job, choices, False), "usage": _usage(job, tokens)}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def sse(job: Job, first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[bytes]:
    tokens = 0

    def usage() -> dict[str, Any]:  # of a chunk with choices: so far, null, or absent
        if job.continuous_usage:
            return {"usage": _usage(job, tokens)}
        return {"usage": None} if job.include_usage else {}

    try:
        for c in job.choices:  # chat: the role first; completions with echo: the prompt
            if job.kind == "chat" or job.echo:
                text = job.echo[c.index // job.n] if job.echo else ""
                yield _sse({**_envelope(job, [_choice(job, c.index, text, None, True,
                                                      role=True)], True), **usage()})
        d: Delta | None = first
        while d is not None:
            tokens += d.n_tokens
            if d.text or d.finish_reason or d.logprobs:
                ch = _choice(job, d.index, d.text, d.finish_reason, True,
                             logprobs=d.logprobs or None)
                yield _sse({**_envelope(job, [ch], True), **usage()})
            d = await anext(rest, None)
        if job.include_usage:
            yield _sse({**_envelope(job, [], True), "usage": _usage(job, tokens)})
    except ApiError as e:
        yield _sse(e.body())
    finally:
        await rest.aclose()
    yield b"data: [DONE]\n\n"


class CountResponses:
    """ASGI middleware: counts responses by route and status (pdserve:http_responses_total)."""

    def __init__(self, app: Any, metrics: NoMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_response(route, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(orch: Orchestrator, metrics: NoMetrics, auth_token: str | None = None) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    serving = OpenAIServing(orch)

    app.add_middleware(CountResponses, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(ApiError(400, str(e)))

    def check_auth(request: Request) -> None:
        if not auth_token:
            return
        got = request.headers.get("authorization", "")
        if not got:
            raise ApiError(401, "missing credentials: send 'Authorization: Bearer <token>'",
                           code="invalid_api_key")
        scheme, _, given = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 auth_token.encode()):
            raise ApiError(401, "invalid auth token", code="invalid_api_key")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        roles = [w.role for w in orch.registry.workers()]
        ok = pb.ROLE_BOTH in roles or (pb.ROLE_PREFILL in roles and pb.ROLE_DECODE in roles)
        counts = {name: roles.count(r) for name, r in
                  (("prefill", pb.ROLE_PREFILL), ("decode", pb.ROLE_DECODE), ("both", pb.ROLE_BOTH))}
        return JSONResponse({"status": "ok" if ok else "no workers can serve",
                             "workers": counts, "models": serving.models()},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics.registry is None:
            raise ApiError(404, "metrics are off: prometheus_client is not installed")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "pdserve",
                "max_model_len": serving.max_len() or None}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [model_card(m) for m in serving.models()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        if model_id not in serving.models():
            raise ApiError(404, f"The model `{model_id}` does not exist.", "model",
                           "model_not_found")
        return model_card(model_id)

    async def run(request: Request, job: Job) -> Response:
        deltas = serving.deltas(job)
        if not job.stream:
            return JSONResponse(await until_disconnect(request, collect(job, deltas)))
        try:  # wait for the first token, so errors before it get a proper status
            first = await until_disconnect(request, anext(deltas))
        except BaseException:
            await deltas.aclose()
            raise
        return StreamingResponse(sse(job, first, deltas), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request)
        req = parse_body(CompletionRequest, await read_body(request))
        return await run(request, await serving.completion_job(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        req = parse_body(ChatCompletionRequest, await read_body(request))
        return await run(request, await serving.chat_job(req))

    return app

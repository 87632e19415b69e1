"""OpenAI completions and chat completions, run on the coordinator's Orchestrator.

One HTTP request becomes one orchestrator request per choice: `n` per prompt (a
completions prompt may be a batch), choice index = prompt index * n + i. With a `seed`,
choice i of a prompt samples with seed + i, so the n choices differ and each is
reproducible. The gateway tokenizes (so it can check the context length and echo the
prompt) and detokenizes itself (`skip_text`), so that stop strings are matched on the text
token by token, across token boundaries; the matched stop string and everything after it
are dropped, and the request is finished early (its workers abort the rest). Logprobs
travel with the text of their tokens (coordinator/openai_logprobs.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve.coordinator.openai_logprobs import LogprobTracker, TokenEntry
from pdserve.coordinator.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
)
from pdserve.coordinator.orchestrator import Orchestrator
from pdserve.coordinator.request import RequestError
from pdserve.coordinator.tokens import IncrementalDetokenizer
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb

C = grpc.StatusCode
HTTP_STATUS = {C.INVALID_ARGUMENT: 400, C.OUT_OF_RANGE: 400, C.FAILED_PRECONDITION: 400,
               C.UNAUTHENTICATED: 401, C.PERMISSION_DENIED: 403, C.NOT_FOUND: 404,
               C.ALREADY_EXISTS: 409, C.RESOURCE_EXHAUSTED: 429, C.CANCELLED: 499,
               C.UNAVAILABLE: 503, C.DEADLINE_EXCEEDED: 504}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def api_error(e: RequestError) -> ApiError:
    return ApiError(HTTP_STATUS.get(e.code, 500), e.message, None, e.code.name)


class StopMatcher:
    """Finds the first stop string in text fed piece by piece. Holds back the tail that
    could still start one (longest stop - 1 chars), so nothing after a stop is emitted."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max(len(s) for s in stops) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, matched)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = len(self.buf) - self.hold
        if cut <= 0:
            return "", False
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass(slots=True)
class Choice:
    index: int
    rid: str
    prompt: list[int]
    sampling: pb.SamplingParams
    text: str = ""  # accumulated (non-streaming)
    tokens: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class Delta:
    index: int
    text: str
    n_tokens: int
    finish_reason: str | None
    logprobs: list[TokenEntry] | None = None  # of the tokens whose text starts in `text`


@dataclass
class Job:
    """A validated HTTP request, ready to run: its choices and what the response needs."""

    kind: str  # "completion" | "chat"
    model: str
    choices: list[Choice]
    prompt_tokens: int
    stops: list[str]
    timeout_s: float | None
    tokenizer: Tokenizer | None
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # usage on every chunk, not only the last
    logprobs: int | None = None  # SamplingParams.logprobs of every choice (None: none)
    echo: list[str] = field(default_factory=list)  # per prompt (completions with echo)
    n: int = 1
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


class OpenAIServing:
    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch

    # -- models ------------------------------------------------------------------------
    def models(self) -> list[str]:
        names = {w.info.model for w in self.orch.registry.workers() if w.info.model}
        if self.orch.tokenizers.model:
            names.add(self.orch.tokenizers.model)
        return sorted(names)

    def check_model(self, name: str | None) -> str:
        models = self.models()
        if name is not None and models and name not in models:
            raise ApiError(404, f"The model `{name}` does not exist (serving: "
                           f"{', '.join(models)}).", "model", "model_not_found")
        return name or (models[0] if models else "")

    # -- building a job ----------------------------------------------------------------
    async def _tokenizer(self, needed: bool) -> Tokenizer | None:
        tok = await self.orch.tokenizers.get()
        if tok is None and needed:
            if not self.orch.registry.workers():
                raise ApiError(503, "no workers registered with the coordinator", None,
                               "UNAVAILABLE")
            raise ApiError(400, self.orch.tokenizers.error or "the model's tokenizer is not "
                           "available; send token ids", None, "FAILED_PRECONDITION")
        return tok

    def max_len(self) -> int:
        return min((w.info.max_model_len for w in self.orch.registry.workers()
                    if w.info.max_model_len), default=0)

    def _max_tokens(self, req: Any, n_prompt: int, default: int | None) -> int | None:
        max_len = self.max_len()
        if max_len and n_prompt >= max_len:
            raise ApiError(400, f"This model's maximum context length is {max_len} tokens; "
                           f"the prompt has {n_prompt}.", "prompt", "context_length_exceeded")
        if req.max_tokens is not None:
            if req.max_tokens < 1:
                raise ApiError(400, "max_tokens must be at least 1", "max_tokens")
            if max_len and n_prompt + req.max_tokens > max_len:
                raise ApiError(400, (
                    f"This model's maximum context length is {max_len} tokens. However, you "
                    f"requested {n_prompt + req.max_tokens} tokens ({n_prompt} in the prompt, "
                    f"{req.max_tokens} for the completion)."), "max_tokens",
                    "context_length_exceeded")
            return req.max_tokens
        if default is None:
            return max_len - n_prompt if max_len else None
        return min(default, max_len - n_prompt) if max_len else default

    def _job(self, kind: str, req: Any, prompts: list[list[int]], tok: Tokenizer | None,
             default_max: int | None) -> Job:
        model = self.check_model(req.model)
        stops = req.stops()
        if stops and tok is None:
            raise ApiError(400, "stop strings need the model's tokenizer", "stop")
        if req.logprobs_k is not None and tok is None:
            raise ApiError(400, "logprobs need the model's tokenizer", "logprobs")
        job = Job(kind, model, [], sum(map(len, prompts)), stops, req.timeout, tok,
                  req.stream, req.include_usage, req.continuous_usage, n=req.n,
                  logprobs=req.logprobs_k)
        for p, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, "prompt is empty", "prompt")
            max_tokens = self._max_tokens(req, len(ids), default_max)
            for i in range(req.n):
                s = pb.SamplingParams(stop_token_ids=req.stop_token_ids or (),
                                      ignore_eos=req.ignore_eos)
                if max_tokens is not None:
                    s.max_tokens = max_tokens
                for name in ("temperature", "top_p"):
                    if getattr(req, name) is not None:
                        setattr(s, name, getattr(req, name))
                if req.top_k is not None:
                    s.top_k = max(req.top_k, 0)  # vLLM's -1 = off
                if req.seed is not None:
                    s.seed = req.seed + i
                if job.logprobs is not None:
                    s.logprobs = job.logprobs
                job.choices.append(Choice(p * req.n + i, f"{job.id}-{p * req.n + i}", ids, s))
        return job

    async def completion_job(self, req: CompletionRequest) -> Job:
        prompts = req.prompts()
        tok = await self._tokenizer(needed=any(isinstance(p, str) for p in prompts)
                                    or req.echo or bool(req.stop) or req.logprobs is not None)
        ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        job = self._job("completion", req, ids, tok, COMPLETIONS_DEFAULT_MAX_TOKENS)
        if req.echo:
            job.echo = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
        return job

    async def chat_job(self, req: ChatCompletionRequest) -> Job:
        tok = await self._tokenizer(needed=True)
        render = getattr(tok, "apply_chat_template", None)
        if render is None:
            raise ApiError(400, "model has no chat template", "messages", "no_chat_template")
        try:
            text = render([m.as_dict() for m in req.messages], add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, f"model has no chat template: {e}", "messages",
                           "no_chat_template") from None
        except Exception as e:  # noqa: BLE001 - a template may raise on bad conversations
            raise ApiError(400, f"the chat template failed: {e}", "messages") from None
        return self._job("chat", req, [tok.encode(text)], tok, None)

    # -- running -----------------------------------------------------------------------
    async def _one(self, job: Job, c: Choice) -> AsyncIterator[Delta]:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=c.prompt), sampling=c.sampling,
                                 request_id=c.rid, skip_text=True)
        tok = job.tokenizer
        detok = IncrementalDetokenizer(tok, c.prompt) if tok is not None else None
        stop = StopMatcher(job.stops) if job.stops else None
        track = LogprobTracker() if job.logprobs is not None else None
        sent = 0  # characters of text yielded so far

        def delta(text: str, n: int, reason: str | None, final: bool = False) -> Delta:
            nonlocal sent
            sent += len(text)
            lps = track.release(sent, final) if track is not None else None
            return Delta(c.index, text, n, reason, lps)
        gen = self.orch.generate(req, job.timeout_s)
        try:
            async for r in gen:
                ids = list(r.token_ids)
                if (stop is None and track is None) or detok is None:
                    text = detok.add(ids, final=r.finished) if detok is not None else ""
                    yield Delta(c.index, text, len(ids), r.finish_reason if r.finished else None)
                    continue
                lps = list(r.logprobs)
                parts: list[str] = []
                for j, t in enumerate(ids):
                    piece = detok.add([t])
                    if track is not None:
                        track.add(t, lps[j] if j < len(lps) else None, piece)
                    out, hit = stop.feed(piece) if stop is not None else (piece, False)
                    parts.append(out)
                    if hit:
                        self.orch.finish_early(c.rid)
                        yield delta("".join(parts), j + 1, "stop")
                        return
                if r.finished:  # the stream ends after this message
                    tail = detok.flush()
                    out, hit = stop.feed(tail) if stop is not None else (tail, False)
                    parts.append(out if hit or stop is None else out + stop.flush())
                    yield delta("".join(parts), len(ids), "stop" if hit else r.finish_reason,
                                final=not hit)
                    continue
                yield delta("".join(parts), len(ids), None)
        except RequestError as e:
            raise api_error(e) from None
        finally:
            await gen.aclose()

    async def deltas(self, job: Job) -> AsyncIterator[Delta]:
        """Every choice's deltas, interleaved as they come; the first error ends them all."""
        if len(job.choices) == 1:
            async for d in self._one(job, job.choices[0]):
                yield d
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice) -> None:
            try:
                async for d in self._one(job, c):
                    q.put_nowait(d)
                q.put_nowait(None)
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                q.put_nowait(e)

        tasks = [asyncio.get_running_loop().create_task(pump(c)) for c in job.choices]
        try:
            left = len(tasks)
            while left:
                item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

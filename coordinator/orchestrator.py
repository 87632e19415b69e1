"""Request orchestration: validation, the client stream, Abort, and counters.

Each Generate call is split in two tasks. The producer (flows.Dispatcher) talks to workers
and puts token batches into the request's queue; the consumer (the gRPC handler) takes
everything queued, merges it into one GenerateResponse and sends it. So when the client or
the network is slower than the workers, tokens coalesce into fewer, larger messages, and
Abort / cancellation only ever interrupt the producer, never a send in progress.

The producer always queues a final item (the last tokens, or a RequestError), whatever
ends it: the client's stream never waits on a producer that is gone. Counters: a request
that does not finish counts in requests_failed, and also in requests_cancelled (client
cancel, Abort, deadline) or requests_rejected (refused: bad request, queue full, no
worker) when it was not a server failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

import grpc
import numpy as np

from pdserve.coordinator.config import FailureConfig
from pdserve.coordinator.flows import Dispatcher
from pdserve.coordinator.metrics import NoMetrics, outcome_of
from pdserve.coordinator.pd_decider import PdDecider
from pdserve.coordinator.registry import Registry
from pdserve.coordinator.request import RequestError, RequestState
from pdserve.coordinator.router import RoutingPolicy
from pdserve.coordinator.tokens import IncrementalDetokenizer, TokenizerProvider
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import MAX_REQUEST_ID_CHARS, sampling_fields

log = logging.getLogger("pdserve.coordinator")
Code = grpc.StatusCode
RATE_WINDOW_S = 10.0


def _outside_vocab(ids: list[int] | np.ndarray, vocab: int) -> int | None:
    """The first prompt id outside [0, vocab), or None (vocab 0: not known yet)."""
    if not vocab:
        return None
    lo, hi = (min(ids), max(ids)) if isinstance(ids, list) else (ids.min(), ids.max())
    if lo >= 0 and hi < vocab:
        return None
    return next(int(t) for t in ids if t < 0 or t >= vocab)


class Orchestrator:
    def __init__(self, registry: Registry, policy: RoutingPolicy, max_queue: int,
                 tokenizers: TokenizerProvider, metrics: NoMetrics | None = None,
                 failure: FailureConfig | None = None, decider: PdDecider | None = None) -> None:
        self.registry = registry
        self.tokenizers = tokenizers
        self.metrics = metrics or NoMetrics()
        self.dispatch = Dispatcher(registry, policy, max_queue, failure, self.metrics, decider)
        self.active: dict[str, RequestState] = {}
        # failed = server-side failures only; cancels and rejections are counted apart.
        self.requests_total = self.requests_finished = self.requests_failed = 0
        self.requests_cancelled = self.requests_rejected = 0
        self.tokens_total = 0
        self.started = time.monotonic()
        self._rate: deque[tuple[float, int]] = deque([(self.started, 0)])

    # -- validation --------------------------------------------------------------------
    async def _prompt_ids(self, req: pb.GenerateRequest) -> list[int] | np.ndarray:
        """The prompt's token ids: a list, or the client's own ids as an array (read through
        numpy: a list() of a 32k-token repeated field alone costs about 1 ms)."""
        kind = req.WhichOneof("prompt")
        if kind is None:
            raise RequestError(Code.INVALID_ARGUMENT,
                               "no prompt: set `text`, `token_ids` or `chat`")
        if kind == "token_ids":
            ids = np.asarray(req.token_ids.ids)
            if not ids.size:
                raise RequestError(Code.INVALID_ARGUMENT, "prompt is empty: give at least one token id")
            return ids
        if kind == "text" and not req.text:
            raise RequestError(Code.INVALID_ARGUMENT, "prompt is empty: give non-empty text")
        if kind == "chat" and not req.chat.messages:
            raise RequestError(Code.INVALID_ARGUMENT, "chat has no messages")
        tok = await self.tokenizers.get()
        if tok is None:
            raise RequestError(Code.FAILED_PRECONDITION, self.tokenizers.error or (
                "no tokenizer: no worker has registered yet, so the model is unknown; "
                "send token ids or wait for a worker"))
        ids = list(tok.encode(req.text) if kind == "text" else self._chat_ids(tok, req.chat))
        if not ids:
            raise RequestError(Code.INVALID_ARGUMENT, "prompt is empty after tokenization")
        return ids

    def _chat_ids(self, tok, chat: pb.ChatMessages) -> list[int]:
        """The conversation rendered with the model's chat template, then tokenized (no
        added special tokens: the template writes any BOS itself)."""
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        render = getattr(tok, "apply_chat_template", None)
        if render is None:
            raise RequestError(Code.INVALID_ARGUMENT, f"the tokenizer of model "
                               f"{self.tokenizers.model!r} cannot render chat messages")
        try:
            text = render(messages, add_generation_prompt=True)
        except ValueError as e:  # no template, raise_exception() in the template, bad messages
            raise RequestError(Code.INVALID_ARGUMENT, str(e)) from None
        return tok.encode(text, add_special_tokens=False)

    async def _prepare(self, req: pb.GenerateRequest, time_remaining: float | None) -> RequestState:
        workers = self.registry.workers()
        if not workers:
            raise RequestError(Code.UNAVAILABLE, "no workers registered with the coordinator")
        try:
            sp = SamplingParams(**sampling_fields(req.sampling))
        except ValueError as e:
            raise RequestError(Code.INVALID_ARGUMENT, f"invalid sampling parameters: {e}") from None
        ids = await self._prompt_ids(req)
        vocab = min((w.info.vocab_size for w in workers if w.info.vocab_size), default=0)
        bad = _outside_vocab(ids, vocab)
        if bad is not None:
            raise RequestError(Code.INVALID_ARGUMENT,
                               f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        # the client's ids go to the workers as they came (RequestState.wire_prompt)
        wire = req.token_ids if isinstance(ids, np.ndarray) else None
        prompt = ids if isinstance(ids, list) else ids.tolist()
        max_len = min((w.info.max_model_len for w in workers if w.info.max_model_len), default=0)
        if max_len and len(prompt) >= max_len:
            raise RequestError(Code.INVALID_ARGUMENT, (
                f"prompt has {len(prompt)} tokens but the model's maximum length is {max_len} "
                f"(prompt + output); use at most {max_len - 1} prompt tokens"))
        sampling = pb.SamplingParams()
        sampling.CopyFrom(req.sampling)
        sampling.max_tokens = min(sp.max_tokens, max_len - len(prompt)) if max_len else sp.max_tokens
        rid = req.request_id or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID_CHARS:
            raise RequestError(Code.INVALID_ARGUMENT, f"request_id has {len(rid)} characters; "
                               f"at most {MAX_REQUEST_ID_CHARS}")
        if rid in self.active:
            raise RequestError(Code.ALREADY_EXISTS, f"request id {rid!r} is already in flight")
        detok = None
        if not req.skip_text:
            tok = await self.tokenizers.get()
            detok = IncrementalDetokenizer(tok, prompt) if tok is not None else None
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        return RequestState(rid=rid, prompt=prompt, sampling=sampling, deadline=deadline, detok=detok,
                            prompt_wire=wire)

    # -- the client stream -------------------------------------------------------------
    async def generate(self, req: pb.GenerateRequest,
                       time_remaining: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """Stream responses; raises RequestError for a status the client should see.

        A consumer that stops early (closes this generator) cancels the request, unless it
        called `finish_early` first (the HTTP gateway does, when a stop string matched).
        """
        self.requests_total += 1
        try:
            st = await self._prepare(req, time_remaining)
        except RequestError as e:
            self._count(None, outcome_of(e.code), e.code.name, "")
            raise
        except BaseException as e:
            cancelled = isinstance(e, (asyncio.CancelledError, GeneratorExit))
            self._count(None, "cancelled" if cancelled else "failed", "INTERNAL", "")
            raise
        self.active[st.rid] = st
        st.producer = asyncio.get_running_loop().create_task(self._produce(st))
        outcome, code, reason = "cancelled", "CANCELLED", ""
        try:
            while True:
                ids: list[int] = []
                lps: list[pb.TokenLogprobs] = []
                finished, error = False, None
                for item in await st.out.take():  # merge everything queued into one message
                    if isinstance(item, RequestError):
                        error = item
                        break
                    ids += item[0]
                    if item[3]:
                        lps += item[3]
                    if item[1]:
                        finished, reason = True, item[2]
                        break
                if finished:  # before the yield: a consumer may close after the last message
                    outcome, code = "success", "OK"
                if ids or finished:
                    yield self._response(st, ids, finished, reason, lps)
                if error is not None:
                    raise error
                if finished:
                    return
        except RequestError as e:
            outcome, code = outcome_of(e.code), e.code.name
            raise
        except Exception:
            outcome, code = "failed", "INTERNAL"
            raise
        finally:
            self.active.pop(st.rid, None)
            if not st.producer.done():
                st.producer.cancel()
            if st.finished_early and outcome == "cancelled":
                outcome, code, reason = "success", "OK", st.finished_early
            elif outcome == "cancelled" and not st.aborted and st.expired():
                outcome, code = "failed", "DEADLINE_EXCEEDED"  # gRPC cancelled it at the deadline
            self._count(st, outcome, code, reason)
            self.registry.notify()  # blocks were freed: wake queued requests

    def _count(self, st: RequestState | None, outcome: str, code: str, reason: str) -> None:
        if outcome == "success":
            self.requests_finished += 1
        elif outcome == "cancelled":
            self.requests_cancelled += 1
        elif outcome == "rejected":
            self.requests_rejected += 1
        else:
            self.requests_failed += 1
        self.metrics.request_done(outcome, code, reason, st)

    def finish_early(self, request_id: str, reason: str = "stop") -> None:
        """The consumer ends the request on purpose (e.g. a stop string matched): closing
        the stream next counts as a finish with `reason`, not a cancel."""
        st = self.active.get(request_id)
        if st is not None:
            st.finished_early = reason

    async def _produce(self, st: RequestState) -> None:
        """Run the request; always queue a final item for the client stream."""
        final: RequestError | None = None
        try:
            await self.dispatch.run(st)
            if not st.produced_final:
                final = RequestError(Code.INTERNAL, "request ended without a final token batch")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if st.aborted:
                final = RequestError(Code.CANCELLED, f"request {st.rid} was aborted")
            elif task is not None and task.cancelling():  # the client went away, or shutdown
                final = RequestError(Code.UNAVAILABLE, f"request {st.rid} was stopped "
                                     "(the client went away or the coordinator is stopping)")
            else:  # a worker call was cancelled under us (its channel closed)
                log.warning("request %s: a worker call was cancelled", st.rid)
                final = RequestError(Code.UNAVAILABLE, "a worker's connection was closed "
                                     "during the request")
                return
            raise
        except RequestError as e:
            final = e
        except Exception as e:  # noqa: BLE001 - a bug must still end the client's stream
            log.exception("request %s failed", st.rid)
            final = RequestError(Code.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        finally:
            if final is not None:
                st.out.put_nowait(final)

    def _response(self, st: RequestState, ids: list[int], finished: bool,
                  reason: str, logprobs: list[pb.TokenLogprobs]) -> pb.GenerateResponse:
        r = pb.GenerateResponse(request_id=st.rid, token_ids=ids)
        if finished:
            r.finished, r.finish_reason = True, reason
        if logprobs:
            r.logprobs.extend(logprobs)
        if ids:
            now = time.monotonic()
            if st.sent == 0:
                st.t_first = now
                r.metrics.ttft_ms = (now - st.t0) * 1e3
                self.metrics.first_token(now - st.t0, len(st.prompt))
            self.metrics.tokens(len(ids), now - st.t_last if st.sent else None)
            st.sent += len(ids)
            st.t_last = now
            self.tokens_total += len(ids)
        if st.detok is not None:
            r.text = st.detok.add(ids, final=finished)
        if finished:
            r.metrics.CopyFrom(st.metrics())
        return r

    def abort(self, request_id: str) -> bool:
        st = self.active.get(request_id)
        if st is None or st.producer is None:
            return False
        st.aborted = True
        st.producer.cancel()
        return True

    # -- counters ----------------------------------------------------------------------
    def tick(self) -> None:
        """Sample the token counter (called about once a second) for tokens_per_s."""
        now = time.monotonic()
        self._rate.append((now, self.tokens_total))
        while len(self._rate) > 2 and now - self._rate[1][0] >= RATE_WINDOW_S:
            self._rate.popleft()

    def stats(self) -> pb.StatsReply:
        now = time.monotonic()
        t_old, n_old = self._rate[0]
        rate = (self.tokens_total - n_old) / (now - t_old) if now > t_old else 0.0
        return pb.StatsReply(
            requests_total=self.requests_total, requests_active=len(self.active),
            requests_finished=self.requests_finished, requests_failed=self.requests_failed,
            requests_queued=self.dispatch.queued, tokens_total=self.tokens_total,
            tokens_per_s=rate, uptime_s=now - self.started, workers=self.registry.statuses(),
            requests_cancelled=self.requests_cancelled, requests_rejected=self.requests_rejected,
            requests_migrated=self.dispatch.migrated, requests_retried=self.dispatch.retried)

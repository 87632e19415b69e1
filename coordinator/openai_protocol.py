"""OpenAI request bodies (pydantic, strict types) and errors in OpenAI's shape.

Every field OpenAI defines that pdserve does not implement is refused by name with a 400
(`unsupported()`); a field nobody defines is refused by pydantic (`extra="forbid"`). Types
are strict: `"stream": "yes"` or `"n": 1.0` is a 400, never coerced. pdserve extensions:
`top_k`, `ignore_eos`, `stop_token_ids`, `timeout` (seconds; a deadline, 504 when it passes),
`stream_options.continuous_usage_stats` (vLLM's: with `include_usage`, every chunk carries the
usage so far).
Logprobs: chat `logprobs` + `top_logprobs` (0..20; top_logprobs needs logprobs: true) and
completions `logprobs: k` (0..20). Completions `echo` with `logprobs` would need the prompt's
logprobs, which pdserve does not compute: that combination is refused by name.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_CHOICES = 128  # n x prompts of one request
MAX_STOP_STRINGS = 16
MAX_TIMEOUT_S = 24 * 3600.0
MAX_LOGPROBS = 20  # top logprobs per token (vLLM's default max_logprobs; the workers' cap)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled_error",
               503: "service_unavailable_error", 504: "timeout_error"}


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message,
                          "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    timeout: float | None = None  # extension: seconds
    user: str | None = None  # accepted, unused
    # OpenAI fields pdserve does not implement: refused unless at their neutral value.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must be non-empty", "stop")
        return stops

    def check(self) -> None:
        """400 for values out of range and for OpenAI features pdserve does not have."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (only 0)", name, "unsupported")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias", "unsupported")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true",
                           "stream_options")
        if not 1 <= self.n <= MAX_CHOICES:
            raise ApiError(400, f"n must be in [1, {MAX_CHOICES}], got {self.n}", "n")
        if self.timeout is not None and not (0 < self.timeout <= MAX_TIMEOUT_S
                                             and math.isfinite(self.timeout)):
            raise ApiError(400, f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]",
                           "timeout")
        if self.seed is not None and not 0 <= self.seed < 2**63 - MAX_CHOICES:
            raise ApiError(400, "seed must be a non-negative 64-bit integer", "seed")
        self.stops()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's `continuous_usage_stats`: usage on every chunk (only with include_usage)."""
        so = self.stream_options
        return bool(so and so.include_usage and so.continuous_usage_stats)


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix", "unsupported")
        if self.logprobs is not None:
            _check_top(self.logprobs, "logprobs")
            if self.echo:
                raise ApiError(400, "echo with logprobs is not supported (pdserve does not "
                               "compute prompt logprobs)", "echo", "unsupported")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of is not supported (only best_of = n)", "best_of",
                           "unsupported")

    @property
    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs: None (no logprobs) or the top-k asked for."""
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            batch: list[Any] = [p]
        else:
            batch = list(p)
        if not batch:
            raise ApiError(400, "prompt is empty", "prompt")
        if len(batch) * self.n > MAX_CHOICES:
            raise ApiError(400, f"prompts x n is at most {MAX_CHOICES}", "prompt")
        return batch


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        c = self.content
        text = c if isinstance(c, str) else "".join(p.text for p in c or [])
        return {"role": self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ApiError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
            _check_top(self.top_logprobs, "top_logprobs")
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                raise ApiError(400, f"{name} is not supported (no tool calling)", name,
                               "unsupported")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ApiError(400, "response_format other than text is not supported",
                           "response_format", "unsupported")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ",
                           "max_completion_tokens")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _check_top(k: int, name: str) -> None:
    if not 0 <= k <= MAX_LOGPROBS:
        raise ApiError(400, f"{name} must be in [0, {MAX_LOGPROBS}], got {k}", name)


def parse_body(cls: type[_Sampling], raw: bytes) -> Any:
    """Validate a JSON body (bytes) into `cls`, then `check()` it; ApiError(400) if bad."""
    try:
        req = cls.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e) from None
    req.check()
    return req


def _validation_error(e: ValidationError) -> ApiError:
    errs = e.errors(include_url=False)
    first = errs[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return ApiError(400, "request body must be a JSON object")
    extra = next((x for x in errs if x["type"] == "extra_forbidden"), None)
    if extra is not None:
        name = _where(extra["loc"])
        return ApiError(400, f"unsupported field {name!r}", name, "unsupported")
    missing = next((x for x in errs if x["type"] == "missing"), None)
    if missing is not None:
        name = _where(missing["loc"])
        return ApiError(400, f"missing required field {name!r}", name)
    where = _where(first["loc"])
    return ApiError(400, f"invalid value for {where or 'body'!r}: {first['msg']}"
                    f" (got {str(first.get('input'))[:80]!r})", where or None)


def _where(loc: tuple) -> str:
    """'messages.0.content' from pydantic's loc, without the union member tags."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or not (
        "[" in p or p in ("str", "int", "float", "bool", "TextPart", "StreamOptions")))

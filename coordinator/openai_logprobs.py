"""Logprobs of OpenAI completions and chat completions: which tokens' logprobs go out with
which text, and their two OpenAI shapes.

Workers send one `TokenLogprobs` per generated token (the raw model distribution: log_softmax
of the logits before temperature, top-k and top-p). The gateway cuts text at stop strings
and holds text back while a stop string could still start, so a token's logprobs are sent
with the piece of text where that token's text begins (`LogprobTracker`): a stream's chunks
and a whole response carry the same tokens, and a token whose text was cut away entirely
by a stop string is dropped with its text. Token strings are `tokenizer.decode([id])`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb


@dataclass(slots=True)
class TokenEntry:
    token_id: int
    logprobs: pb.TokenLogprobs
    offset: int  # where the token's text starts in the generated text (characters)


@dataclass
class LogprobTracker:
    """Per choice: tokens whose text has not been sent yet, in order."""

    generated_chars: int = 0  # text the detokenizer produced so far (before stop cuts)
    pending: list[TokenEntry] = field(default_factory=list)

    def add(self, token_id: int, logprobs: pb.TokenLogprobs | None, text: str) -> None:
        """The token's text piece (from the incremental detokenizer, possibly '')."""
        if logprobs is None:
            raise ValueError(f"the worker sent token {token_id} without its logprobs")
        self.pending.append(TokenEntry(token_id, logprobs, self.generated_chars))
        self.generated_chars += len(text)

    def release(self, sent_chars: int, final: bool = False) -> list[TokenEntry]:
        """Tokens whose text starts before `sent_chars` (text sent so far); all of them when
        the choice ended without a stop string cutting it (`final`)."""
        n = len(self.pending) if final else next(
            (i for i, e in enumerate(self.pending) if e.offset >= sent_chars), len(self.pending))
        out, self.pending = self.pending[:n], self.pending[n:]
        return out


class LogprobFormatter:
    """OpenAI's shapes of a list of TokenEntry; caches token strings."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        s = self._text.get(token_id)
        if s is None:
            s = self._text[token_id] = self.tok.decode([token_id])
        return s

    def chat(self, entries: list[TokenEntry]) -> dict[str, Any]:
        """choices[].logprobs of a chat completion: {"content": [...]}."""
        def item(token_id: int, lp: float) -> dict[str, Any]:
            s = self.text(token_id)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [
            {**item(e.token_id, e.logprobs.logprob),
             "top_logprobs": [item(t, lp) for t, lp in zip(e.logprobs.top_ids,
                                                            e.logprobs.top_logprobs)]}
            for e in entries]}

    def completion(self, entries: list[TokenEntry], base_offset: int) -> dict[str, Any]:
        """choices[].logprobs of a completion. top_logprobs holds the k most likely tokens
        and the sampled one (so up to k + 1 entries, as OpenAI and vLLM); text_offset counts
        from the start of the choice's text (`base_offset`: the echoed prompt)."""
        tops = []
        for e in entries:
            top = {self.text(t): lp for t, lp in zip(e.logprobs.top_ids, e.logprobs.top_logprobs)}
            top.setdefault(self.text(e.token_id), e.logprobs.logprob)
            tops.append(top)
        return {"tokens": [self.text(e.token_id) for e in entries],
                "token_logprobs": [e.logprobs.logprob for e in entries],
                "top_logprobs": tops,
                "text_offset": [base_offset + e.offset for e in entries]}

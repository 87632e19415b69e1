"""Tokenizer access for the coordinator, and incremental detokenization of streamed tokens.

The coordinator learns the model from the first worker that registers and loads its tokenizer
once, in a thread, with `pdserve.engine.tokenizer.get_tokenizer(model)` (or an injected
factory / tokenizer, as tests do); the coordinator uses the engine's Tokenizer protocol
(its `encode` and `decode`). That thread is a daemon of its own, not the event loop's
executor: a load that never returns (a stuck download) cannot hold up shutdown, which
joins the executor's threads (asyncio.run, and again at interpreter exit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.tokenizer import Tokenizer

log = logging.getLogger("pdserve.coordinator")


def default_tokenizer_factory(model: str, cache_dir: str | None = None) -> Tokenizer:
    """The engine's tokenizer of `model` (a built-in model's from `cache_dir`)."""
    from pdserve.engine.tokenizer import get_tokenizer
    return get_tokenizer(model, cache_dir)


async def in_daemon_thread(fn: Callable, *args, name: str = "pdserve-call"):
    """fn(*args) in a daemon thread of its own, awaited; unlike asyncio.to_thread, a call
    that never returns never keeps the process from exiting (it dies with it)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, exc) -> None:
        if not fut.done():
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return await fut


class TokenizerProvider:
    """Loads the tokenizer of `model` at most once; `get()` waits for it (None if it failed)."""

    def __init__(self, factory: Callable[[str], Tokenizer] | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        self._factory = factory or default_tokenizer_factory
        self._tokenizer = tokenizer
        self._task: asyncio.Task | None = None
        self.model: str | None = None
        self.error: str | None = None

    def model_known(self, model: str) -> None:
        """Start loading the tokenizer of `model` (first call wins)."""
        if self._tokenizer is not None or self._task is not None or not model:
            return
        self.model = model
        self._task = asyncio.get_running_loop().create_task(self._load(model))

    async def _load(self, model: str) -> None:
        try:
            self._tokenizer = await in_daemon_thread(self._factory, model,
                                                     name="tokenizer-load")
            log.info("loaded tokenizer of %s", model)
        except Exception as e:  # noqa: BLE001 - reported to clients that send text
            self.error = f"cannot load the tokenizer of model {model!r}: {type(e).__name__}: {e}"
            log.warning(self.error)

    @property
    def pending(self) -> bool:
        return self._tokenizer is None and self._task is not None and not self._task.done()

    async def get(self) -> Tokenizer | None:
        if self._tokenizer is None and self._task is not None:
            await asyncio.shield(self._task)
        return self._tokenizer


class IncrementalDetokenizer:
    """Turns streamed token ids into text deltas whose concatenation is the decoded output.

    Decodes a small window (the last emitted tokens plus the new ones) per message, so the
    cost per message is independent of the output length. A trailing U+FFFD (an incomplete
    UTF-8 sequence) is held back until more tokens arrive or `flush()`.
    """

    CONTEXT_TOKENS = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix = 0  # ids[prefix:read] were already emitted (kept as decoding context)
        self.read = len(self.ids)

    def add(self, new_ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        if len(self.ids) == self.read:
            return ""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if full.endswith("\ufffd") and not final:
            return ""
        if not full.startswith(prefix_text):  # the tokenizer merged across the boundary
            prefix_text = os.path.commonprefix([prefix_text, full])
        self.prefix, self.read = self.read, len(self.ids)
        if len(self.ids) > 4096:  # keep memory bounded for long outputs
            drop = self.prefix
            del self.ids[:drop]
            self.prefix, self.read = 0, self.read - drop
        return full[len(prefix_text):]

    def flush(self) -> str:
        return self.add((), final=True)

"""Tokenizers: HF `tokenizer.json` through the `tokenizers` library, or a byte-level one.

Presets and model directories without a tokenizer.json get the byte tokenizer: ids 0..255
are the bytes, BYTE_BOS_ID and BYTE_EOS_ID follow. Both expose `encode`, `decode`,
`eos_token_ids`, `vocab_size` and `apply_chat_template` (the model directory's template,
engine/chat_template.py; ValueError when it has none). Built-in model names
(engine/model_cache.py) resolve to their converted directory in `cache_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from pdserve.engine.chat_template import (
    ChatTemplate,
    Message,
    load_chat_template,
    no_template_error,
)

BYTE_BOS_ID = 256
BYTE_EOS_ID = 257
BYTE_VOCAB_SIZE = 258


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> str:
        """The conversation rendered as prompt text (encode it with add_special_tokens=False:
        the template writes any BOS itself). ValueError when the model has no template."""
        ...


class _ChatMixin:
    chat_template: ChatTemplate | None = None
    name: str = "?"  # the model, for error messages

    def apply_chat_template(self, messages: list[Message],
                            add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise no_template_error(self.name)
        return self.chat_template.render(messages, add_generation_prompt)


class ByteTokenizer(_ChatMixin):
    """UTF-8 bytes as ids; encode adds no BOS; decode skips every id >= 256."""

    bos_token_id = BYTE_BOS_ID
    eos_token_ids = (BYTE_EOS_ID,)
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(_ChatMixin):
    """A `tokenizers.Tokenizer` from tokenizer.json; encode adds the special tokens its
    post-processor defines (e.g. Llama 3's BOS), decode skips special tokens."""

    def __init__(self, path: Path, eos_token_ids: tuple[int, ...]) -> None:
        from tokenizers import Tokenizer as _Tokenizer
        self._tok = _Tokenizer.from_file(str(path))
        self.eos_token_ids = eos_token_ids
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_ids(value: object) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def eos_ids_from_dir(model_dir: Path) -> list[int]:
    """Union of eos ids in config.json and generation_config.json, in that order."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        for i in _as_ids(_read_json(model_dir / name).get("eos_token_id")):
            if i not in ids:
                ids.append(i)
    return ids


def get_tokenizer(name_or_dir: str, cache_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a preset, a built-in model (converted into `cache_dir` on first use)
    or an HF directory."""
    from pdserve.engine.model_cache import BUILTIN_MODELS, resolve_model
    from pdserve.engine.presets import PRESETS

    model_dir = Path(name_or_dir)
    if not model_dir.is_dir():
        if name_or_dir in PRESETS:
            preset_tok = ByteTokenizer()
            preset_tok.name = name_or_dir  # presets have no chat template
            return preset_tok
        if name_or_dir not in BUILTIN_MODELS:
            raise FileNotFoundError(f"tokenizer: {name_or_dir} is neither a model directory "
                                    f"nor a preset ({', '.join(PRESETS)}) nor a built-in model "
                                    f"({', '.join(BUILTIN_MODELS)})")
        model_dir = resolve_model(name_or_dir, cache_dir)
    template = load_chat_template(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        byte_tok = ByteTokenizer()
        byte_tok.chat_template, byte_tok.name = template, name_or_dir
        return byte_tok
    ids = eos_ids_from_dir(model_dir)
    tok = HFTokenizer(model_dir / "tokenizer.json", ())
    eos_token = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(eos_token, dict):  # older files store an AddedToken dict
        eos_token = eos_token.get("content")
    if isinstance(eos_token, str):
        tid = tok.token_to_id(eos_token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    tok.eos_token_ids = tuple(ids)
    tok.chat_template, tok.name = template, name_or_dir
    return tok

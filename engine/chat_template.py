"""Chat templates: read from a model directory, rendered with jinja2 as HF transformers does.

A template comes from `chat_template.jinja` in the model directory, else from the
`chat_template` of tokenizer_config.json (a string, or HF's list of named templates, of
which "default" is used). It is rendered in a sandboxed jinja2 environment with
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}


class TemplateError(ValueError):
    """The template called raise_exception(...) or failed to render."""


def _token_str(value: object) -> str:
    if isinstance(value, dict):  # older tokenizer_config files store an AddedToken dict
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # jinja2 source
    bos_token: str = ""
    eos_token: str = ""

    @cached_property
    def _compiled(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson  # as HF: no HTML escaping
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.source)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        check_messages(messages)
        from jinja2 import TemplateError as JinjaError

        try:
            return self._compiled.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except JinjaError as e:
            raise TemplateError(f"chat template failed to render: {e}") from None


def check_messages(messages: object) -> None:
    """A non-empty list of {"role": str, "content": str} dicts, or ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', "
                             f"got {m!r}")


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The model directory's chat template, or None when it has none."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    jinja_file = model_dir / "chat_template.jinja"
    source = jinja_file.read_text() if jinja_file.is_file() else cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source.strip():
        return None
    return ChatTemplate(source, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")))


def no_template_error(model: str) -> ValueError:
    return ValueError(f"model {model} has no chat template (none in its tokenizer_config.json "
                      f"or chat_template.jinja); send a plain prompt instead of chat messages")

"""An HF tokenizer (tokenizer.json, tokenizer_config.json) rebuilt from a GGUF vocabulary.

Only GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported: the
tokens (already in byte-level form, "Ġthe") with their ids, the merges ("Ġ t"), and the
token types (CONTROL tokens become special added tokens, USER_DEFINED ones plain added
tokens). `tokenizer.ggml.pre` names the pre-tokenizer; those whose digits are split one by
one (SmolLM's, for instance) get a Digits(individual_digits) split before the byte-level
one.
"""

from __future__ import annotations

import json
from pathlib import Path

# tokenizer.ggml.pre values whose pre-tokenizer splits every digit on its own
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "seed-coder")
_BYTE_LEVEL_PRE = _DIGIT_SPLIT_PRE + ("gpt-2", "gpt2", "default")
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType


def gguf_field(reader, key: str, default: object = None) -> object:
    """A metadata value of a GGUFReader (str, number or list), or `default`."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def build_tokenizer(tokens: list[str], merges: list[str], token_types: list[int],
                    pre: str = "default"):
    """A `tokenizers.Tokenizer`: byte-level BPE over `tokens` (id = index) and `merges`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if pre not in _BYTE_LEVEL_PRE:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                         f"{', '.join(_BYTE_LEVEL_PRE)}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(token_types) or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tok


def build_tokenizer_files(reader, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template, if any)."""
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2', "
                         f"byte-level BPE)")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    tok = build_tokenizer(tokens, list(gguf_field(reader, "tokenizer.ggml.merges", [])),
                          list(gguf_field(reader, "tokenizer.ggml.token_type", [])),
                          str(gguf_field(reader, "tokenizer.ggml.pre", "default")))
    tok.save(str(out_dir / "tokenizer.json"))

    def token(kind: str) -> str | None:
        i = gguf_field(reader, f"tokenizer.ggml.{kind}_token_id")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    cfg: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as is
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_field(reader, "llama.context_length", 2048)),
    }
    for kind, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        if token(kind) is not None:
            cfg[key] = token(kind)
    template = gguf_field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        cfg["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

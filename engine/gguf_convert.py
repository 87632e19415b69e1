"""GGUF (llama.cpp) -> HF directory: config.json, model.safetensors, tokenizer files.

Llama-architecture GGUFs only. Quantized tensors are dequantized with the `gguf` package
(`pip install pdserve[model]`) and stored in `dtype` (bfloat16 by default). llama.cpp's
converter permutes the rows of attn_q / attn_k (HF's rotate-half rope layout -> interleaved
pairs); `unpermute_qk` undoes that. The tokenizer (engine/gguf_tokenizer.py) is rebuilt
from the GGUF vocabulary, and the chat template is copied from `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pdserve.engine.gguf_tokenizer import build_tokenizer_files, gguf_field

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("converting a GGUF model needs the `gguf` package: "
                          "pip install 'pdserve[model]' (or pip install gguf)") from None
    return gguf


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (convert_hf_to_gguf `permute`), for tests:
    per head, rows [first half | second half] -> interleaved pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: the rows of an HF q_proj / k_proj weight ([n_head * head_dim,
    hidden]) from a GGUF attn_q / attn_k. n_head is the number of kv heads for k."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _f32_round(x: float) -> float:
    """The shortest decimal that the float32 `x` is (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(np.format_float_scientific(np.float32(x), unique=True))


def read_config(reader) -> dict:
    """HF config.json of a llama GGUF's metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: object = None) -> object:
        return gguf_field(reader, f"llama.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("rope.dimension_count", hidden // heads))
    if get("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
    n_vocab = len(gguf_field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    bos, eos = (gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(get("vocab_size", n_vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": _f32_round(float(get("attention.layer_norm_rms_epsilon", 1e-5))),
        "rope_theta": _f32_round(float(get("rope.freq_base", 10000.0))),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "initializer_range": 0.02,
        "use_cache": True,
    }


def hf_tensor_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name} has no HF counterpart")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if base not in _GLOBAL_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name} has no HF counterpart")
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


def read_tensors(reader, config: dict, dtype: torch.dtype,
                 progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized, q/k rows unpermuted, in HF names and `dtype`."""
    gguf = _require_gguf()
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name.endswith("rope_freqs.weight"):
            raise ValueError("GGUF rope_freqs (llama3-style rope) is not supported")
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".attn_q." in t.name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        w = np.require(w, requirements=["C", "W"])  # a copy when read-only (memory-mapped)
        out[hf_tensor_name(t.name)] = torch.from_numpy(w).to(dtype)
        if progress is not None:
            progress(1)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
                 show_progress: bool = True) -> None:
    """Write the HF directory of the llama GGUF at `gguf_path` into `out_dir` (created;
    the caller makes it atomic)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = _require_gguf().GGUFReader(str(gguf_path))
    config = read_config(reader)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(reader.tensors), desc=f"converting {gguf_path.name}", unit="tensor",
              disable=not show_progress) as bar:
        tensors = read_tensors(reader, config, dtype, bar.update)
    if tensors["model.embed_tokens.weight"].shape[0] != config["vocab_size"]:
        raise ValueError(f"{gguf_path}: token_embd has {tensors['model.embed_tokens.weight'].shape[0]} "
                         f"rows but the vocabulary has {config['vocab_size']} tokens")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    build_tokenizer_files(reader, out_dir)

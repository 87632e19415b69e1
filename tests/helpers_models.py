"""Tiny random HF checkpoints and paged-KV helpers shared by the model, loader and parity tests.

`make_hf_checkpoint(tmp_path, "llama")` writes a transformers model with save_pretrained
(safetensors) and returns its directory. Its bos/eos are the byte tokenizer's (256/257) and
vocab 384 > 258, so engine.tokenizer's byte fallback fits the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pdserve.engine.layers import checkpoint_tensors
from pdserve.kernels.attention import AttentionMetadata

ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def make_hf_checkpoint(tmp_path: Path, arch: str, *, seed: int = 0, weight_std: float = 0.15,
                       max_shard_size: str | None = None, **overrides) -> Path:
    """Build a tiny random HF model of `arch` ("llama", "mistral", "qwen2", "qwen3") and save it.

    Defaults: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 384. `overrides`
    go to the transformers config class. Weights are N(0, weight_std) (larger than HF's
    init so attention is sharp and rope errors show), norm weights 1 + N(0, 0.1), biases
    N(0, 0.1), all from torch.manual_seed(seed).
    """
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    model_cls = getattr(transformers, ARCHS[arch])
    config_cls = getattr(transformers, ARCHS[arch].replace("ForCausalLM", "Config"))
    kwargs = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=256,
                  eos_token_id=257, tie_word_embeddings=False)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, weight_std)
    out, n = tmp_path / f"hf-{arch}", 1
    while out.exists():
        n += 1
        out = tmp_path / f"hf-{arch}-{n}"
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    return out


def load_hf_model(path: Path):
    """The saved checkpoint back as a transformers model (fp32, eager attention)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def make_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int, dtype: torch.dtype = torch.float32,
                   fill: float = float("nan")) -> list[torch.Tensor]:
    """One [num_blocks, 2, block_size, num_kv_heads, head_dim] pool per layer, filled with
    `fill` (NaN by default, so a read of a never-written slot poisons the output)."""
    return [torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), fill, dtype=dtype)
            for _ in range(num_layers)]


def make_metadata(seqs: list[tuple[list[int], int, int]], block_size: int) -> AttentionMetadata:
    """Metadata for a flat batch. seqs: (block_ids, num_new_tokens T, context length L after
    the step) per sequence; the new tokens are positions L-T .. L-1."""
    slots: list[int] = []
    starts = [0]
    for block_ids, t, ctx in seqs:
        for p in range(ctx - t, ctx):
            slots.append(block_ids[p // block_size] * block_size + p % block_size)
        starts.append(starts[-1] + t)
    width = max(len(b) for b, _, _ in seqs)
    tables = [b + [0] * (width - len(b)) for b, _, _ in seqs]
    seq_lens = [ctx for _, _, ctx in seqs]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(t for _, t, _ in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )


def positions_for(seqs: list[tuple[list[int], int, int]]) -> torch.Tensor:
    """[T] int64 positions matching make_metadata's token order."""
    return torch.tensor([p for _, t, ctx in seqs for p in range(ctx - t, ctx)], dtype=torch.int64)


def save_preset_checkpoint(tmp_path: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A preset's random weights written as an HF-style directory (config.json +
    model.safetensors) without importing transformers: fast to build in subprocess tests."""
    import json

    from safetensors.torch import save_file

    from pdserve.engine.loader import load_model
    from pdserve.engine.presets import get_preset

    cfg = get_preset(preset)
    model, _ = load_model(preset, torch.float32, "cpu", seed)
    out = tmp_path / f"ckpt-{preset}"
    out.mkdir()
    hf = {
        "architectures": [cfg.architecture], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling_dict,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
    }
    (out / "config.json").write_text(json.dumps(hf))
    tensors = {k: v.contiguous() for k, v in checkpoint_tensors(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out

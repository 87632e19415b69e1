"""Our Llama-family model against HF transformers: prefill and paged decode logits, fp32."""

from __future__ import annotations

import pytest
import torch
from helpers_models import (
    load_hf_model,
    make_hf_checkpoint,
    make_kv_caches,
    make_metadata,
    positions_for,
)

from pdserve.engine.layers import RMSNorm, RotaryEmbedding, rope_inv_freq
from pdserve.engine.loader import load_model
from pdserve.engine.models import ARCHITECTURES, model_class
from pdserve.kernels.attention import get_backend

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "llama": ("llama", {}),
    "mistral-sliding": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mha": ("llama", {"num_key_value_heads": 4}),
    "tied": ("llama", {"tie_word_embeddings": True}),
}
BS = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (arch, overrides) in VARIANTS.items():
        sub = root / name
        sub.mkdir()
        out[name] = make_hf_checkpoint(sub, arch, **overrides)
    return out


def _ours(path):
    model, config = load_model(str(path), torch.float32, "cpu")
    kv = make_kv_caches(config.num_layers, 24, BS, config.num_kv_heads, config.head_dim)
    return model, config, kv


def _step(model, kv, ids, seqs):
    hidden = model(ids, positions_for(seqs), kv, make_metadata(seqs, BS), get_backend("torch"))
    return model.compute_logits(hidden)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_paged_decode_match_hf(checkpoints, variant):
    path = checkpoints[variant]
    hf = load_hf_model(path)
    model, config, kv = _ours(path)
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(1))
    blocks = [17, 3, 11, 6, 20]  # shuffled, non-contiguous

    ours = _step(model, kv, prompt, [(blocks, 11, 11)])
    with torch.no_grad():
        out = hf(input_ids=prompt[None], use_cache=True)
    assert ours.dtype == torch.float32 and ours.shape == (11, config.vocab_size)
    torch.testing.assert_close(ours, out.logits[0].float(), atol=ATOL, rtol=0)

    past, ctx = out.past_key_values, 11
    token = out.logits[0, -1].argmax()
    for _ in range(6):  # one token at a time through the paged cache
        ctx += 1
        ours = _step(model, kv, token[None], [(blocks, 1, ctx)])
        with torch.no_grad():
            out = hf(input_ids=token[None, None], past_key_values=past, use_cache=True)
        torch.testing.assert_close(ours[0], out.logits[0, -1].float(), atol=ATOL, rtol=0)
        past, token = out.past_key_values, out.logits[0, -1].argmax()


def test_chunked_prefill_in_a_mixed_batch_matches_hf(checkpoints):
    """Seq A's second prompt chunk and seq B's whole prompt in one flat batch."""
    path = checkpoints["qwen3"]
    hf = load_hf_model(path)
    model, _, kv = _ours(path)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 256, (10,), generator=gen), torch.randint(0, 256, (7,), generator=gen)
    blocks_a, blocks_b = [5, 14, 2], [8, 21]
    _step(model, kv, a[:6], [(blocks_a, 6, 6)])
    logits = _step(model, kv, torch.cat([a[6:], b]), [(blocks_a, 4, 10), (blocks_b, 7, 7)])
    with torch.no_grad():
        ref_a, ref_b = hf(input_ids=a[None]).logits[0], hf(input_ids=b[None]).logits[0]
    torch.testing.assert_close(logits[:4], ref_a[6:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[4:], ref_b, atol=ATOL, rtol=0)


def test_layer_hook_runs_after_each_layers_kv_write(checkpoints):
    model, config, kv = _ours(checkpoints["llama"])
    seqs = [([7, 1], 6, 6)]
    slots = make_metadata(seqs, BS).slot_mapping
    calls = []

    def hook(i: int) -> None:
        written = [not kv[j][slots // BS, :, slots % BS].isnan().any()  # (T, 2, nkv, hd)
                   for j in range(config.num_layers)]
        assert written == [j <= i for j in range(config.num_layers)]
        calls.append(i)

    model(torch.arange(6), positions_for(seqs), kv, make_metadata(seqs, BS),
          get_backend("torch"), layer_hook=hook)
    assert calls == list(range(config.num_layers))


def test_tied_model_has_no_lm_head(checkpoints):
    model, config, _ = _ours(checkpoints["tied"])
    assert config.tie_word_embeddings and model.lm_head is None
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_model_registry():
    assert set(ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM",
                                  "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel; supported: "
                                         "LlamaForCausalLM"):
        model_class("GPT2LMHeadModel")


def test_rmsnorm_fused_residual_equals_add_then_norm():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    out, new_r = norm(x, r)
    torch.testing.assert_close(new_r, x + r)
    torch.testing.assert_close(out, norm(x + r))


def test_rope_rejects_unknown_type_and_scales_linear():
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        rope_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    base = rope_inv_freq(16, 10000.0, None)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0, {"type": "linear", "factor": 2.0}),
                               base / 2)


def test_rope_reset_cache_after_to_empty():
    with torch.device("meta"):
        rope = RotaryEmbedding(16, 32, 10000.0)
    rope = rope.to(torch.bfloat16).to_empty(device="cpu")
    rope.reset_cache()
    ref = RotaryEmbedding(16, 32, 10000.0)
    assert rope.cos_sin_cache.dtype == torch.bfloat16
    torch.testing.assert_close(rope.cos_sin_cache, ref.cos_sin_cache.bfloat16())
    pos = torch.tensor([0, 5, 31])
    angle = pos[:, None].float() * ref.inv_freq_cpu[None, :]  # cos | sin halves per row
    torch.testing.assert_close(ref.cos_sin_cache[pos], torch.cat((angle.cos(), angle.sin()), -1))


def test_bf16_forward_is_finite_and_close_to_fp32(checkpoints):
    path = checkpoints["qwen3"]
    m32, config, kv32 = _ours(path)
    m16, _ = load_model(str(path), torch.bfloat16, "cpu")
    kv16 = make_kv_caches(config.num_layers, 24, BS, config.num_kv_heads, config.head_dim,
                          dtype=torch.bfloat16)
    ids, seqs = torch.arange(9), [([4, 9, 1], 9, 9)]
    l32, l16 = _step(m32, kv32, ids, seqs), _step(m16, kv16, ids, seqs)
    assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
    assert (l16 - l32).abs().max() < 0.25 * l32.abs().max()

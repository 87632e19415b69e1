"""Loader (HF dirs, sharded checkpoints, presets, clear errors) and tokenizers."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_models import (
    load_hf_model,
    make_hf_checkpoint,
    make_kv_caches,
    make_metadata,
    positions_for,
)
from safetensors.torch import load_file, save_file

from pdserve.engine.layers import checkpoint_tensors
from pdserve.engine.loader import load_model, load_model_config
from pdserve.engine.presets import PRESETS, get_preset
from pdserve.engine.tokenizer import BYTE_EOS_ID, ByteTokenizer, get_tokenizer
from pdserve.kernels.attention import get_backend


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _prefill_logits(model, config, ids):
    kv = make_kv_caches(config.num_layers, 8, 4, config.num_kv_heads, config.head_dim)
    seqs = [([5, 0, 3, 6], len(ids), len(ids))]
    meta = make_metadata(seqs, 4)
    return model.compute_logits(model(ids, positions_for(seqs), kv, meta, get_backend("torch")))


# --- HF directories -------------------------------------------------------------------------

def test_sharded_checkpoint_loads_and_matches_hf(tmp_path):
    path = make_hf_checkpoint(tmp_path, "qwen2", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (path / "model.safetensors").exists()
    model, config = load_model(str(path), torch.float32, "cpu")
    ids = torch.tensor([3, 141, 59, 26, 5, 35, 89])
    with torch.no_grad():
        ref = load_hf_model(path)(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(_prefill_logits(model, config, ids), ref, atol=1e-4, rtol=0)


def test_merged_projections_hold_the_checkpoint_tensors_exactly(tmp_path):
    path = make_hf_checkpoint(tmp_path, "qwen2")  # q/k/v biases too
    model, _ = load_model(str(path), torch.float32, "cpu")
    names = checkpoint_tensors(model)
    saved = load_file(path / "model.safetensors")
    assert set(names) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(names[name], tensor), name
    attn = model.model.layers[1].self_attn
    q = saved["model.layers.1.self_attn.q_proj.weight"]
    v_bias = saved["model.layers.1.self_attn.v_proj.bias"]
    assert torch.equal(attn.qkv_proj.weight[: q.shape[0]], q)
    assert torch.equal(attn.qkv_proj.bias[-v_bias.shape[0]:], v_bias)
    names["model.layers.1.mlp.up_proj.weight"].zero_()  # a view: writes the merged GEMM
    gate_up = model.model.layers[1].mlp.gate_up_proj.weight
    assert gate_up[gate_up.shape[0] // 2:].abs().sum() == 0 and gate_up[0].abs().sum() > 0


def test_loads_in_target_dtype_and_ignores_inv_freq(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    _edit_weights(path, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    model, _ = load_model(str(path), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    want = load_file(path / "model.safetensors")["model.norm.weight"].bfloat16()
    assert torch.equal(model.model.norm.weight, want)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory .*nope does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32, "cpu")


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_config(str(tmp_path))


def test_no_safetensors(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"no safetensors weights \(expected model.safetensors"):
        load_model(str(path), torch.float32, "cpu")


def test_unsupported_architecture(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    _edit_json(path / "config.json", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture GPT2LMHeadModel; "
                                         r"supported: LlamaForCausalLM, MistralForCausalLM"):
        load_model(str(path), torch.float32, "cpu")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    _edit_json(path / "config.json", intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape "
                                         r"\[\d+, \d+\], expected \[\d+, \d+\]"):
        load_model(str(path), torch.float32, "cpu")


def test_missing_tensor(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    _edit_weights(path, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ValueError, match="missing tensors in the checkpoint: "
                       "model.layers.1.post_attention_layernorm.weight"):
        load_model(str(path), torch.float32, "cpu")


def test_unexpected_tensor(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    name = "model.layers.0.self_attn.q_norm.weight"  # a Qwen3 tensor in a Llama checkpoint
    _edit_weights(path, lambda t: t.update({name: torch.ones(16)}))
    with pytest.raises(ValueError, match=f"unexpected tensor {name}"):
        load_model(str(path), torch.float32, "cpu")


# --- config.json parsing ----------------------------------------------------------------------

BASE = {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 8}


def _config(tmp_path, arch, **fields):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], **BASE, **fields}))
    return load_model_config(str(tmp_path))


def test_config_hf_v4_fields(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = _config(tmp_path, "LlamaForCausalLM", rope_theta=500000.0, rope_scaling=rope,
                  eos_token_id=[7, 9], bos_token_id=1, tie_word_embeddings=True)
    assert (cfg.num_kv_heads, cfg.head_dim) == (8, 32)  # MHA and hidden / heads by default
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict == rope
    assert cfg.eos_token_ids == (7, 9) and cfg.bos_token_id == 1 and cfg.tie_word_embeddings
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 11]}))
    assert load_model_config(str(tmp_path)).eos_token_ids == (7, 9, 11)


def test_config_hf_v5_rope_parameters_and_legacy_type(tmp_path):
    cfg = _config(tmp_path, "LlamaForCausalLM", num_key_value_heads=2, head_dim=64, eos_token_id=3,
                  rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) == (2, 64, 1e6, None)
    assert cfg.eos_token_ids == (3,)
    cfg = _config(tmp_path, "LlamaForCausalLM", rope_scaling={"type": "linear", "factor": 2.0})
    assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        _config(tmp_path, "LlamaForCausalLM", rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_config_architecture_implied_fields(tmp_path):
    qwen2 = _config(tmp_path, "Qwen2ForCausalLM", sliding_window=4096, use_sliding_window=False)
    assert qwen2.attention_bias and not qwen2.qk_norm and qwen2.sliding_window is None
    qwen3 = _config(tmp_path, "Qwen3ForCausalLM", attention_bias=False, sliding_window=4096,
                    use_sliding_window=True, max_window_layers=0)
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.sliding_window == 4096
    assert _config(tmp_path, "MistralForCausalLM", sliding_window=4096).sliding_window == 4096
    assert _config(tmp_path, "LlamaForCausalLM", sliding_window=4096).sliding_window is None
    with pytest.raises(ValueError, match="sliding window on only some layers"):
        _config(tmp_path, "Qwen2ForCausalLM", sliding_window=64, use_sliding_window=True,
                max_window_layers=2)


# --- presets ----------------------------------------------------------------------------------

def test_tiny_preset_is_deterministic_per_seed():
    a, cfg = load_model("tiny", torch.float32, "cpu", seed=0)
    b, _ = load_model("tiny", torch.float32, "cpu", seed=0)
    c, _ = load_model("tiny", torch.float32, "cpu", seed=1)
    sa, sb, sc = (checkpoint_tensors(m) for m in (a, b, c))  # HF names
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"],
                           sc["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(sa["model.norm.weight"], torch.ones(cfg.hidden_size))
    logits = _prefill_logits(a, cfg, torch.tensor(ByteTokenizer().encode("hello")))
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_llama_31_8b_preset_shapes():
    cfg = load_model_config("llama-3.1-8b")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == \
        (128256, 4096, 14336, 32)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.rms_norm_eps) == \
        (500000.0, 131072, 1e-5)
    assert cfg.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
    assert not cfg.tie_word_embeddings
    assert get_preset("qwen3-0.6b").qk_norm and get_preset("llama-3.2-1b").tie_word_embeddings
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'"):
        get_preset("gpt-5")


# --- tokenizers -------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_specials():
    tok = get_tokenizer("tiny")
    text = "héllo, wörld ✓ 🚀"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.decode([256, *ids, BYTE_EOS_ID, 300]) == text  # specials / ids >= 256 skipped
    assert tok.decode([0xC3]) == "\ufffd"  # broken utf-8 is replaced, never raises
    for name, cfg in PRESETS.items():
        assert max(get_tokenizer(name).eos_token_ids) < cfg.vocab_size, name
        assert get_tokenizer(name).eos_token_ids == cfg.eos_token_ids


def test_dir_without_tokenizer_json_gets_byte_tokenizer(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama")
    assert isinstance(get_tokenizer(str(path)), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a preset"):
        get_tokenizer(str(tmp_path / "missing"))


def test_hf_tokenizer_json_round_trip_and_eos(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))

    hf_tok = get_tokenizer(str(tmp_path))
    text = "the lazy fox, naïve ✓"
    ids = hf_tok.encode(text)
    assert len(ids) < len(text.encode()) and hf_tok.decode(ids) == text
    assert hf_tok.decode([0, *ids, 2]) == text  # special tokens skipped
    assert hf_tok.eos_token_ids == (1, 2)
    assert hf_tok.vocab_size == tok.get_vocab_size()

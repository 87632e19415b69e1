"""End to end: greedy `LLM.generate` equals HF transformers `generate`, token for token, for
every supported architecture (fp32, CPU, several prompts batched together on our side)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import load_hf_model, make_hf_checkpoint

from pdserve.engine.sampling_params import SamplingParams
from pdserve.llm import LLM

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "mistral": ("mistral", {}),
    "mistral-sliding": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mha": ("llama", {"num_key_value_heads": 4}),
    "tied": ("llama", {"tie_word_embeddings": True}),
}
NEW_TOKENS = 24
PROMPT_LENS = (1, 7, 19, 40)  # one token, under one block, across blocks


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF greedy continuation of exactly n tokens (eos disabled, so none is suppressed)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_generate(variant: str, prompts, tmp_path) -> None:
    arch, overrides = VARIANTS[variant]
    path = make_hf_checkpoint(tmp_path, arch, seed=3, **overrides)
    hf = load_hf_model(path)
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]

    # block_size 4 puts prompts across several blocks; all prompts run in one batch.
    llm = LLM(model=str(path), block_size=4, num_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finish_reason == "length" for o in outs)
    for prompt, want, got in zip(prompts, expected, outs, strict=True):
        assert got.token_ids == want, f"{variant}: prompt of {len(prompt)} tokens diverged"

"""The model with its fused Triton kernels (RMSNorm, rope, SiLU-gate) and the "triton"
attention backend against HF transformers, prefill then paged decode: on CPU through the
Triton interpreter (tiny shapes), on GPU with compiled kernels."""

from __future__ import annotations

import dataclasses

import kernels_env  # first: sets TRITON_INTERPRET before pdserve.kernels loads
import pytest
import torch
from helpers_models import (
    load_hf_model,
    make_hf_checkpoint,
    make_kv_caches,
    make_metadata,
    positions_for,
)
from kernels_env import DEVICE, gpu_only

from pdserve.engine.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, set_fused_kernels
from pdserve.engine.loader import load_model
from pdserve.kernels.attention import get_backend

BS = 4


def check_fused_matches_hf(tmp_path, arch: str, device: str, atol: float) -> None:
    path = make_hf_checkpoint(tmp_path, arch)
    hf = load_hf_model(path).to(device)
    model, cfg = load_model(str(path), torch.float32, device)
    switched = set_fused_kernels(model, True)
    norms = 2 * cfg.num_layers + 1 + (2 * cfg.num_layers if cfg.qk_norm else 0)
    linears = 4 * cfg.num_layers + (0 if cfg.tie_word_embeddings else 1)  # qkv, o, gate_up, down
    assert switched == norms + 1 + cfg.num_layers + linears  # + one rope, one MLP per layer
    assert all(m.fused for m in model.modules()
               if isinstance(m, (RMSNorm, RotaryEmbedding, GatedMLP, Linear)))
    kv = [c.to(device) for c in make_kv_caches(cfg.num_layers, 12, BS, cfg.num_kv_heads, cfg.head_dim)]
    attn = get_backend("triton")
    blocks = [9, 2, 7, 4, 11]

    def step(ids: torch.Tensor, seqs) -> torch.Tensor:
        meta = make_metadata(seqs, BS)
        meta = dataclasses.replace(meta, **{f.name: getattr(meta, f.name).to(device)
                                            for f in dataclasses.fields(meta)
                                            if isinstance(getattr(meta, f.name), torch.Tensor)})
        hidden = model(ids.to(device), positions_for(seqs).to(device), kv, meta, attn)
        return model.compute_logits(hidden)

    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf(input_ids=prompt[None].to(device), use_cache=True)
    torch.testing.assert_close(step(prompt, [(blocks, 10, 10)]), out.logits[0].float(), atol=atol, rtol=0)
    past, token, ctx = out.past_key_values, out.logits[0, -1].argmax(), 10
    for _ in range(3):
        ctx += 1
        ours = step(token[None].cpu(), [(blocks, 1, ctx)])
        with torch.no_grad():
            out = hf(input_ids=token[None, None], past_key_values=past, use_cache=True)
        torch.testing.assert_close(ours[0], out.logits[0, -1].float(), atol=atol, rtol=0)
        past, token = out.past_key_values, out.logits[0, -1].argmax()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: per-head q/k norms on views
def test_fused_kernels_match_hf_tiny(tmp_path, arch: str) -> None:
    check_fused_matches_hf(tmp_path, arch, DEVICE, atol=1e-4)


def test_linear_takes_the_skinny_gemm_only_where_it_wins(monkeypatch) -> None:
    from types import SimpleNamespace

    from pdserve.engine import layers

    rows: list[tuple[int, int]] = []

    def spy(x, w, b=None):
        rows.append((x.shape[0], w.shape[0]))
        return torch.nn.functional.linear(x, w, b)

    monkeypatch.setattr(layers, "_kernels", lambda: SimpleNamespace(skinny_linear=spy))
    wide, narrow = torch.randn(6144, 64), torch.randn(4096, 64)
    for m in (1, 2, 16, 17):
        for w in (wide, narrow):
            out = layers.linear(torch.randn(m, 64), w, fused=True)
            assert out.shape == (m, w.shape[0])
    layers.linear(torch.randn(1, 64), wide, fused=False)  # eager: always cuBLAS
    assert rows == [(1, 6144), (1, 4096), (2, 4096), (16, 4096)]


def test_graph_buffers_path_equals_eager_across_block_boundaries() -> None:
    """The decode-graph path (static buffers, persistent block-table staging; eager replay
    on CPU) generates what the plain eager path does, while tables grow block by block."""
    from pdserve.engine.cuda_graphs import DecodeGraphs
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.llm import LLM

    prompts = [[5, 9, 2, 7, 1, 3], [8, 8, 4], [2, 6, 1, 1, 9, 4, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True)

    def run(with_graphs: bool):
        llm = LLM("tiny", attention_backend="triton", block_size=4, num_blocks=40, max_num_seqs=4)
        e = llm.engine
        if with_graphs:
            e.runner.graphs = DecodeGraphs(e.model, e.attn, e.kv_caches, 4, e.num_blocks,
                                           [1, 2, 4], 64, torch.device("cpu"), use_cuda_graph=False)
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        return outs, (e.runner.graphs.num_runs if with_graphs else 0)

    eager, _ = run(False)
    graphed, runs = run(True)
    assert runs >= 8 and graphed == eager


def test_eager_switch_restores_torch_path(tmp_path) -> None:
    model, _ = load_model(str(make_hf_checkpoint(tmp_path, "llama")), torch.float32, "cpu")
    assert set_fused_kernels(model, True) > 0
    set_fused_kernels(model, False)
    assert not any(m.fused for m in model.modules() if hasattr(m, "fused"))


@pytest.mark.gpu2
def test_engine_on_second_gpu_steps_from_any_thread() -> None:
    """Workers run the engine on cuda:N from a loop thread whose current device is cuda:0;
    eager Triton launches (prefill, logits) must still land on cuda:N."""
    import threading

    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 2, 7, 1, 3], [8, 8, 4]]
    ref = [o.token_ids for o in LLM("tiny", device="cuda:0").generate(prompts, params)]
    llm = LLM("tiny", device="cuda:1")
    got: list = []
    thread = threading.Thread(target=lambda: got.append(llm.generate(prompts, params)))
    thread.start()
    thread.join(timeout=120)
    assert got and [o.token_ids for o in got[0]] == ref


@gpu_only
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_kernels_match_hf_gpu(tmp_path, arch: str) -> None:
    check_fused_matches_hf(tmp_path, arch, "cuda", atol=2e-4)


kernels_env.run_in_subprocess_if_needed(globals())

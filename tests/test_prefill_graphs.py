"""Prefill CUDA graphs (engine/prefill_graphs.py): one short prompt chunk padded to a
captured token count. On CPU the static-buffer path runs eagerly against the plain forward;
on CUDA, graph replay against eager execution and HF."""

from __future__ import annotations

import pytest
import torch
from helpers_models import load_hf_model, make_hf_checkpoint

from pdserve.engine.loader import load_model
from pdserve.engine.model_runner import ModelRunner, allocate_kv_caches
from pdserve.engine.prefill_graphs import PrefillGraphs, graph_sizes
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from pdserve.kernels.attention import get_backend
from pdserve.llm import LLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _runner(dtype: torch.dtype, device: str, num_blocks: int = 40, bs: int = 4):
    model, mcfg = load_model("tiny", dtype, device, seed=3)
    kv = allocate_kv_caches(mcfg, num_blocks, bs, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in kv:
        layer.normal_(generator=gen)
    return ModelRunner(model, mcfg, get_backend("triton", device), kv, bs, device), kv


def _chunk(n: int, start: int, blocks: list[int], sample: bool = True) -> SchedulerOutput:
    ids = [(7 * i + 3) % 200 + 1 for i in range(start, start + n)]
    return SchedulerOutput(chunks=[ScheduledChunk("s", ids, start, blocks, sample, GREEDY, 0)])


def _compare(runner: ModelRunner, kv: list[torch.Tensor], out: SchedulerOutput, atol: float) -> None:
    """Hidden state of the sampled row and every real block's K/V: graph path == eager."""
    before = [t.clone() for t in kv]
    graphs, runner.prefill_graphs = runner.prefill_graphs, None
    hidden_e, ids_e = runner.forward(out)
    after_eager = [t.clone() for t in kv]
    for t, b in zip(kv, before, strict=True):
        t.copy_(b)
    runner.prefill_graphs = graphs
    runs = graphs.num_runs
    assert runner.uses_prefill_graph(out)
    hidden_g, ids_g = runner.forward(out)
    assert graphs.num_runs == runs + 1 and ids_g == ids_e
    torch.testing.assert_close(hidden_g.float(), hidden_e.float(), atol=atol, rtol=atol)
    for t, e in zip(kv, after_eager, strict=True):  # the padding rows stored nothing
        torch.testing.assert_close(t, e, atol=atol, rtol=atol)


def test_graph_sizes_keep_what_a_step_can_reach() -> None:
    assert graph_sizes((128, 256, 1024, 1), 512) == [128, 256]
    assert graph_sizes((), 8192) == []
    with pytest.raises(ValueError):
        PrefillGraphs(None, None, [torch.zeros(1)], 4, [8, 4], 64, torch.device("cpu"), False)


def test_static_buffer_path_matches_eager_on_cpu() -> None:
    """Padding, a cached prefix (start_pos > 0), an exact fit, stale buffers from a longer
    run, and a chunk that does not sample, through the static buffers eagerly on CPU."""
    runner, kv = _runner(torch.float32, "cpu")
    runner.prefill_graphs = PrefillGraphs(runner.model, runner.attn, kv, 4, [8, 16], 64,
                                          torch.device("cpu"), use_cuda_graph=False)
    _compare(runner, kv, _chunk(16, 0, [3, 8, 1, 2]), atol=1e-5)  # exact fit
    _compare(runner, kv, _chunk(5, 0, [3, 8]), atol=1e-5)  # padded to 8, after a longer run
    _compare(runner, kv, _chunk(7, 6, [5, 9, 11, 12]), atol=1e-5)  # over a 6-token prefix
    hidden, ids = runner.forward(_chunk(6, 0, [4, 6], sample=False))
    assert ids == [] and hidden.shape[0] == 0
    g = runner.prefill_graphs
    assert not g.can_run(_chunk(17, 0, list(range(5))).chunks)  # over the largest size
    assert not g.can_run(_chunk(1, 3, [1]).chunks)  # one token: decode graphs' job
    two = _chunk(4, 0, [1]).chunks + _chunk(4, 0, [2]).chunks
    assert not g.can_run(two)
    assert not runner.uses_prefill_graph(_chunk(5, 0, [3, 8]), layer_hook=lambda i: None)


def test_llm_on_cpu_captures_no_prefill_graphs() -> None:
    llm = LLM("tiny", max_num_seqs=4)
    assert llm.engine.runner.prefill_graphs is None


def test_max_model_len_past_the_models_positions_is_refused() -> None:
    """Rope's table has max_position_embeddings rows (2048 for `tiny`): a longer context
    would read past it, and its tokens differ from HF's (seen on GPU before this check)."""
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        LLM("tiny", max_model_len=4096)
    assert LLM("tiny", max_model_len=2048).engine.max_model_len == 2048


# ---- GPU ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("pgraphs"), "llama")


def _generate(model: str, dtype: str, graphs: bool, prompts: list[list[int]],
              params: SamplingParams) -> tuple[list[list[int]], int]:
    llm = LLM(model, device="cuda", dtype=dtype, max_num_seqs=1, num_blocks=128,
              max_model_len=256, enforce_eager=not graphs)  # the HF checkpoint's positions
    pg = llm.engine.runner.prefill_graphs
    assert (pg is not None) == graphs
    outs = [llm.generate(p, params)[0].token_ids for p in prompts]  # one prompt per step
    stats = llm.engine.kv_stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    runs = pg.num_runs if pg else 0
    del llm
    torch.cuda.empty_cache()
    return outs, runs


@pytest.mark.gpu
def test_prefill_graphs_equal_eager_bf16_at_captured_sizes() -> None:
    """Prompts of exactly a captured size run the kernels eager execution runs: token 0
    identical in bf16 (one token: no decode step, whose graphs differ from eager decode)."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (128, 128, 128)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    eager, _ = _generate("tiny", "bfloat16", False, prompts, one)
    graph, runs = _generate("tiny", "bfloat16", True, prompts, one)
    assert runs == len(prompts)
    assert graph == eager


@pytest.mark.gpu
def test_prefill_graphs_padded_fp32_match_eager_and_hf(hf_ckpt) -> None:
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (5, 100, 200)]
    eager, _ = _generate(str(hf_ckpt), "float32", False, prompts, GREEDY)
    graph, runs = _generate(str(hf_ckpt), "float32", True, prompts, GREEDY)
    assert runs == len(prompts)
    assert graph == eager
    hf = load_hf_model(hf_ckpt)
    for prompt, ours in zip(prompts, graph, strict=True):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY.max_tokens,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == ref


@pytest.mark.gpu
def test_prefill_graph_hidden_close_to_eager_bf16_padded() -> None:
    runner, kv = _runner(torch.bfloat16, "cuda", num_blocks=64)
    assert runner.capture_prefill_graphs([8, 16, 32], 128, progress=False)
    assert sorted(runner.prefill_graphs.graphs) == [8, 16, 32]
    _compare(runner, kv, _chunk(5, 0, [3, 8]), atol=3e-2)
    _compare(runner, kv, _chunk(20, 6, [5, 9, 11, 12, 13, 14, 15]), atol=3e-2)


def test_worker_refuses_max_model_len_past_the_model_by_name() -> None:
    from worker_exit import worker_refusal

    err = worker_refusal("--role", "both", "--max-model-len", "4096")
    assert "pdserve worker: error: max_model_len 4096 exceeds" in err

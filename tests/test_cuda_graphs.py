"""Decode CUDA graphs: bucket/padding logic and the static-buffer path on CPU; on CUDA,
graph replay against eager execution (greedy outputs and hidden states)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import load_hf_model, make_hf_checkpoint

from pdserve.engine.cuda_graphs import (
    DEFAULT_CAPTURE_SIZES,
    BlockTableStaging,
    DecodeGraphs,
    bucket_for,
    capture_sizes,
    graphs_unsupported,
    pad_decode_batch,
)
from pdserve.engine.loader import load_model
from pdserve.engine.model_runner import ModelRunner, allocate_kv_caches
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from pdserve.kernels.attention import get_backend
from pdserve.llm import LLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def decode_chunk(seq_id: str, ctx: int, block_ids: list[int], token: int = 7,
                 sample: bool = True, table_id: int = -1) -> ScheduledChunk:
    """The step that feeds token `ctx - 1` of a sequence whose first ctx - 1 are cached."""
    return ScheduledChunk(seq_id, [token], ctx - 1, block_ids, sample, GREEDY, 0, table_id)


# ---- CPU: sizes and padding -----------------------------------------------------------------
def test_capture_sizes_and_buckets() -> None:
    assert DEFAULT_CAPTURE_SIZES[:6] == (1, 2, 4, 8, 16, 24) and DEFAULT_CAPTURE_SIZES[-1] == 256
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(256)[-1] == 256 and capture_sizes(1000)[-1] == 256
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)
    sizes = capture_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 9, 17, 25, 64)] == [1, 2, 4, 8, 16, 24, 32, 64]
    assert bucket_for(65, sizes) is None


def test_graphs_unsupported_reasons() -> None:
    assert "not CUDA" in graphs_unsupported(torch.device("cpu"), get_backend("torch"))
    if torch.cuda.is_available():
        assert "not graph-safe" in graphs_unsupported(torch.device("cuda"), get_backend("torch"))


def test_block_table_staging_rewrites_only_what_changed() -> None:
    st = BlockTableStaging(4, 6)
    a, b = decode_chunk("a", 5, [3, 8], table_id=1), decode_chunk("b", 1, [6], table_id=2)
    assert st.fill([a, b], 4, pad_block=99) == 2
    assert st.array[:2, :2].tolist() == [[3, 8], [6, 0]] and (st.array[2:, 0] == 99).all()
    st.array[0, 0] = -5  # a kept row with the same table id is not converted again ...
    a2 = decode_chunk("a", 9, [3, 8, 4], table_id=1)  # ... only its new tail is
    assert st.fill([a2, b], 2, pad_block=99) == 3
    assert st.array[0, :3].tolist() == [-5, 8, 4]
    # a replaced table (new id), a sequence moving rows, unknown ids: whole rows rewritten
    a3 = decode_chunk("a", 5, [7, 1], table_id=9)
    assert st.fill([b, a3, decode_chunk("c", 2, [5], table_id=-1)], 3, pad_block=99) == 2
    assert [st.array[0, :1].tolist(), st.array[1, :2].tolist(), st.array[2, :1].tolist()] == \
        [[6], [7, 1], [5]]  # entries past a row's length may be stale: never read
    st.array[2, 0] = -1
    st.fill([b, a3, decode_chunk("c", 2, [5], table_id=-1)], 3, pad_block=99)
    assert st.array[2, 0] == 5  # id -1 never trusts the row


def test_pad_decode_batch() -> None:
    bs, pad = 4, 99
    chunks = [decode_chunk("a", 5, [3, 8], token=11), decode_chunk("b", 1, [6], token=12),
              decode_chunk("c", 13, [1, 2, 9, 4], token=13, sample=False)]
    p = pad_decode_batch(chunks, 8, bs, pad)
    assert p.num_real == 3 and p.block_tables.shape == (8, 4)
    assert p.input_ids.tolist() == [11, 12, 13, 0, 0, 0, 0, 0]
    assert p.positions.tolist() == [4, 0, 12, 0, 0, 0, 0, 0]
    assert p.seq_lens.tolist() == [5, 1, 13, 1, 1, 1, 1, 1]
    # position 4 of "a" is slot 0 of its 2nd block (8); padding rows write the scratch block
    assert p.slot_mapping.tolist() == [8 * bs, 6 * bs, 4 * bs] + [pad * bs] * 5
    assert p.block_tables[:3].tolist() == [[3, 8, 0, 0], [6, 0, 0, 0], [1, 2, 9, 4]]
    assert (p.block_tables[3:, 0] == pad).all()
    with pytest.raises(AssertionError):
        pad_decode_batch(chunks, 2, bs, pad)


def _tiny_runner(dtype: torch.dtype, device: str, num_blocks: int = 40, bs: int = 4):
    model, mcfg = load_model("tiny", dtype, device, seed=3)
    kv = allocate_kv_caches(mcfg, num_blocks, bs, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in kv:
        layer.normal_(generator=gen)
    runner = ModelRunner(model, mcfg, get_backend("triton", device), kv, bs, device)
    return runner, kv


def _decode_step(lens_and_blocks: list[tuple[int, list[int]]], skip_sample: int | None = None
                 ) -> SchedulerOutput:
    return SchedulerOutput(chunks=[
        decode_chunk(f"s{i}", ctx, blocks, token=20 + i, sample=i != skip_sample)
        for i, (ctx, blocks) in enumerate(lens_and_blocks)])


def _compare_graph_and_eager(runner: ModelRunner, kv: list[torch.Tensor], graphs: DecodeGraphs,
                             out: SchedulerOutput, atol: float) -> None:
    before = [t.clone() for t in kv]
    runner.graphs = None
    hidden_e, ids_e = runner.forward(out)
    after_eager = [t.clone() for t in kv]
    for t, b in zip(kv, before, strict=True):
        t.copy_(b)
    runner.graphs = graphs
    runs = graphs.num_runs
    assert runner.uses_graph(out)
    hidden_g, ids_g = runner.forward(out)
    assert graphs.num_runs == runs + 1
    assert ids_g == ids_e
    torch.testing.assert_close(hidden_g.float(), hidden_e.float(), atol=atol, rtol=atol)
    pad = graphs.pad_block
    for t, e in zip(kv, after_eager, strict=True):  # real blocks: the same K/V writes
        torch.testing.assert_close(t[:pad], e[:pad], atol=atol, rtol=atol)


def test_static_buffer_path_matches_eager_on_cpu() -> None:
    """The graph data path (padding, static buffers, fixed metadata) run eagerly on CPU."""
    runner, kv = _tiny_runner(torch.float32, "cpu")
    pad = kv[0].shape[0] - 1
    graphs = DecodeGraphs(runner.model, runner.attn, kv, 4, pad, [1, 2, 4, 8], 64,
                          torch.device("cpu"), use_cuda_graph=False)
    pad_before = [t[pad].clone() for t in kv]
    # 3 rows (padded to 4), one of them not sampling; then 1 row (stale rows left behind)
    _compare_graph_and_eager(runner, kv, graphs,
                             _decode_step([(5, [3, 8]), (1, [6]), (13, [1, 2, 9, 4])], skip_sample=1),
                             atol=1e-5)
    _compare_graph_and_eager(runner, kv, graphs, _decode_step([(9, [10, 11, 12])]), atol=1e-5)
    assert any(not torch.equal(t[pad], b) for t, b in zip(kv, pad_before, strict=True))
    # not graphable: too many rows, a 2-token chunk, a hook
    assert not graphs.can_run(_decode_step([(2, [i]) for i in range(9)]).chunks)
    two = ScheduledChunk("x", [1, 2], 0, [5], True, GREEDY, 0)
    assert not graphs.can_run([two])
    runner.graphs = graphs
    assert not runner.uses_graph(_decode_step([(2, [1])]), layer_hook=lambda i: None)


def test_llm_on_cpu_captures_nothing() -> None:
    llm = LLM("tiny", max_num_seqs=4)
    assert llm.engine.runner.graphs is None
    assert llm.engine.kv_caches[0].shape[0] == llm.engine.num_blocks + 1  # scratch block


# ---- GPU ----------------------------------------------------------------------------------
def _generate(model: str, dtype: str, enforce_eager: bool, prompts: list[list[int]],
              params: list[SamplingParams], **kw) -> tuple[list[list[int]], int]:
    llm = LLM(model, device="cuda", dtype=dtype, enforce_eager=enforce_eager, max_num_seqs=8,
              num_blocks=128, **kw)
    graphs = llm.engine.runner.graphs
    assert (graphs is None) == enforce_eager
    outs = llm.generate(prompts, params)
    stats = llm.engine.kv_stats()
    assert stats["free_blocks"] == stats["total_blocks"]
    runs = graphs.num_runs if graphs else 0
    del llm
    torch.cuda.empty_cache()
    return [o.token_ids for o in outs], runs


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("graphs"), "llama")


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny", "hf"])
def test_graphs_equal_eager_bf16(model: str, hf_ckpt) -> None:
    """Batches that exactly fill a captured size: graph replay runs the very kernels eager
    execution runs (max_model_len 256 keeps one decode split on both paths), so greedy
    outputs must be identical in bf16."""
    name = str(hf_ckpt) if model == "hf" else "tiny"
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (9,), generator=gen).tolist() for _ in range(4)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 4
    eager, _ = _generate(name, "bfloat16", True, prompts, params, max_model_len=256)
    graph, runs = _generate(name, "bfloat16", False, prompts, params, max_model_len=256)
    assert runs >= 23
    assert graph == eager


@pytest.mark.gpu
def test_graphs_padded_batches_fp32_match_eager_and_hf(hf_ckpt) -> None:
    """Batches of 3, then 2, then 1 (padded to 4, 2, 1), prompts of different lengths."""
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 33)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (24, 12, 6)]
    eager, _ = _generate(str(hf_ckpt), "float32", True, prompts, params)
    graph, runs = _generate(str(hf_ckpt), "float32", False, prompts, params)
    assert runs > 0
    assert graph == eager
    hf = load_hf_model(hf_ckpt)
    for prompt, p, ours in zip(prompts, params, graph, strict=True):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=p.max_tokens,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == ref


@pytest.mark.gpu
def test_graph_hidden_close_to_eager_bf16_padded() -> None:
    runner, kv = _tiny_runner(torch.bfloat16, "cuda", num_blocks=64)
    pad = kv[0].shape[0] - 1
    assert runner.capture_cuda_graphs(8, 128, pad_block=pad, progress=False)
    graphs = runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    step5 = _decode_step([(5, [3, 8]), (1, [6]), (13, [1, 2, 9, 4]), (40, list(range(20, 30))),
                          (17, [40, 41, 42, 43, 44])], skip_sample=2)
    _compare_graph_and_eager(runner, kv, graphs, step5, atol=3e-2)
    _compare_graph_and_eager(runner, kv, graphs, _decode_step([(7, [50, 51])]), atol=3e-2)


@pytest.mark.gpu
def test_no_graphs_with_torch_attention_or_enforce_eager() -> None:
    for kw in ({"attention_backend": "torch"}, {"enforce_eager": True}):
        llm = LLM("tiny", device="cuda", dtype="bfloat16", max_num_seqs=4, num_blocks=16, **kw)
        assert llm.engine.runner.graphs is None
        assert len(llm.generate([1, 2, 3], GREEDY)[0].token_ids) == GREEDY.max_tokens

"""Overlap scheduling end to end in one engine: a mixed workload (arrivals, finishes by
length and by stop token, an abort, greedy and seeded sampling, a shared prefix) gives the
same tokens, finish reasons and stream with overlap on and off, and every block is free
afterwards. On CPU the device copies are synchronous, but the control flow (the next step
launched before this one is applied, its tokens read one step late, the extra token of an
ended sequence discarded, synchronous steps whenever the batch changes) is the same."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from helpers_models import load_hf_model, make_hf_checkpoint

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.step_pipeline import StepPipeline
from pdserve.llm import LLM

PROMPTS = {name: [(37 * i + 11 * k) % 250 + 3 for i in range(n)]
           for k, (name, n) in enumerate([("a", 5), ("b", 9), ("c", 3), ("d", 17), ("e", 40)])}
PROMPTS["f"] = PROMPTS["b"] + [7, 8, 9, 10, 11, 12, 13, 14]  # shares b's prefix


def greedy(max_tokens: int, stop: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          stop_token_ids=stop)


def seeded(max_tokens: int, seed: int, stop: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True, stop_token_ids=stop)


def make_engine(overlap: bool, device: str = "cpu", block_size: int = 4, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", device=device, overlap=overlap,
                                  cache=CacheConfig(block_size=block_size, num_blocks=128), **kw))


def all_free(engine: LLMEngine) -> bool:
    engine.scheduler.check_invariants()
    s = engine.kv_stats()
    return s["free_blocks"] == s["total_blocks"] and s["running"] == s["waiting"] == 0


class Run:
    """Drives a StepPipeline the way EngineLoop does: outside work (here `events`, keyed by
    the number of steps applied before it) runs only with nothing in flight, and a call due
    next stops the pipeline from launching ahead."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.streamed: dict[str, list[int]] = defaultdict(list)
        self.reasons: dict[str, str] = {}
        self.seqs = {}
        self.pipe: StepPipeline = engine.pipeline(self.on_result)

    def on_result(self, out, res) -> None:
        for sid, tok in res.new_tokens.items():
            self.streamed[sid].append(tok)
        for seq in res.finished:
            self.reasons[seq.seq_id] = seq.finish_reason

    def add(self, name: str, params: SamplingParams) -> Callable[[], None]:
        def fn() -> None:
            self.seqs[name] = self.engine.add_request(PROMPTS[name], params, seq_id=name)
        return fn

    def go(self, events: dict[int, list[Callable[[], None]]]) -> Run:
        events, applied = dict(events), 0
        while True:
            if self.pipe.in_flight is None:
                for t in sorted(t for t in events if t <= applied):
                    for fn in events.pop(t):
                        fn()
            soon = any(t <= applied + 1 for t in events)
            if self.pipe.advance(may_run_ahead=not soon):
                applied += 1
                self.engine.scheduler.check_invariants()
            elif events:
                applied = min(events)
            else:
                return self


def workload(run: Run, stop_b: int, stop_f: int) -> dict[int, list[Callable[[], None]]]:
    return {
        0: [run.add("a", greedy(14)), run.add("b", greedy(20, (stop_b,)))],
        3: [run.add("c", seeded(9, seed=7))],
        6: [lambda: run.engine.abort("a")],
        8: [run.add("d", greedy(4))],  # ends by length among steady decoders
        11: [run.add("e", seeded(15, seed=3)), run.add("f", seeded(10, seed=5, stop=(stop_f,)))],
    }


def stop_tokens(engine: LLMEngine) -> tuple[int, int]:
    """Tokens that b and f produce mid-stream without stops (so the stops really fire)."""
    probe = Run(engine)
    probe.go({0: [probe.add("b", greedy(20)), probe.add("f", seeded(10, seed=5))]})
    return probe.seqs["b"].output_token_ids[6], probe.seqs["f"].output_token_ids[4]


def check_same(on: Run, off: Run) -> None:
    assert set(on.seqs) == set(off.seqs) == set(PROMPTS)
    for name in PROMPTS:
        got, want = on.seqs[name], off.seqs[name]
        assert got.output_token_ids == want.output_token_ids, name
        assert got.finish_reason == want.finish_reason, name
        # the stream holds exactly the applied tokens, in order: no discarded extra token
        assert on.streamed[name] == got.output_token_ids, name
        assert off.streamed[name] == want.output_token_ids, name
    assert on.reasons == off.reasons
    assert all_free(on.engine) and all_free(off.engine)


@pytest.fixture(scope="module")
def engines() -> dict[bool, LLMEngine]:
    return {flag: make_engine(flag) for flag in (True, False)}


@pytest.fixture(scope="module")
def stops(engines) -> tuple[int, int]:
    return stop_tokens(engines[False])


def test_overlap_on_and_off_give_the_same_outputs(engines, stops) -> None:
    stop_b, stop_f = stops
    assert stop_tokens(engines[True]) == stops
    runs = {}
    for flag, eng in engines.items():
        run = Run(eng)
        runs[flag] = run.go(workload(run, stop_b, stop_f))
    on, off = runs[True], runs[False]
    check_same(on, off)
    reasons = on.reasons
    assert on.seqs["a"].finish_reason == "abort" and reasons["d"] == "length"
    assert reasons["b"] == "stop" and on.seqs["b"].output_token_ids[-1] == stop_b
    assert reasons["f"] == "stop" and on.seqs["f"].output_token_ids[-1] == stop_f
    assert on.pipe.num_overlapped > 0 and off.pipe.num_overlapped == 0
    assert on.pipe.num_discarded > 0 and off.pipe.num_discarded == 0


def test_default_is_on_for_cuda_only() -> None:
    assert make_engine(None).overlap is False  # type: ignore[arg-type]


def test_a_stop_in_a_steady_batch_discards_the_extra_token(engines, stops) -> None:
    """b stops while a keeps decoding: b's stop step was followed by a step launched before
    it was known, whose token for b must vanish and whose slot must be freed."""
    eng, stop_b = engines[True], stops[0]
    run = Run(eng)
    run.go({0: [run.add("a", greedy(20)), run.add("b", greedy(20, (stop_b,)))]})
    b = run.seqs["b"]
    assert b.finish_reason == "stop" and b.output_token_ids[-1] == stop_b
    assert run.streamed["b"] == b.output_token_ids and len(run.seqs["a"].output_token_ids) == 20
    assert run.pipe.num_overlapped > 0 and run.pipe.num_discarded == 1 and all_free(eng)


def run_threaded(engine: LLMEngine, requests: dict[str, SamplingParams],
                 abort_after: tuple[str, int] | None = None) -> dict[str, list[int]]:
    """The real EngineLoop thread: requests go in as calls; an abort is a call too, made
    from on_result once the named request has streamed that many tokens."""
    streamed: dict[str, list[int]] = defaultdict(list)
    ended: set[str] = set()
    done = threading.Event()
    loop: EngineLoop

    def on_result(out, res) -> None:
        for sid, tok in res.new_tokens.items():
            streamed[sid].append(tok)
            if abort_after and sid == abort_after[0] and len(streamed[sid]) == abort_after[1]:
                loop.call(lambda s=sid: engine.abort(s) and ended.add(s))
        ended.update(s.seq_id for s in res.finished)
        if ended >= set(requests):
            done.set()

    loop = EngineLoop(engine, on_result)
    loop.start()
    try:
        for name, params in requests.items():
            loop.call(lambda n=name, p=params: engine.add_request(PROMPTS[n], p, seq_id=n))
        assert done.wait(60), "requests did not end"
        assert loop.call(lambda: all_free(engine)).result(timeout=30)
    finally:
        loop.stop()
    assert loop.error is None
    assert (loop.pipeline.num_overlapped > 0) == engine.overlap
    return dict(streamed)


def test_engine_loop_thread_overlap_equals_sync_and_frees_after_an_abort(engines) -> None:
    reqs = {"b": greedy(12), "d": greedy(7), "e": seeded(10, seed=9), "f": greedy(5)}
    assert run_threaded(engines[True], reqs) == run_threaded(engines[False], reqs)
    got = run_threaded(engines[True], {"a": greedy(40), "c": greedy(10)}, abort_after=("a", 3))
    assert len(got["c"]) == 10 and 3 <= len(got["a"]) < 40


def test_llm_greedy_with_overlap_equals_hf(tmp_path) -> None:
    """The offline API steps through the pipeline too: with overlap forced on, greedy
    output still equals HF transformers, token for token, for a batch of prompts that
    finish at different steps."""
    path = make_hf_checkpoint(tmp_path, "llama", seed=3)
    hf = load_hf_model(path)
    prompts, lens = [PROMPTS["a"], PROMPTS["d"], PROMPTS["e"]], [9, 16, 5]
    llm = LLM(model=str(path), block_size=4, num_blocks=128, overlap=True)
    outs = llm.generate(prompts, [greedy(n) for n in lens])
    for prompt, n, got in zip(prompts, lens, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                              eos_token_id=None, pad_token_id=0)
        assert got.token_ids == ref[0, len(prompt):].tolist()
    assert all_free(llm.engine)


@pytest.mark.gpu
def test_cuda_overlap_equals_sync_with_graphs() -> None:
    """On CUDA: decode graphs replay with input ids taken from the previous step's device
    tensor, tokens come back through pinned memory; the outputs equal synchronous steps,
    driven step by step and on the engine loop thread."""
    runs, stops, threaded = {}, {}, {}
    reqs = {"b": greedy(12), "d": greedy(7), "e": seeded(10, seed=9), "f": greedy(5)}
    for flag in (True, False):
        eng = make_engine(flag, device="cuda", block_size=16, dtype="float32",
                          attention_backend="triton",
                          scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=256))
        assert eng.overlap is flag and eng.runner.graphs is not None
        stops[flag] = stop_tokens(eng)
        run = Run(eng)
        runs[flag] = run.go(workload(run, *stops[flag]))
        threaded[flag] = run_threaded(eng, reqs)
        assert eng.runner.graphs.num_runs > 0
    assert stops[True] == stops[False]
    check_same(runs[True], runs[False])
    assert runs[True].pipe.num_overlapped > 0
    assert threaded[True] == threaded[False]


def test_worker_flag_turns_overlap_off() -> None:
    import argparse

    from pdserve.worker_cli import add_engine_arguments, engine_config_from_args
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert engine_config_from_args(p.parse_args([])).overlap is None  # on for CUDA
    assert engine_config_from_args(p.parse_args(["--no-overlap"])).overlap is False

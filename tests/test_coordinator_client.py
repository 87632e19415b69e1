"""Client, AsyncClient, `pdserve generate --coordinator` and `pdserve coordinator`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from fake_worker import Cluster, Knobs, LoopThread, fake_outputs

import pdserve
from pdserve.cli import main as pdserve_main
from pdserve.coordinator.client import AsyncClient, Client, ClientError
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def cluster():
    lt = LoopThread()
    c = Cluster(lt)
    c.add("prefill")
    c.add("decode", knobs=Knobs(chunk_tokens=2, chunk_delay_s=0.002))
    yield c
    c.stop()
    lt.close()


def test_sync_client(cluster):
    assert pdserve.Client is Client and pdserve.AsyncClient is AsyncClient
    with Client(cluster.address, timeout_s=10) as cl:
        workers = cl.wait_ready(n_prefill=1, n_decode=1, timeout_s=5)
        assert {w["info"]["role"] for w in workers} == {"prefill", "decode"}
        before = time.time()
        r = cl.generate(prompt_token_ids=[1, 2], sampling=SamplingParams(max_tokens=5, temperature=0))
        assert r.token_ids == [3, 4, 5, 6, 7] and r.finish_reason == "length" and r.request_id
        assert r.metrics["ttft_ms"] > 0 and r.metrics["completion_tokens"] == 5
        # when the coordinator's handler started the call, on the wall clock
        assert before <= r.metrics["received_unix_s"] <= time.time()
        r2 = cl.generate([1, 2], sampling={"max_tokens": 3}, max_tokens=4)  # kw overrides dict
        assert r2.token_ids == [3, 4, 5, 6]
        chunks = list(cl.stream("ab", max_tokens=5, request_id="mine"))
        assert chunks[0].request_id == "mine" and chunks[-1].finished
        assert "".join(ch.text for ch in chunks) == "cdefg"
        stats = cl.stats()
        assert stats["requests_finished"] >= 3 and len(stats["workers"]) == 2
        assert len(cl.list_workers()) == 2
        with pytest.raises(ValueError, match="exactly one"):
            cl.generate()
        with pytest.raises(TypeError, match="bogus"):
            cl.generate([1], bogus=1)


def test_async_client(cluster):
    async def main():
        async with AsyncClient(cluster.address, timeout_s=10) as cl:
            await cl.wait_ready(n_prefill=1, n_decode=1, timeout_s=5)
            r = await cl.generate(prompt_token_ids=[10], max_tokens=4, skip_text=True)
            assert r.token_ids == [11, 12, 13, 14] and r.text == ""
            got = [ch.token_ids async for ch in cl.stream([20], max_tokens=6)]
            assert sum(got, []) == fake_outputs([20], 6)[0]
            it = cl.stream([1], max_tokens=300, request_id="a-1")
            await it.__anext__()
            assert await cl.abort("a-1")
            with pytest.raises(ClientError) as e:
                async for _ in it:
                    pass
            assert e.value.code == grpc.StatusCode.CANCELLED
            assert (await cl.stats())["requests_total"] >= 3
            assert len(await cl.list_workers()) == 2

    asyncio.run(main())


def test_generate_cli(cluster, capsys):
    base = ["generate", "--coordinator", cluster.address, "--max-tokens", "5"]
    assert pdserve_main([*base, "--prompt-ids", "1,2,3", "--json", "--temperature", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"token_ids": [4, 5, 6, 7, 8], "text": "$%&'("}
    assert pdserve_main([*base, "--prompt", "abc", "--stream", "--seed", "3"]) == 0
    assert capsys.readouterr().out == "defgh\n"
    assert pdserve_main([*base, "--prompt", "abc"]) == 0
    assert capsys.readouterr().out == "defgh\n"
    assert pdserve_main([*base, "--prompt-ids", "1", "--top-p", "7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: ") and "top_p" in err
    with pytest.raises(SystemExit):
        pdserve_main(["generate", "--coordinator", cluster.address])  # no prompt


def test_generate_cli_unreachable(capsys):
    rc = pdserve_main(["generate", "--coordinator", "127.0.0.1:1", "--prompt-ids", "1",
                       "--timeout", "2"])
    assert rc == 1 and capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_coordinator_command_serves_and_stops():
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "coordinator", "--port", "0",
                             "--routing", "round_robin", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PDSERVE_AUTH_TOKEN": ""})
    try:
        line = proc.stdout.readline()
        assert line.startswith("coordinator listening on "), (line, proc.stderr.read())
        address = line.split()[-1]
        with Client(address, timeout_s=5) as cl:
            assert cl.list_workers() == [] and cl.stats()["requests_total"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()

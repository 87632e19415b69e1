"""Common mistakes end in one clear line, not a traceback (pdserve/errors.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.errors import ResourceError
from pdserve.engine.memory import check_fits, weight_bytes
from pdserve.engine.presets import PRESETS
from pdserve.errors import user_error
from pdserve.llm import LLM

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")


def pdserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True,
                          text=True, timeout=120)


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = pdserve("coordinator", "--port", str(s.getsockname()[1]))
    assert r.returncode == 1
    assert "in use" in one_line(r.stderr)


@no_cuda
def test_cuda_device_without_cuda_is_one_line() -> None:
    r = pdserve("generate", "--local", "--device", "cuda", "--prompt", "hi")
    assert r.returncode == 1 and "no CUDA device" in one_line(r.stderr)
    r = pdserve("up", "--devices", "0,1", "--prefill", "1", "--decode", "1")
    assert r.returncode == 2 and "0 visible CUDA device" in one_line(r.stderr)


def test_weight_bytes_counts_every_parameter() -> None:
    llm = LLM("tiny", num_blocks=8)
    params = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    assert weight_bytes(llm.engine.model_cfg, torch.float32) == params


def test_too_large_model_is_refused_before_loading(monkeypatch) -> None:
    mcfg: ModelConfig = PRESETS["llama-3.1-8b"]
    monkeypatch.setattr("pdserve.engine.memory.available_bytes", lambda d: (16 << 30, "here has"))
    with pytest.raises(ResourceError, match=r"needs about 32\.1 GB.*here has 17\.2 GB available"):
        check_fits("llama-3.1-8b", mcfg, torch.float32, "cpu")
    check_fits("llama-3.1-8b", mcfg, torch.bfloat16, "cpu")  # 16.1 GB < 0.95 x 17.2 GB: fits


def test_missing_optional_package_names_the_extra() -> None:
    line = user_error(ModuleNotFoundError("No module named 'ucxx'", name="ucxx"))
    assert line is not None and "pip install 'pdserve[ucx]'" in line
    assert user_error(ModuleNotFoundError("No module named 'nothing_known'", name="nothing_known")) \
        is None  # unknown imports stay bugs, with their traceback
    assert user_error(ValueError("x")) is None


def test_a_restarted_server_can_listen_on_its_port_in_time_wait() -> None:
    """A killed server's port has connections in TIME_WAIT: listen() must not call that
    'in use' (the supervisor restarts a coordinator on the same port)."""
    import asyncio

    from pdserve.proto.grpc_util import listen, new_server

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listener has
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server side closes first: its end of the pair goes to TIME_WAIT
    cli.close()
    srv.close()

    async def bind() -> int:
        server = new_server()
        try:
            return listen(server, "127.0.0.1", port)
        finally:
            await server.stop(0)
    assert asyncio.run(bind()) == port

"""The protocol: committed stubs match pdserve.proto; import paths; message basics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pdserve.proto import pdserve_pb2 as pb

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"


def _load_generate():
    spec = importlib.util.spec_from_file_location("pdserve_proto_generate", PROTO_DIR / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = _load_generate()
    for path in gen.generate(tmp_path):
        committed = PROTO_DIR / path.name
        assert committed.is_file(), f"{committed} missing: run `python proto/generate.py`"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.name} is stale: run `python proto/generate.py`")


def test_grpc_stub_imports_package_path():
    text = (PROTO_DIR / "pdserve_pb2_grpc.py").read_text()
    assert "from pdserve.proto import pdserve_pb2" in text
    from pdserve.proto import pdserve_pb2_grpc

    assert hasattr(pdserve_pb2_grpc, "CoordinatorStub") and hasattr(pdserve_pb2_grpc, "WorkerStub")
    assert pb.DESCRIPTOR.package == "pdserve.v1"
    assert pb.DESCRIPTOR.name == "pdserve/proto/pdserve.proto"


def test_services_have_the_documented_methods():
    coord = pb.DESCRIPTOR.services_by_name["Coordinator"]
    worker = pb.DESCRIPTOR.services_by_name["Worker"]
    assert {m.name for m in coord.methods} == {
        "Generate", "Abort", "ListWorkers", "Stats", "Register", "Heartbeat"}
    assert {m.name for m in worker.methods} == {
        "Reserve", "Prefill", "SetKvTarget", "DecodeStream", "Generate", "Abort", "Stats"}
    assert coord.methods_by_name["Generate"].server_streaming
    assert worker.methods_by_name["DecodeStream"].server_streaming
    assert worker.methods_by_name["Generate"].server_streaming


def test_sampling_round_trip_and_defaults():
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.proto.convert import sampling_fields, sampling_to_proto

    sp = SamplingParams(max_tokens=7, temperature=0.0, top_p=0.9, top_k=5, seed=3,
                        stop_token_ids=(1, 2), ignore_eos=True)
    msg = pb.SamplingParams.FromString(sampling_to_proto(sp).SerializeToString())
    assert SamplingParams(**sampling_fields(msg)) == sp
    assert SamplingParams(**sampling_fields(pb.SamplingParams())) == SamplingParams()  # unset = engine default
    assert sampling_to_proto({"temperature": 0.5}, max_tokens=3).max_tokens == 3
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(**sampling_fields(pb.SamplingParams(top_p=2.0)))
    with pytest.raises(TypeError, match="bogus"):
        sampling_to_proto({"bogus": 1})


def test_prompt_oneof():
    req = pb.GenerateRequest(text="hi")
    assert req.WhichOneof("prompt") == "text"
    req.token_ids.ids.extend([1, 2])
    assert req.WhichOneof("prompt") == "token_ids" and not req.text

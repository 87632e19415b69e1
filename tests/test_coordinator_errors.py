"""Every error a client can see (status code + message), auth, and routing/detok units."""

from __future__ import annotations

import grpc
import pytest
from fake_worker import Knobs, assert_no_leaks, wait_until

from pdserve.coordinator.client import Client, ClientError
from pdserve.coordinator.registry import WorkerHandle
from pdserve.coordinator.router import make_policy, policy_names
from pdserve.coordinator.tokens import IncrementalDetokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.worker.coordinator_link import CoordinatorLink, RegistrationFailed, RegistrationRefused

pytestmark = pytest.mark.timeout(30)
C = grpc.StatusCode



def expect(code: grpc.StatusCode, fragment: str, fn, *args, **kw) -> ClientError:
    with pytest.raises(ClientError) as e:
        fn(*args, **kw)
    assert e.value.code == code, e.value
    assert fragment in e.value.details, e.value.details
    return e.value


def test_invalid_arguments(make_cluster):
    c = make_cluster()
    c.add("prefill")
    c.add("decode")
    with Client(c.address, timeout_s=10) as cl:
        g = cl.generate
        expect(C.INVALID_ARGUMENT, "temperature must be", g, prompt_token_ids=[1], temperature=-1.0)
        expect(C.INVALID_ARGUMENT, "top_p must be in (0, 1]", g, prompt_token_ids=[1], top_p=1.5)
        expect(C.INVALID_ARGUMENT, "max_tokens must be", g, prompt_token_ids=[1], max_tokens=0)
        expect(C.INVALID_ARGUMENT, "top_k must be", g, prompt_token_ids=[1], top_k=-2)
        expect(C.INVALID_ARGUMENT, "prompt is empty", g, prompt_token_ids=[])
        expect(C.INVALID_ARGUMENT, "prompt is empty", g, "")
        expect(C.INVALID_ARGUMENT, "maximum length is 512", g, prompt_token_ids=[1] * 512)
        expect(C.INVALID_ARGUMENT, "outside the vocabulary", g, prompt_token_ids=[1, 5000])
        # A long prompt that fits: max_tokens is lowered to the model length.
        r = g(prompt_token_ids=[1] * 508, max_tokens=100)
        assert len(r.token_ids) == 4 and r.finish_reason == "length"
        assert g(prompt_token_ids=[1], max_tokens=2).token_ids == [2, 3]  # still serving
    assert_no_leaks(c)


def test_prompt_needing_more_blocks_than_any_decode_worker(make_cluster):
    c = make_cluster()
    c.add("prefill")
    c.add("decode", num_blocks=2, block_size=16)
    with Client(c.address, timeout_s=10) as cl:
        expect(C.INVALID_ARGUMENT, "needs more KV blocks", cl.generate,
               prompt_token_ids=[1] * 40, max_tokens=1)


def test_unavailable(make_cluster):
    c = make_cluster()
    with Client(c.address, timeout_s=5) as cl:
        expect(C.UNAVAILABLE, "no workers registered", cl.generate, prompt_token_ids=[1])
        c.add("prefill")
        expect(C.UNAVAILABLE, "1 prefill, 0 decode, 0 both", cl.generate, prompt_token_ids=[1])
        c.add("decode")
        assert cl.generate(prompt_token_ids=[1], max_tokens=1).token_ids == [2]


def test_queue_full_is_resource_exhausted(make_cluster):
    c = make_cluster(max_queue=0)
    c.add("prefill")
    d = c.add("decode", knobs=Knobs(refuse_reserve=True))
    with Client(c.address, timeout_s=5) as cl:
        e = expect(C.RESOURCE_EXHAUSTED, "queue is full", cl.generate, prompt_token_ids=[1])
        assert "fake: refusing reservations" in e.details
        d.knobs.refuse_reserve = False
        assert cl.generate(prompt_token_ids=[1], max_tokens=1).token_ids == [2]


def test_deadline_while_queued(make_cluster):
    c = make_cluster(max_queue=8)
    c.add("prefill")
    c.add("decode", knobs=Knobs(refuse_reserve=True))
    with Client(c.address) as cl:
        expect(C.DEADLINE_EXCEEDED, "", cl.generate, prompt_token_ids=[1], timeout_s=0.3)
        wait_until(lambda: cl.stats()["requests_queued"] == 0, what="queue drained")
        assert cl.stats()["requests_failed"] == 1


def test_deadline_mid_stream_frees_blocks(make_cluster):
    c = make_cluster()
    p = c.add("prefill")
    d = c.add("decode", knobs=Knobs(chunk_tokens=1, chunk_delay_s=0.05))
    with Client(c.address) as cl:
        expect(C.DEADLINE_EXCEEDED, "", cl.generate, prompt_token_ids=[1], max_tokens=100,
               timeout_s=0.3)
        wait_until(lambda: d.aborts and p.aborts, what="Abort after the deadline")
    assert_no_leaks(c)


def test_auth(make_cluster):
    c = make_cluster(auth_token="s3cret")
    c.add("both")  # registers with the token
    with Client(c.address, timeout_s=5) as cl:
        expect(C.UNAUTHENTICATED, "missing credentials", cl.generate, prompt_token_ids=[1])
        expect(C.UNAUTHENTICATED, "missing credentials", cl.list_workers)
    with Client(c.address, timeout_s=5, auth_token="wrong") as cl:
        expect(C.UNAUTHENTICATED, "invalid auth token", cl.generate, prompt_token_ids=[1])
        with pytest.raises(ClientError):
            cl.wait_ready(n_both=1, timeout_s=1)
    with Client(c.address, timeout_s=5, auth_token="s3cret") as cl:
        cl.wait_ready(n_both=1, timeout_s=5)
        assert cl.generate(prompt_token_ids=[1], max_tokens=2).token_ids == [2, 3]
    # Health stays open (probes carry no token).
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(c.address) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
            == health_pb2.HealthCheckResponse.SERVING


def test_wrong_model_worker_is_refused(make_cluster, lt):
    c = make_cluster()
    c.add("prefill", model="model-a")
    with pytest.raises(RegistrationRefused, match="serves model 'model-a'"):
        c.add("decode", model="model-b")


def test_unreachable_coordinator_fails_registration_clearly(lt):
    link = CoordinatorLink("127.0.0.1:1", pb.WorkerInfo(role=pb.ROLE_PREFILL), pb.WorkerLoad)
    with pytest.raises(RegistrationFailed, match=r"could not register with the coordinator "
                                                 r"at 127\.0\.0\.1:1: UNAVAILABLE"):
        lt.run(link.start(timeout_s=0.5))
    lt.run(link.stop())


def test_async_load_and_load_failures_keep_the_heartbeat_going(make_cluster, lt):
    """Engine workers probe their load on the engine thread (a coroutine); a failing probe
    logs and the link keeps beating, so the worker stays registered once it recovers."""
    c = make_cluster()
    calls = {"n": 0}

    async def load():
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("engine loop is stopped")
        return pb.WorkerLoad(free_blocks=7, total_blocks=8)

    info = pb.WorkerInfo(role=pb.ROLE_PREFILL, model="fake-model", address="127.0.0.1:9",
                         max_model_len=256, vocab_size=300, total_blocks=8, device="cpu",
                         transfer_backend="fake",
                         kv=pb.KVGeometry(num_layers=2, num_kv_heads=1, head_dim=8,
                                          block_size=4, dtype="float32"))
    link = CoordinatorLink(c.address, info, load)
    seen: list[str] = []
    link.on_register = seen.append
    worker_id = lt.run(link.start(timeout_s=5))
    assert seen == [worker_id]
    wait_until(lambda: calls["n"] >= 4, timeout_s=10, what="four heartbeats")
    assert link._task is not None and not link._task.done()
    lt.run(link.stop())


def test_wait_ready_times_out_with_a_clear_message(make_cluster):
    c = make_cluster()
    c.add("prefill")
    with Client(c.address) as cl:
        with pytest.raises(TimeoutError, match="1 prefill, 0 decode"):
            cl.wait_ready(n_prefill=1, n_decode=1, timeout_s=0.2)


# -- units -------------------------------------------------------------------------------
def _handle(wid: str, role: int, free: int = 10, running: int = 0, queued: int = 0) -> WorkerHandle:
    info = pb.WorkerInfo(worker_id=wid, role=role, address="x:1")
    load = pb.WorkerLoad(free_blocks=free, total_blocks=100, running=running,
                         queued_prefill_tokens=queued)
    return WorkerHandle(info=info, channel=None, stub=None, load=load)


def test_routing_policies():
    assert set(policy_names()) >= {"least_loaded", "round_robin", "prefix_aware"}
    ll = make_policy("least_loaded")
    ds = [_handle("d1", pb.ROLE_DECODE, free=5), _handle("d2", pb.ROLE_DECODE, free=50),
          _handle("d3", pb.ROLE_DECODE, free=50, running=3)]
    assert [w.worker_id for w in ll.order_decode(ds, [1])] == ["d2", "d3", "d1"]
    ps = [_handle("p1", pb.ROLE_PREFILL, queued=900), _handle("p2", pb.ROLE_PREFILL, queued=10)]
    assert ll.order_prefill(ps, [1])[0].worker_id == "p2"
    rr = make_policy("round_robin")
    assert [rr.order_decode(ds, [1])[0].worker_id for _ in range(4)] == ["d1", "d2", "d3", "d1"]
    pa = make_policy("prefix_aware")
    ps = [_handle(f"p{i}", pb.ROLE_PREFILL) for i in range(4)]
    prompts = [[i] * 64 + list(range(10)) for i in range(40)]
    picks = [pa.order_prefill(ps, p)[0].worker_id for p in prompts]
    assert picks == [pa.order_prefill(ps, p + [7, 8])[0].worker_id for p in prompts]  # affinity
    assert len(set(picks)) > 1  # different prefixes spread
    assert pa.order_prefill(ps, [1] * 63)[0].worker_id == "p0"  # short: least loaded
    ps[int(picks[0][1:])].load.queued_prefill_tokens = 10**6  # overloaded -> least loaded
    assert pa.order_prefill(ps, prompts[0])[0].worker_id != picks[0]
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("nope")


def test_generates_between_heartbeats_spread_over_workers():
    """A Generate's prompt blocks count against its worker until the next heartbeat, as a
    Reserve's do: with the heartbeats' free blocks 1000 and 990, requests of 5 blocks go to
    the first until it looks no freer than the second, then alternate (before: all of them
    went to the first, whose reported load does not move between heartbeats)."""
    from pdserve.coordinator.flows import Dispatcher
    from pdserve.coordinator.registry import Registry

    disp = Dispatcher(Registry(), make_policy("least_loaded"), max_queue=8)
    for role in (pb.ROLE_BOTH, pb.ROLE_DECODE):  # colocated, and a local prefill
        ws = [_handle("w1", role, free=1000), _handle("w2", role, free=990)]
        for w in ws:
            w.info.kv.block_size = 16
        picks = [disp.pick_generate(ws, [7] * 65, local=role == pb.ROLE_DECODE).worker_id
                 for _ in range(10)]  # 65 tokens: 5 blocks of 16
        assert picks[:2] == ["w1"] * 2 and picks.count("w2") >= 4, picks
        assert [w.reserved_since_hb for w in ws] == [5 * picks.count("w1"), 5 * picks.count("w2")]
        assert [w.routed for w in ws] == [picks.count("w1"), picks.count("w2")]


def test_a_request_that_ended_gives_its_blocks_back_until_the_next_heartbeat():
    """`release` takes an ended request's blocks (prompt and output) off the count since
    the heartbeat: the worker it ended on is the freest again for the next pick."""
    from pdserve.coordinator.flows import Dispatcher
    from pdserve.coordinator.registry import Registry

    disp = Dispatcher(Registry(), make_policy("least_loaded"), max_queue=8)
    ws = [_handle("w1", pb.ROLE_BOTH, free=1000), _handle("w2", pb.ROLE_BOTH, free=1000)]
    for w in ws:
        w.info.kv.block_size = 16
    picks = [disp.pick_generate(ws, [7] * 65, local=False) for _ in range(4)]  # 5 blocks each
    assert [w.reserved_since_hb for w in ws] == [10, 10]
    for w in picks:
        if w.worker_id == "w1":
            w.release(65 + 30)  # ended after 30 tokens: 6 blocks
    assert [w.reserved_since_hb for w in ws] == [-2, 10]
    assert [disp.pick_generate(ws, [7] * 65, local=False).worker_id for _ in range(3)] == \
        ["w1"] * 3


class _Bytes:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_multibyte():
    text = "héllo wörld 😀!"
    ids = list(text.encode())
    d = IncrementalDetokenizer(_Bytes(), [104, 105])
    pieces = [d.add(ids[i:i + 1]) for i in range(len(ids))]
    assert "".join(pieces) + d.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    d = IncrementalDetokenizer(_Bytes(), [1])
    assert d.add([0xF0, 0x9F]) == "" and d.add([], final=True) == "\ufffd"

"""The load, the recovery probe and the gRPC fuzzer of `pdserve bench chaos`.

`Load` streams requests from threads, each with a deadline, and records how each ended:
its tokens, or its status; a thread still running past its deadline + grace is *hung*.
`Probe` sends a short request every few hundred ms from the moment a fault is injected and
records when one first succeeds (the recovery time). `fuzz` sends malformed bytes and
odd-but-valid messages to every method of the Coordinator and Worker services on loopback
addresses only, a bounded number of calls. With the cluster secret (`credential`), the
calls pass the guard and reach the handlers' own validation: then every status must be a
deliberate one (`BAD_STATUSES` never: UNKNOWN and INTERNAL mean a handler raised).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from pdserve.coordinator.client import Client, ClientError
from pdserve.proto import pdserve_pb2 as pb


@dataclass(slots=True)
class Outcome:
    status: str = "PENDING"  # "OK" or a gRPC status name
    tokens: list[int] = field(default_factory=list)
    done_s: float = 0.0


class Load:
    """`n` greedy streams of `prompts[i]`, each `max_tokens` long, deadline `deadline_s`."""

    def __init__(self, address: str, prompts: list[list[int]], max_tokens: int,
                 deadline_s: float) -> None:
        self.address, self.prompts = address, prompts
        self.max_tokens, self.deadline_s = max_tokens, deadline_s
        self.outcomes = [Outcome() for _ in prompts]
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True)
                        for i in range(len(prompts))]
        self.t0 = 0.0

    def start(self) -> Load:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def _one(self, i: int) -> None:
        out = self.outcomes[i]
        try:
            with Client(self.address, timeout_s=self.deadline_s) as cl:
                for chunk in cl.stream(prompt_token_ids=self.prompts[i], max_tokens=self.max_tokens,
                                       temperature=0.0, ignore_eos=True, skip_text=True):
                    out.tokens += chunk.token_ids
            out.status = "OK"
        except ClientError as e:
            out.status = e.code.name if e.code is not None else "ERROR"
        except Exception as e:  # noqa: BLE001 - recorded, never raised in a load thread
            out.status = type(e).__name__
        out.done_s = time.monotonic()

    def streaming(self) -> int:
        """Requests that received a token and have not ended."""
        return sum(1 for o in self.outcomes if o.tokens and o.status == "PENDING")

    def join(self, grace_s: float = 10.0) -> int:
        """Wait for every request up to its deadline + grace; returns the number hung."""
        end = self.t0 + self.deadline_s + grace_s
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return sum(t.is_alive() for t in self.threads)

    def summary(self, reference: list[list[int] | None] | None) -> dict[str, object]:
        by_status = Counter(o.status for o in self.outcomes if o.status not in ("OK", "PENDING"))
        ok = [i for i, o in enumerate(self.outcomes) if o.status == "OK"]
        wrong = sum(1 for i in ok if reference is not None and reference[i] is not None
                    and self.outcomes[i].tokens != reference[i])
        return {"sent": len(self.outcomes), "succeeded": len(ok), "mismatched": wrong,
                "failed": sum(by_status.values()),
                "failed_by_status": " ".join(f"{k}:{v}" for k, v in sorted(by_status.items())) or "-"}


class Probe:
    """From start(): a short request every `period_s` until one succeeds."""

    def __init__(self, address: str, period_s: float = 0.25, timeout_s: float = 120.0) -> None:
        self.address, self.period_s, self.timeout_s = address, period_s, timeout_s
        self.recovered_s: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Probe:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        while time.monotonic() - self.t0 < self.timeout_s:
            try:
                with Client(self.address, timeout_s=10) as cl:
                    cl.generate(prompt_token_ids=[3, 1, 4], max_tokens=4, temperature=0.0,
                                skip_text=True)
                self.recovered_s = time.monotonic() - self.t0
                return
            except Exception:  # noqa: BLE001 - not yet
                time.sleep(self.period_s)

    def wait(self) -> float | None:
        self._thread.join(self.timeout_s)
        return self.recovered_s


# -- fuzzing ---------------------------------------------------------------------------------
def _odd_sampling(rng: random.Random) -> pb.SamplingParams:
    s = pb.SamplingParams(max_tokens=rng.choice([0, 1, -5, 2**31 - 1, 8]),
                          temperature=rng.choice([0.0, -1.0, float("nan"), 1e308, 0.5]),
                          top_p=rng.choice([0.0, 1.0, 2.0, 0.5]), top_k=rng.choice([-1, 0, 10**9]))
    if rng.random() < 0.5:
        s.seed = rng.choice([0, -1, 2**62])
    s.stop_token_ids.extend(rng.choice([[], [-1], [2**31 - 1]]))
    return s


def _odd_messages(rng: random.Random, service: str, method: str) -> object | None:
    ids = rng.choice([[], [-3], [2**31 - 1], [1] * rng.randint(1, 5000), [rng.randint(0, 300)]])
    rid = rng.choice(["", "x" * 10000, "\u0000", f"fuzz-{rng.randint(0, 9)}"])
    if service == "Coordinator":
        return {
            "Generate": lambda: pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                   sampling=_odd_sampling(rng), request_id=rid,
                                                   skip_text=True),
            "Abort": lambda: pb.AbortRequest(request_id=rid),
            "Stats": lambda: pb.StatsRequest(live=rng.random() < 0.5),
            "ListWorkers": lambda: pb.ListWorkersRequest(),
            # A worker nobody can reach (loopback, port 1): routing must survive it.
            "Register": lambda: pb.RegisterRequest(info=pb.WorkerInfo(
                role=rng.choice([0, 1, 2, 3, 17]), address=rng.choice(["", "127.0.0.1:1"]),
                worker_id=rid, max_model_len=rng.choice([0, 1, 2**31]),
                vocab_size=rng.choice([0, 1]))),
            "Heartbeat": lambda: pb.HeartbeatRequest(worker_id=rid, load=pb.WorkerLoad(
                free_blocks=2**31, total_blocks=1)),
        }[method]()
    return {  # Worker: never a kv_address, so nothing is dialled
        "Reserve": lambda: pb.ReserveRequest(request_id=rid, prompt_token_ids=ids,
                                             sampling=_odd_sampling(rng),
                                             num_output_tokens=rng.choice([0, 1, 2**31])),
        "Prefill": lambda: pb.PrefillRequest(request_id=rid, prompt_token_ids=ids,
                                             sampling=_odd_sampling(rng), dst_block_ids=[2**31]),
        "SetKvTarget": lambda: pb.KvTarget(request_id=rid, dst_block_ids=[2**31]),
        "DecodeStream": lambda: pb.DecodeRequest(request_id=rid),
        "Generate": lambda: pb.GenerateWorkerRequest(request_id=rid, prompt_token_ids=ids,
                                                     sampling=_odd_sampling(rng)),
        "Abort": lambda: pb.AbortRequest(request_id=rid),
        "Stats": lambda: pb.WorkerStatsRequest(),
    }[method]()


_METHODS = {
    "Coordinator": {"Generate": True, "Abort": False, "ListWorkers": False, "Stats": False,
                    "Register": False, "Heartbeat": False},
    "Worker": {"Reserve": False, "Prefill": True, "SetKvTarget": False, "DecodeStream": True,
               "Generate": True, "Abort": False, "Stats": False},
}


BAD_STATUSES = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS"})


def fuzz(targets: list[tuple[str, str]], calls: int, seed: int = 0,
         credential: str | None = None) -> Counter:
    """`calls` fuzz calls spread over `targets` ((service, host:port) pairs, loopback only),
    sending `authorization: Bearer <credential>` when given; returns the status names they
    ended with."""
    rng = random.Random(seed)
    seen: Counter = Counter()
    for host_port in {a for _, a in targets}:
        if not host_port.startswith(("127.", "localhost:", "[::1]:")):
            raise ValueError(f"fuzzing is for loopback addresses only, got {host_port}")
    channels = {a: grpc.insecure_channel(a) for _, a in targets}
    metadata = (("authorization", f"Bearer {credential}"),) if credential else None
    try:
        for n in range(calls):
            service, address = targets[n % len(targets)]
            method, streaming = rng.choice(sorted(_METHODS[service].items()))
            path = f"/pdserve.v1.{service}/{method}"
            if rng.random() < 0.4:
                body = rng.randbytes(rng.choice([0, 1, 7, 64, 4096]))
            else:
                body = _odd_messages(rng, service, method).SerializeToString()
            ch = channels[address]
            make = ch.unary_stream if streaming else ch.unary_unary
            call = make(path, request_serializer=None, response_deserializer=None)
            try:
                result = call(body, timeout=2.0, metadata=metadata)
                if streaming:
                    for _ in result:
                        pass
                seen["OK"] += 1
            except grpc.RpcError as e:
                seen[e.code().name] += 1
    finally:
        for ch in channels.values():
            ch.close()
    return seen

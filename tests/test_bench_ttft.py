"""`bench ttft`'s breakdown: what is left of the TTFT once its known parts are taken out."""

import math

import pytest

from pdserve.benchmarks.ttft import COLUMNS, breakdown, make_row, medians


def test_rest_is_ttft_minus_the_known_parts():
    m = {"ttft_ms": 40.0, "queue_ms": 1.0, "prefill_ms": 30.0, "transfer_ms": 4.0,
         "kv_bytes": 64 << 20}
    parts = breakdown(43.0, 6.5, m)
    assert parts["hops_ms"] == pytest.approx(3.0)  # client 43 - coordinator 40
    assert parts["rest_ms"] == pytest.approx(43.0 - 3.0 - 1.0 - 30.0 - 4.0)
    assert parts["decode1_ms"] == 6.5 and parts["tail_ms"] == 4.0


def test_reserve_wait_is_a_part_of_rest():
    # Reserve runs beside the prefill; token 0 waited 2 ms for it at the coordinator
    m = {"ttft_ms": 40.0, "prefill_ms": 30.0, "transfer_ms": 1.0, "reserve_wait_ms": 2.0}
    parts = breakdown(41.0, None, m)
    assert parts["reserve_wait_ms"] == 2.0
    assert parts["rest_ms"] == pytest.approx(41.0 - 1.0 - 30.0 - 1.0)  # holds the 2 ms
    assert breakdown(41.0, None, {"ttft_ms": 40.0})["reserve_wait_ms"] == 0.0


def test_rest_goes_negative_when_token0_does_not_wait_for_the_tail():
    # token 0 sent as soon as it is sampled: the 4 ms tail is not in the TTFT
    parts = breakdown(35.0, 10.0, {"ttft_ms": 33.0, "prefill_ms": 30.0, "transfer_ms": 4.0})
    assert -4.0 <= parts["rest_ms"] < 0


def test_row_of_medians_has_every_column():
    recs = [breakdown(t, d1, {"ttft_ms": t - 1, "prefill_ms": t - 5, "transfer_ms": 1.0,
                              "kv_bytes": 1 << 20})
            for t, d1 in ((20.0, 6.0), (22.0, None), (30.0, 7.0))]
    med = medians(recs)
    assert med["ttft_ms"] == 22.0 and med["decode1_ms"] == 6.5  # decode1 of two requests
    assert med["rest_ms"] == pytest.approx(3.0)  # t - 1 hop - (t - 5) prefill - 1 tail
    row = make_row(2048, med, {"ttft_ms": 20.0, "hops_ms": 1.5, "prefill_ms": 17.0})
    assert list(row) == COLUMNS
    assert row["kv_mib"] == 1.0 and row["ttft_ratio"] == pytest.approx(1.1)
    assert row["base_prefill_ms"] == 17.0 and row["target_ms"] == pytest.approx(21.6)
    empty = make_row(2048, med, {})
    assert math.isnan(empty["ttft_ratio"]) and math.isnan(empty["base_hops_ms"])


def test_interleaved_requests_alternate_between_clusters(monkeypatch):
    """--interleave: one request to each cluster in turn, the pair's order flipping (ABBA),
    the first of each length a warm-up; medians kept per cluster."""
    from types import SimpleNamespace

    from pdserve.benchmarks import ttft
    from pdserve.coordinator import client as client_mod

    calls: list[tuple[str, int]] = []

    class FakeClient:
        def __init__(self, address, timeout_s):
            self.address = address

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def generate(self, *a, **kw):
            return None

        def stream(self, prompt, **kw):
            calls.append((self.address, len(prompt)))
            ms = 10.0 if self.address == "pd" else 8.0
            yield SimpleNamespace(token_ids=[1], finished=False, metrics=None)
            yield SimpleNamespace(token_ids=[2], finished=True,
                                  metrics={"ttft_ms": ms, "prefill_ms": ms - 1})

    monkeypatch.setattr(client_mod, "Client", FakeClient)
    out = ttft._measure({"disaggregated": "pd", "colocated": "co"}, [16, 32], iters=3,
                        max_tokens=2)
    assert [a for a, _ in calls[:8]] == ["pd", "co", "co", "pd", "pd", "co", "co", "pd"]
    assert [n for _, n in calls] == [16] * 8 + [32] * 8
    assert out["disaggregated"][16]["prefill_ms"] == 9.0
    assert out["colocated"][32]["prefill_ms"] == 7.0

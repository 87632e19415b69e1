"""The report's output-token throughput section: the peak 1-s window per setup, and the
sentence on whether it grew with the decode GPUs, computed from token arrivals."""

from pdserve.benchmarks.capstone_metrics import RequestResult
from pdserve.benchmarks.capstone_report import Run, SetupResult, WorkloadRuns
from pdserve.benchmarks.capstone_throughput import decode_gpus, peak_tokens, throughput_lines


def _setup(name: str, pools: dict, tokens_per_s: int, seconds: int = 3) -> SetupResult:
    """Requests whose chunks deliver `tokens_per_s` tokens in every second, one per chunk."""
    results = []
    for i in range(tokens_per_s // 10):  # 10 tokens a second per request
        r = RequestResult(t_send=i * 0.001, prompt_tokens=16)
        r.chunks = [(s + k / 10 + 0.01, 1) for s in range(seconds) for k in range(10)]
        results.append(r)
    w = WorkloadRuns("decode-heavy", "", runs=[Run(40.0, 0, results, {})])
    return SetupResult(name, "", pools=pools, by_workload={"decode-heavy": w})


def test_peak_counts_tokens_per_window_and_decode_gpus():
    s = _setup("1P3D", {"prefill": [0], "decode": [1, 2, 3]}, 500)
    p = peak_tokens(s)
    assert p is not None and p.tokens_per_s == 500 and p.decode_gpus == 3
    assert "decode-heavy at 40 req/s" in p.where
    assert decode_gpus(_setup("4both", {"both": [0, 1, 2, 3]}, 10)) == 4


def test_says_the_peak_did_not_grow_with_the_gpus():
    lines = throughput_lines([_setup("3P1D", {"prefill": [0, 1, 2], "decode": [3]}, 1000),
                              _setup("4both", {"both": [0, 1, 2, 3]}, 1200)])
    assert "4x the decode GPUs (4both against 3P1D) the peak is 1.2x" in lines[1]
    assert "grew less than the GPUs" in lines[1]


def test_says_the_peak_grew_with_the_gpus():
    lines = throughput_lines([_setup("1P1D", {"prefill": [0], "decode": [1]}, 1000),
                              _setup("2both", {"both": [0, 1]}, 1900)])
    assert lines[1].endswith("it grew with the GPUs.")


def test_without_records_it_says_so():
    s = SetupResult("1P1D", "", pools={"prefill": [0], "decode": [1]},
                    by_workload={"w": WorkloadRuns("w", "", runs=[Run(4.0, 0, [], {})])})
    assert "not known" in throughput_lines([s])[0]


def test_the_wait_outside_the_coordinator_is_told_from_ttft_ms():
    s = _setup("2both", {"both": [0, 1]}, 100)
    for q in s.by_workload["decode-heavy"].runs[0].results:
        q.server = {"ttft_ms": (q.chunks[0][0] - q.t_send) * 1e3 - 900.0}  # 900 ms outside
    lines = throughput_lines([s])
    assert any("by a median 900 ms" in ln and "outside the coordinator's handler" in ln
               for ln in lines)
    for q in s.by_workload["decode-heavy"].runs[0].results:
        q.server = {"ttft_ms": (q.chunks[0][0] - q.t_send) * 1e3 - 2.0}
    assert any(ln.endswith("no wait outside it") for ln in throughput_lines([s]))


def test_accept_ms_tells_a_wait_in_front_of_the_handler_from_one_after_it():
    s = _setup("1P3D", {"prefill": [0], "decode": [1, 2, 3]}, 100)
    results = s.by_workload["decode-heavy"].runs[0].results
    for q in results:
        q.server = {"ttft_ms": (q.chunks[0][0] - q.t_send) * 1e3 - 900.0, "accept_ms": 850.0}
    (line,) = [ln for ln in throughput_lines([s]) if "by a median 900 ms" in ln]
    assert "in front of the coordinator's handler (a median 850 ms" in line
    for q in results:
        q.server["accept_ms"] = 3.0
    (line,) = [ln for ln in throughput_lines([s]) if "by a median 900 ms" in ln]
    assert "after the coordinator's send of token 0 (only 3 ms" in line


def test_accept_ms_from_the_coordinators_wall_clock():
    import time

    from pdserve.benchmarks.capstone_client import with_accept_ms

    t_send = time.perf_counter()
    out = with_accept_ms({"ttft_ms": 4.0, "received_unix_s": time.time() + 0.25}, t_send)
    assert "received_unix_s" not in out and 240 < out["accept_ms"] < 300
    assert with_accept_ms({"ttft_ms": 4.0}, t_send) == {"ttft_ms": 4.0}  # an older server


def test_the_peak_run_says_how_busy_the_host_processes_were():
    s = _setup("1P3D", {"prefill": [0], "decode": [1, 2, 3]}, 100)
    run = s.by_workload["decode-heavy"].runs[0]
    for q in run.results:
        q.server = {"ttft_ms": 5.0}
    assert not any("CPU cores" in ln for ln in throughput_lines([s]))  # not recorded
    run.summary["cpu_cores"] = {"harness": 1.24, "coordinator": 1.62, "other": 4.49}
    (line,) = [ln for ln in throughput_lines([s]) if "CPU cores" in ln]
    assert line.endswith("the load generator 1.24, the coordinator 1.62, the rest of the "
                         "host (workers included) 4.49")

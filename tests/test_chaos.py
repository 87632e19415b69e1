"""`pdserve bench chaos`, short: a 1 prefill + 2 decode CPU cluster (tiny model, UCX) under
load; a decode worker is SIGKILLed, then SIGSTOPped past the timeouts, then every service is
fuzzed with the cluster secret. Every stream must end with its undisturbed tokens: 0 hung,
0 leaked blocks, 0 mismatched, 0 crashes, and no fuzz call ends UNKNOWN/INTERNAL."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_chaos_smoke(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "bench", "chaos", "--prefill", "1", "--decode", "2",
         "--requests", "6", "--max-tokens", "40", "--stop-s", "6", "--out", str(tmp_path),
         "--scenarios", "kill9-decode,sigstop-decode,fuzz-secret", "--fuzz-calls", "300"],
        capture_output=True, text=True, timeout=380)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "chaos.csv")))
    assert [row["scenario"] for row in rows] == ["kill9-decode", "sigstop-decode", "fuzz-secret"]
    for row in rows:
        assert row["hung"] == "0" and row["blocks_leaked"] == "0", row
        assert row["succeeded"] == row["sent"] == "6" and row["mismatched"] == "0", row
        assert row["crashes"] == "0" and row["recovery_s"] != "never", row
        assert row["fuzz_bad"] == "0", row
    assert "commit" in (tmp_path / "chaos.md").read_text()

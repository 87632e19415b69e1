"""The records file of a run directory read as .gz (as a run writes it) or .xz (as the
repository keeps it), and the conversion between them."""

from __future__ import annotations

import gzip
import json

from pdserve.benchmarks import capstone_records as rec
from pdserve.benchmarks.capstone_heartbeats import load_records


def test_gz_converts_to_xz_and_both_read_the_same(tmp_path, capsys) -> None:
    doc = {"runs": {"1P1D|w|2.0|0": [{"t_send": 0.0}]}, "heartbeats": {"k": {"workers": {}}}}
    assert rec.records_path(str(tmp_path)) is None and rec.read_records(str(tmp_path)) is None
    with gzip.open(tmp_path / "requests.json.gz", "wt") as f:
        json.dump(doc, f)
    assert rec.read_records(str(tmp_path)) == doc
    assert rec.main([str(tmp_path)]) == 0 and "MiB" in capsys.readouterr().out
    assert not (tmp_path / "requests.json.gz").exists()
    assert rec.records_path(str(tmp_path)).endswith("requests.json.xz")
    assert rec.read_records(str(tmp_path)) == doc
    assert load_records(str(tmp_path)) == doc["heartbeats"]  # a reader of the records
    assert rec.main([str(tmp_path)]) == 2  # nothing left to convert


def test_xz_is_read_first(tmp_path) -> None:
    import lzma

    with gzip.open(tmp_path / "requests.json.gz", "wt") as f:
        json.dump({"runs": {"old": []}}, f)
    with lzma.open(tmp_path / "requests.json.xz", "wt") as f:
        json.dump({"runs": {"new": []}}, f)
    assert rec.read_records(str(tmp_path)) == {"runs": {"new": []}}
    assert rec.main([]) == 2  # no directory given: the usage, status 2

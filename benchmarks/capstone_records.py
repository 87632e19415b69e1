"""The per-request records file of a capstone run directory: `requests.json.gz` as a run
writes it (gzip is fast enough to rewrite after every setup), or `requests.json.xz`, about
half the size, for run directories kept in the repository (the tree travels to the GPU
machines with the runtime wheels, 64 MiB in all). Readers take either:

    python -m pdserve.benchmarks.capstone_records DIR [DIR ...]   # .gz -> .xz, checked
"""

from __future__ import annotations

import functools
import gzip
import json
import lzma
import os
import sys
from typing import IO

NAMES = ("requests.json.xz", "requests.json.gz")  # the first one present is read


def records_path(run_dir: str) -> str | None:
    """The run directory's records file, or None when it has none."""
    return next((p for p in (os.path.join(run_dir, n) for n in NAMES) if os.path.exists(p)),
                None)


def open_records(path: str, mode: str = "rt") -> IO:
    return (lzma.open if path.endswith(".xz") else gzip.open)(path, mode)


def read_records(run_dir: str) -> dict | None:
    """The parsed records of a run directory; None without a records file. Parsed once per
    file version (a validation's fits and its heartbeat replay all read them): the dict is
    shared, read it only."""
    path = records_path(run_dir)
    if path is None:
        return None
    return _parsed(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, _mtime_ns: int) -> dict:
    with open_records(path) as f:
        return json.load(f)


def to_xz(run_dir: str) -> str:
    """Rewrite the directory's requests.json.gz as requests.json.xz (the same JSON, read
    back and compared before the .gz is removed); the path written."""
    src = os.path.join(run_dir, NAMES[1])
    dst = os.path.join(run_dir, NAMES[0])
    with gzip.open(src, "rt") as f:
        text = f.read()
    with lzma.open(dst + ".tmp", "wt", preset=6) as f:
        f.write(text)
    with lzma.open(dst + ".tmp", "rt") as f:
        if f.read() != text:
            raise RuntimeError(f"{dst}: read back differs")
    os.replace(dst + ".tmp", dst)
    os.remove(src)
    return dst


def main(argv: list[str] | None = None) -> int:
    dirs = sys.argv[1:] if argv is None else argv
    if not dirs:
        print(__doc__)
        return 2
    for d in dirs:
        if not os.path.exists(os.path.join(d, NAMES[1])):
            print(f"error: {d}: no {NAMES[1]}", file=sys.stderr)
            return 2
        before = os.path.getsize(os.path.join(d, NAMES[1]))
        path = to_xz(d)
        print(f"{path}: {before / 2**20:.1f} -> {os.path.getsize(path) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

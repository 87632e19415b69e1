"""Dependencies run one way (docs/architecture.md, "Layout"). Every import of a pdserve
module anywhere in a part's files counts: top-level, lazy and TYPE_CHECKING imports alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# part (folder) -> the parts its code may import, besides itself
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "kvtransfer": set(),
    "proto": set(),
    "engine": {"kernels"},
    "worker": {"engine", "kernels", "kvtransfer", "proto"},
    "prefill": {"worker", "engine", "kernels", "kvtransfer", "proto"},
    "decode": {"worker", "engine", "kernels", "kvtransfer", "proto"},
    "coordinator": {"proto", "engine"},  # engine: tokenizers and sampling validation only
}
PARTS = {"kernels", "kvtransfer", "proto", "engine", "worker", "prefill", "decode",
         "coordinator", "benchmarks", "pdserve"}


def imported_parts(path: Path, part: str) -> dict[str, int]:
    """pdserve parts imported by one file -> first line number."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the file's own part
                continue
            names = [node.module or ""]
        for name in names:
            bits = name.split(".")
            if bits[0] != "pdserve":
                continue
            # `pdserve.X` is part X when X is a folder; else a module of the top package
            target = bits[1] if len(bits) > 1 and bits[1] in PARTS else "pdserve"
            found.setdefault(target, node.lineno)
    return found


def violations(part: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / part).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for target, line in imported_parts(path, part).items():
            if target != part and target not in ALLOWED[part]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports pdserve.{target}")
    return bad


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_part_imports_only_below_itself(part: str) -> None:
    assert violations(part) == []


def test_checker_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from pdserve.worker.server import WorkerServer\n"
                 "def g():\n    import pdserve.coordinator.client\n    from . import x\n")
    assert imported_parts(f, "engine") == {"worker": 3, "coordinator": 5}


def test_no_file_over_400_lines() -> None:
    big = []
    for part in PARTS - {"pdserve"} | {"pdserve", "tests"}:
        for path in (ROOT / part).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > 400 and not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                big.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert big == []

"""docs/architecture.md lists every module with its docstring's first sentence."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_module_list_matches_the_code() -> None:
    spec = importlib.util.spec_from_file_location("doc_modules", ROOT / "docs" / "modules.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = (ROOT / "docs" / "architecture.md").read_text()
    listed = doc[doc.index("## Modules\n"):]
    missing = [line for line in mod.module_lines() if line not in listed]
    assert missing == [], "run `python docs/modules.py --write`"

"""Print the "Modules" list of docs/architecture.md: one line per module, from its docstring.

    python docs/modules.py            # print the list
    python docs/modules.py --write    # replace the list in docs/architecture.md
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["pdserve", "engine", "kernels", "kvtransfer", "proto", "worker", "prefill", "decode",
         "coordinator", "benchmarks"]
HEADER = "## Modules\n(one line each, from the module docstrings: `python docs/modules.py --write`)\n"


def module_lines() -> list[str]:
    lines = []
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                lines.append(f"- `{rel}`: generated protobuf / gRPC stubs (proto/generate.py)")
                continue
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first) > 160:
                first = first[:157] + "..."
            lines.append(f"- `{rel}`: {first}" if first else f"- `{rel}`")
    return lines


def main() -> int:
    text = HEADER + "\n".join(module_lines()) + "\n"
    if "--write" not in sys.argv:
        print(text, end="")
        return 0
    doc = ROOT / "docs" / "architecture.md"
    old = doc.read_text()
    doc.write_text(old[: old.index("## Modules\n")] + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the Python stubs of proto/pdserve.proto.

    python proto/generate.py            # writes proto/pdserve_pb2{,_grpc}.py{,i}

The .proto is compiled from a temporary include root as `pdserve/proto/pdserve.proto`, so the
generated `_pb2_grpc` module imports `from pdserve.proto import pdserve_pb2` (the installed
package path) and the descriptor's file name is unique in the global pool.
tests/test_proto.py calls `generate(tmp)` and compares with the committed stubs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "pdserve.proto"
STUBS = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile pdserve.proto; write the stubs into `out_dir`; return their paths."""
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        rel = Path("pdserve") / "proto" / "pdserve.proto"
        (root / rel.parent).mkdir(parents=True)
        shutil.copyfile(PROTO_FILE, root / rel)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{root}", f"-I{include}",
            f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}", str(root / rel),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        written = []
        for name in STUBS:
            dst = out_dir / name
            shutil.copyfile(gen / rel.parent / name, dst)
            written.append(dst)
    return written


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for path in generate(out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

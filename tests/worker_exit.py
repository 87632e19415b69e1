"""`pdserve worker` started with a setting it refuses: it must end with status 2 and one
error line naming the setting, never a traceback."""

from __future__ import annotations

import subprocess
import sys


def worker_refusal(*args: str) -> str:
    """stderr of `pdserve worker --model tiny --device cpu --port 0 ARGS`, checked to have
    ended with status 2 and no traceback."""
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "worker", "--model", "tiny",
                        "--device", "cpu", "--port", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return r.stderr

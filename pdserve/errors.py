"""Mistakes a user makes often, as one line instead of a traceback (used by `pdserve`).

`user_error(exc)` returns that line for: a resource that is not there (no CUDA device, a
model too large for the memory: engine ResourceError), an address in use, and a missing
optional dependency (with the pip command that installs it). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno

from pdserve.engine.errors import ResourceError

# importable module -> the pdserve extra that brings it
EXTRAS: dict[str, str] = {
    "ucxx": "ucx", "uvloop": "fast", "matplotlib": "bench", "transformers": "dev",
    "fastapi": "http", "uvicorn": "http", "prometheus_client": "http", "gguf": "model",
    "jinja2": "model", "ray": "ray", "pynvml": "bench",
}


def missing_extra(exc: ImportError) -> str | None:
    root = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(root)
    if extra is None:
        return None
    return (f"this needs the optional package {root!r}, which is not installed; "
            f"install it with: pip install 'pdserve[{extra}]'")


def user_error(exc: BaseException) -> str | None:
    if isinstance(exc, ResourceError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return exc.strerror or str(exc)
    if isinstance(exc, ImportError):
        return missing_extra(exc)
    return None

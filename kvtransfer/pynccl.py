"""Our own ctypes binding to libnccl.so.2: just what point-to-point KV transfer needs.

The library is found through the `nvidia-nccl-*` pip package (nvidia/nccl/lib or
nvidia/cu*/lib under site-packages), a copy already loaded into this process (torch's), or
the system loader path. Calls return ncclResult_t codes; `check()` turns them into NcclError.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import site
import sys
from collections.abc import Iterable

NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
NCCL_UNIQUE_ID_BYTES = 128
NCCL_INT8 = 0  # ncclInt8/ncclChar: we move bytes
_CONFIG_MAGIC = 0xCAFEBEEF
_UNDEF_INT = -(2**31)  # NCCL_CONFIG_UNDEF_INT (INT_MIN)

_RESULT_NAMES = {0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError",
                 3: "ncclInternalError", 4: "ncclInvalidArgument", 5: "ncclInvalidUsage",
                 6: "ncclRemoteError", 7: "ncclInProgress", 8: "ncclTimeout"}


class NcclNotFoundError(ImportError):
    """No libnccl.so.2 could be found or loaded."""


class NcclError(RuntimeError):
    def __init__(self, result: int, what: str, detail: str = "") -> None:
        self.result = result
        name = _RESULT_NAMES.get(result, f"ncclResult {result}")
        super().__init__(f"{what} failed: {name}" + (f" ({detail})" if detail else ""))


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


class Config(ctypes.Structure):
    """The ncclConfig_t prefix of NCCL 2.17 (fields up to netName).

    NCCL copies `size` bytes over its own defaults and reads only the fields `version` knows,
    so newer libraries accept this older, shorter layout.
    """

    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int), ("cgaClusterSize", ctypes.c_int),
                ("minCTAs", ctypes.c_int), ("maxCTAs", ctypes.c_int),
                ("netName", ctypes.c_char_p)]


def _candidate_dirs() -> list[str]:
    dirs: list[str] = []
    try:
        dirs.extend(site.getsitepackages())
    except AttributeError:  # some virtualenv flavours
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    dirs.extend(p for p in sys.path if p and os.path.isdir(p))
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def _loaded_copies() -> list[str]:
    """libnccl files already mapped into this process (e.g. by a CUDA build of torch)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libnccl.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))


def nccl_library_candidates(extra_dirs: Iterable[str] = ()) -> list[str]:
    """Files that may be libnccl, best first."""
    found = _loaded_copies()
    patterns = ("nvidia/nccl/lib/libnccl.so*", "nvidia/cu*/lib/libnccl.so*", "torch/lib/libnccl.so*")
    for d in [*extra_dirs, *_candidate_dirs()]:
        for pat in patterns:
            found.extend(sorted(glob.glob(os.path.join(d, pat))))
    return list(dict.fromkeys(found))


def find_nccl_library(extra_dirs: Iterable[str] = ()) -> str:
    """Path (or soname) of a loadable libnccl.so.2; NcclNotFoundError says where it looked."""
    tried: list[str] = []
    names = [*nccl_library_candidates(extra_dirs)]
    soname = ctypes.util.find_library("nccl")
    names += [n for n in (soname, "libnccl.so.2", "libnccl.so") if n]
    for name in dict.fromkeys(names):
        try:
            ctypes.CDLL(name)
            return name
        except OSError as e:
            tried.append(f"{name}: {e}")
    where = "; ".join(tried) if tried else "no candidate file"
    raise NcclNotFoundError(
        "libnccl.so.2 not found. Install the NCCL pip package matching your CUDA "
        "(`pip install nvidia-nccl-cu12` or `nvidia-nccl-cu13`) or the system NCCL "
        f"(libnccl2), or put it on LD_LIBRARY_PATH. Searched site-packages "
        f"(nvidia/nccl/lib, nvidia/cu*/lib, torch/lib), loaded libraries and the loader path; "
        f"tried: {where}")


class NcclLibrary:
    """Thin typed wrapper over the NCCL C API."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or find_nccl_library()
        lib = ctypes.CDLL(self.path)
        vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        sigs = {
            "ncclGetVersion": [ctypes.POINTER(i)],
            "ncclGetUniqueId": [ctypes.POINTER(UniqueId)],
            "ncclCommInitRank": [ctypes.POINTER(vp), i, UniqueId, i],
            "ncclCommInitRankConfig": [ctypes.POINTER(vp), i, UniqueId, i, ctypes.POINTER(Config)],
            "ncclCommGetAsyncError": [vp, ctypes.POINTER(i)],
            "ncclCommAbort": [vp],
            "ncclCommDestroy": [vp],
            "ncclCommFinalize": [vp],
            "ncclSend": [vp, sz, i, i, vp, vp],
            "ncclRecv": [vp, sz, i, i, vp, vp],
            "ncclGroupStart": [],
            "ncclGroupEnd": [],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self._last_error = getattr(lib, "ncclGetLastError", None)
        if self._last_error is not None:
            self._last_error.argtypes, self._last_error.restype = [vp], ctypes.c_char_p
        self.lib = lib
        v = ctypes.c_int()
        self.check(lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        self.version = v.value  # e.g. 22703 for 2.27.3

    # ---- errors --------------------------------------------------------------------
    def error_string(self, result: int) -> str:
        return self.lib.ncclGetErrorString(result).decode(errors="replace")

    def last_error(self, comm: int | None = None) -> str:
        if self._last_error is None:
            return ""
        return (self._last_error(comm) or b"").decode(errors="replace")

    def check(self, result: int, what: str, comm: int | None = None,
              allow_in_progress: bool = False) -> int:
        if result == NCCL_SUCCESS or (allow_in_progress and result == NCCL_IN_PROGRESS):
            return result
        detail = self.error_string(result)
        last = self.last_error(comm)
        raise NcclError(result, what, f"{detail}; {last}" if last else detail)

    # ---- communicators ---------------------------------------------------------------
    def get_unique_id(self) -> bytes:
        uid = UniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)

    def comm_init_rank(self, nranks: int, unique_id: bytes, rank: int,
                       blocking: bool = True) -> tuple[int, int]:
        """Create a communicator on the current CUDA device -> (comm handle, result).

        With blocking=False the result may be ncclInProgress: poll comm_get_async_error()
        until it is ncclSuccess before any other call on the communicator.
        """
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        uid = UniqueId()
        ctypes.memmove(ctypes.addressof(uid), unique_id, NCCL_UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        if blocking:
            res = self.lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid, rank)
            self.check(res, "ncclCommInitRank")
        else:
            cfg = Config(ctypes.sizeof(Config), _CONFIG_MAGIC, 21700, 0,
                         _UNDEF_INT, _UNDEF_INT, _UNDEF_INT, None)
            res = self.lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, uid, rank,
                                                  ctypes.byref(cfg))
            self.check(res, "ncclCommInitRankConfig", comm.value, allow_in_progress=True)
        return int(comm.value or 0), res

    def comm_get_async_error(self, comm: int) -> int:
        r = ctypes.c_int()
        self.check(self.lib.ncclCommGetAsyncError(comm, ctypes.byref(r)), "ncclCommGetAsyncError")
        return r.value

    def comm_abort(self, comm: int) -> int:
        return self.lib.ncclCommAbort(comm)

    def comm_destroy(self, comm: int) -> int:
        return self.lib.ncclCommDestroy(comm)

    def comm_finalize(self, comm: int) -> int:
        return self.lib.ncclCommFinalize(comm)

    # ---- point to point ------------------------------------------------------------------
    def send(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> int:
        """Enqueue a send of nbytes at device pointer ptr on `stream`; returns the result."""
        return self.lib.ncclSend(ptr, nbytes, NCCL_INT8, peer, comm, stream)

    def recv(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> int:
        return self.lib.ncclRecv(ptr, nbytes, NCCL_INT8, peer, comm, stream)

    def group_start(self) -> int:
        return self.lib.ncclGroupStart()

    def group_end(self) -> int:
        return self.lib.ncclGroupEnd()


_DEFAULT: NcclLibrary | None = None


def default_library() -> NcclLibrary:
    """The process-wide NcclLibrary (loaded on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = NcclLibrary()
    return _DEFAULT

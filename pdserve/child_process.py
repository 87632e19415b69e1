"""Child processes of a local cluster: a Popen with its log file, the pre-exec hook that
ties a child's life to its parent's (Linux PR_SET_PDEATHSIG), and process-group signals."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class Proc:
    """One child process and its log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, popen: subprocess.Popen) -> None:
        self.name, self.argv, self.log_path, self.popen = name, argv, log_path, popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def tail(self, lines: int = 30, max_bytes: int = 64 << 10) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def describe_exit(self, lines: int = 30) -> str:
        rc = self.poll()
        how = (f"was killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0
               else f"exited with code {rc}")
        tail = self.tail(lines)
        body = "\n".join("  | " + ln for ln in tail.splitlines()) if tail else "  | (empty log)"
        return f"{self.name} (pid {self.pid}) {how}; last lines of {self.log_path}:\n{body}"


def libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def child_preexec(parent_pid: int, libc: ctypes.CDLL | None) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec: syscalls only
        signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the parent may block INT/TERM
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
    return preexec


def signal_group(proc: Proc, sig: int) -> None:
    """Signal the child's process group (it is its leader: start_new_session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            try:
                proc.popen.send_signal(sig)
            except ProcessLookupError:
                pass

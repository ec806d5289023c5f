"""One writer per dataset: an OS lock on ``OUT/.livestain.lock`` for the daemon's lifetime.

Without it, ``--resume`` on a run that is still going started a second daemon on the
same folder: both acquired the same time points and overwrote each other's files. The
lock is an ``flock`` held by the process, so the kernel releases it however the
process ends (kill -9 and power loss included): a crashed run never needs cleaning up
before ``--resume``. The file records who holds it, for the error message.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer is then the user's responsibility
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".livestain.lock"


class DatasetBusy(OSError):
    """Another live process is writing this dataset (an OSError: the CLI prints it as one line)."""


class DatasetLock:
    """Exclusive, process-held lock of a dataset folder; `release` (or exit) frees it."""

    def __init__(self, out_dir: Path, holder: dict[str, object] | None = None) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")} | (holder or {})

    def acquire(self) -> DatasetLock:
        """Take the lock or raise `DatasetBusy` saying who holds it and what to do."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                other = _read_holder(fd)
                os.close(fd)
                who = (f"process {other.get('pid')} on {other.get('host')}, since {other.get('since')}"
                       + (f", control port {other['port']}" if other.get("port") else "")) if other else "another process"
                port = f" --port {other['port']}" if other.get("port") else ""
                raise DatasetBusy(
                    f"{self.path.parent} is being written by a running livestain daemon ({who}). "
                    f"One daemon per dataset: stop it first (`livestain stop{port}`), or watch it "
                    f"with `livestain status{port}`; --resume is for a run that has ended or crashed."
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

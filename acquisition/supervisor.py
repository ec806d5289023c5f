"""Keeping the local inference worker alive for a run that lasts days.

The worker is a separate process so that a crash in torch, a CUDA fault or an
out-of-memory kill cannot take acquisition down. The daemon checks it every turn of
its loop; a dead worker is restarted with exponential back-off (1 s, 2 s, 4 s ... 60 s,
reset after a minute of good health), and the daemon re-queues the stacks it had in
flight from disk, so nothing is lost.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def spawn_cli(args: list[str]) -> subprocess.Popen:
    """Start ``livestain ARGS`` as a child process with this interpreter."""
    return subprocess.Popen([sys.executable, "-m", "livestain.cli", *args])


class WorkerSupervisor:
    """Starts ``livestain worker ARGS`` and restarts it when it exits unexpectedly.

    Parameters
    ----------
    args : list[str]
        Arguments after ``livestain``.
    on_restart : callable
        Called after each restart with the dead worker's name (``host:pid``), so the
        daemon re-queues what that worker held.
    report : callable
        One human-readable line per crash/restart.
    """

    MAX_BACKOFF_S = 60.0
    HEALTHY_AFTER_S = 60.0

    def __init__(
        self,
        args: list[str],
        on_restart: Callable[[str], None] = lambda name: None,
        report: Callable[[str], None] = print,
    ) -> None:
        self.args = args
        self.on_restart = on_restart
        self.report = report
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._backoff = 1.0
        self._started_at = 0.0
        self._restart_at: float | None = None
        self._stopping = False

    def start(self) -> None:
        args = [*self.args, "--parent-pid", str(os.getpid())]
        self.proc = spawn_cli(args)
        self._started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Restart a dead worker once its back-off has elapsed; cheap when all is well."""
        if self._stopping or self.proc is None:
            return
        now = time.monotonic()
        if self.proc.poll() is None:
            if now - self._started_at > self.HEALTHY_AFTER_S:
                self._backoff = 1.0
            return
        if self._restart_at is None:
            self._restart_at = now + self._backoff
            self.report(
                f"worker (pid {self.proc.pid}) exited with code {self.proc.returncode}; "
                f"restarting in {self._backoff:.0f} s (acquisition continues)"
            )
            self._backoff = min(self._backoff * 2, self.MAX_BACKOFF_S)
            return
        if now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            dead = self.name
            self.start()
            log.info("worker restarted (pid %s, restart #%d)", self.pid, self.restarts)
            self.on_restart(dead)

    @property
    def name(self) -> str:
        """The name the worker gives itself on the wire (``host:pid``)."""
        return f"{socket.gethostname()}:{self.pid}"

    def kill_hung(self, holders: list[str]) -> None:
        """Stacks held by these workers got no prediction: kill ours if it is one of them
        (`check` then restarts it); workers on other hosts are theirs to look after."""
        if self.alive and self.proc is not None and self.name in holders:
            self.report(f"worker (pid {self.proc.pid}) is not answering: killing it")
            self.proc.kill()

    def status(self) -> dict[str, object]:
        """Worker health for the daemon's status reply."""
        return {"worker_pid": self.pid, "worker_alive": self.alive, "worker_restarts": self.restarts}

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait, then kill: a stuck worker never keeps the run from ending."""
        self._stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

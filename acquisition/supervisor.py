"""Keeping the local inference worker alive for a run that lasts days.

The worker is a separate process so that a crash in torch, a CUDA fault or an
out-of-memory kill cannot take acquisition down. The daemon checks it every turn of
its loop; a dead worker is restarted with exponential back-off (1 s, 2 s, 4 s ... 60 s,
reset after a minute of good health), and the daemon re-queues the stacks it had in
flight from disk, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


#: Runs the CLI with the current folder taken off ``sys.path``. ``python -m`` (and
#: ``-c``) put the current folder first on the path, so a folder named ``livestain`` in
#: it (a clone's parent folder, say) would shadow the installed package and the child
#: would crash-loop on an ImportError. ``-P`` does the same but only from Python 3.11.
_CLI_BOOTSTRAP = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "from livestain.cli import main; sys.exit(main())"
)


def cli_command(args: list[str]) -> list[str]:
    """The argv that runs ``livestain ARGS`` with this interpreter, whatever the current folder."""
    return [sys.executable, "-c", _CLI_BOOTSTRAP, *args]


def spawn_cli(args: list[str], **popen_kwargs: object) -> subprocess.Popen:
    """Start ``livestain ARGS`` as a child process with this interpreter."""
    return subprocess.Popen(cli_command(args), **popen_kwargs)  # type: ignore[call-overload]


def check_worker_model(model: str | None, device: str | None, timeout_s: float = 300.0) -> dict:
    """Load the worker's model as the worker will, in a child process, before the run starts.

    An unusable model (missing, truncated, from another tool) or device (``cuda``
    without a GPU) used to be noticed only by the worker, which then crash-looped
    through the whole run with nothing predicted. A child process keeps torch out of
    the daemon. Returns the model's description (name, structures, voxel size); raises
    ValueError with the worker's own one-line explanation.
    """
    args = ["worker", "--check-model"]
    if model:
        args += ["--model", str(model)]
    if device:
        args += ["--device", device]
    try:
        proc = subprocess.run(cli_command(args), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ValueError(f"loading the model {model or '(bundled)'} took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1].removeprefix("livestain worker: ") if lines else f"exit code {proc.returncode}"
        raise ValueError(f"the worker cannot use this model: {why}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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

    def use_model(self, model: str | None) -> None:
        """Restart the worker on ``model`` (None: the bundled one): adaptation's swap.

        The old worker is stopped (SIGTERM, then kill after 10 s) and a new one started at
        once, no back-off; ``on_restart`` re-queues what the old one held, so no stack is
        dropped across the swap, and every prediction names the model that made it.
        """
        args = list(self.args)
        if "--model" in args:
            i = args.index("--model")
            del args[i : i + 2]
        if model:
            args += ["--model", str(model)]
        self.args = args
        dead = self.name
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.start()
        self.report(f"worker restarted on model {model or 'bundled'} (pid {self.pid})")
        self.on_restart(dead)

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


class WorkerPool:
    """``count`` local workers, each a `WorkerSupervisor`, behind the one supervisor's
    interface the daemon and `livestain.launch` use.

    The workers share the stacks through the daemon's queue (each asks for the next
    when it is free), so the pool needs no scheduling of its own: it starts, restarts,
    moves to a new model and stops them together, and reports their health as one.
    """

    def __init__(self, args: list[str], count: int = 1,
                 on_restart: Callable[[str], None] = lambda name: None,
                 report: Callable[[str], None] = print) -> None:
        if count < 1:
            raise ValueError(f"worker count {count}: a run needs at least one local worker (worker.count >= 1)")
        self.workers = [WorkerSupervisor(args, on_restart, report) for _ in range(count)]

    @property
    def on_restart(self) -> Callable[[str], None]:
        return self.workers[0].on_restart

    @on_restart.setter
    def on_restart(self, callback: Callable[[str], None]) -> None:
        for worker in self.workers:
            worker.on_restart = callback

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def check(self) -> None:
        for worker in self.workers:
            worker.check()

    def kill_hung(self, holders: list[str]) -> None:
        for worker in self.workers:
            worker.kill_hung(holders)

    def use_model(self, model: str | None) -> None:
        """Every worker onto ``model``, one after the other (the others keep predicting)."""
        for worker in self.workers:
            worker.use_model(model)

    def status(self) -> dict[str, object]:
        first = self.workers[0]
        return {"worker_pid": first.pid, "worker_alive": all(w.alive for w in self.workers),
                "worker_restarts": sum(w.restarts for w in self.workers),
                "worker_pids": [w.pid for w in self.workers if w.pid is not None]}

    def stop(self, timeout_s: float = 10.0) -> None:
        for worker in self.workers:
            worker.stop(timeout_s)

"""Starting a whole run: the daemon here, a worker process beside it, a viewer if wanted.

`run_session` is what ``livestain demo`` and ``livestain run`` share. The worker and the
viewer are separate processes, so a crash or a closed window in either never takes the
acquisition down with it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import useq

from livestain import wire

log = logging.getLogger(__name__)


@dataclass
class SessionOptions:
    """How to run one acquisition session.

    Attributes
    ----------
    out_dir : Path
        Dataset folder (must not already hold a run).
    host, base_port : str, int
        Where the daemon listens (see `livestain.wire.endpoints`).
    model : str | None
        Checkpoint for the spawned worker (None: the bundled model).
    spawn_worker : bool
        Start a local worker process (turn off when workers run elsewhere).
    show_window : bool
        Start a viewer process (only when a display exists).
    device : str | None
        Torch device for the worker (None: CUDA if present, else CPU).
    """

    out_dir: Path
    host: str = wire.DEFAULT_HOST
    base_port: int = wire.DEFAULT_BASE_PORT
    model: str | None = None
    spawn_worker: bool = True
    show_window: bool = False
    device: str | None = None
    drain_timeout_s: float = 120.0


def has_display() -> bool:
    """True where a window can open (always on Windows/macOS; X11/Wayland on Linux)."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def demo_sequence(timepoints: int = 3, interval_s: float = 0.0, positions: int = 1) -> useq.MDASequence:
    """The demo plan: brightfield z-stacks (16 planes, 1 um) over time and positions."""
    from livestain.devices.sample import SampleGeometry

    fy, fx = SampleGeometry().field_um
    stage = [{"x": i * fx, "y": 0.0, "z": 4.0, "name": f"Pos{i}"} for i in range(positions)]
    return useq.MDASequence(
        axis_order="tpcz",
        stage_positions=stage,
        time_plan={"interval": interval_s, "loops": timepoints},
        channels=[{"config": "Brightfield", "exposure": 10.0}],
        z_plan={"range": 15.0, "step": 1.0},
    )


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "livestain.cli", *args])


def run_session(core, sequence: useq.MDASequence, opts: SessionOptions, report=print):  # noqa: ANN001
    """Run ``sequence`` on ``core`` with a worker (and viewer); returns the RunSummary."""
    from livestain.acquisition.daemon import Daemon

    eps = wire.endpoints(opts.host, opts.base_port)
    daemon = Daemon(core, sequence, opts.out_dir, eps, report=report, drain_timeout_s=opts.drain_timeout_s)
    children: list[subprocess.Popen] = []
    conn = ["--connect", opts.host, "--port", str(opts.base_port)]
    if opts.spawn_worker:
        args = ["worker", *conn]
        if opts.model:
            args += ["--model", str(opts.model)]
        if opts.device:
            args += ["--device", opts.device]
        children.append(_spawn(args))
    if opts.show_window:
        children.append(_spawn(["view", *conn]))

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop(signum: int, _frame: object) -> None:
        report(f"received {signal.Signals(signum).name}: stopping after the current frame")
        daemon.request_stop()

    for s in previous:
        signal.signal(s, _stop)
    try:
        summary = daemon.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop_children(children[:1] if opts.spawn_worker else [])
    return summary


def _stop_children(children: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM, then wait, then kill: a stuck worker never keeps the run from ending."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

"""Pieces several test files share: the CLI as a subprocess or in process, waiting on a
daemon's status, a stand-in model for tests about who holds which stack (not about
pixels), and a field of noise for training-command plumbing tests."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

#: ``livestain`` run with this interpreter (the current folder is the repository root).
CLI = [sys.executable, "-m", "livestain.cli"]


def daemon_status(port: int) -> dict | None:
    """``livestain status --json`` of the daemon on ``port``, or None if none answers."""
    proc = subprocess.run([*CLI, "status", "--json", "--port", str(port)],
                          capture_output=True, text=True, timeout=30)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_for_status(port: int, predicate: Callable[[dict], bool], timeout_s: float = 120,
                    proc: subprocess.Popen | None = None) -> dict:
    """Poll the daemon's status until ``predicate`` holds; fail with the last status, or
    at once with its output when ``proc`` (the daemon's process) has exited."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the daemon exited ({proc.returncode}) before the expected state; "
                                 f"last status {status}\nstdout: {(out or '')[-2000:]}\nstderr: {(err or '')[-3000:]}")
        status = daemon_status(port)
        if status is not None and predicate(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"daemon never reached the expected state; last status {status}")


class QuickPredictor:
    """Stands in for a model: zeros for one structure, at once."""

    structures = ("dna",)
    device = "cpu"
    model = type("M", (), {"name": "quick@test"})()

    def predict(self, stack: np.ndarray, voxel_size_um=None, out: np.ndarray | None = None) -> np.ndarray:  # noqa: ANN001
        pred = np.zeros((1, *stack.shape), np.float32)
        if out is not None:
            out[...] = pred
            return out
        return pred


def run_with_worker(daemon, eps: dict[str, str], predictor, **worker_kw) -> tuple:  # noqa: ANN001
    """Run ``daemon`` to its end with a real `Worker` on ``predictor`` in a thread beside
    it; returns (summary, the daemon's last status)."""
    import threading

    from livestain.inference.worker import Worker

    worker = Worker(eps["stacks"], eps["results"], predictor, **worker_kw)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        summary = daemon.run()
        return summary, daemon.status()
    finally:
        worker.stop()
        thread.join(30)
        worker.close()


def run_stacks(out, channel: str = "Brightfield") -> list:
    """(array, header) of every ``channel`` stack a run recorded, in time then position
    order, whichever storage it was written in (`livestain.run_reader`)."""
    from livestain.run_reader import RunReader

    with RunReader(out) as run:
        entries = sorted(run.stacks(channel), key=lambda e: (e.t, e.p))
        return [run.raw(e.t, e.p, channel) for e in entries]


def run_predictions(out, channel: str = "Brightfield") -> list:
    """(array, header) of every live prediction a run recorded, in time then position order."""
    from livestain.run_reader import RunReader

    with RunReader(out) as run:
        entries = sorted((e for e in run.stacks(channel) if e.prediction_ref), key=lambda e: (e.t, e.p))
        return [run.prediction(e.t, e.p, channel) for e in entries]


def stack_file(out, t: int, p: int = 0, channel: str = "Brightfield"):
    """The one file holding a raw stack: its OME-TIFF, or its chunk of the Zarr image."""
    from livestain.run_reader import RunReader
    from livestain.store import ref_file

    with RunReader(out) as run:
        return ref_file(run.entry(t, p, channel).raw_ref)


_REAL_STATUS: dict = {}


def real_status() -> dict:
    """A real daemon's status (a 10-time-point run on the simulated scope, not started),
    made once: what stand-in daemons answer with, so viewers are tested against the
    fields and types a daemon sends (`livestain.run_status.RunStatus`), not a hand-made dict."""
    if not _REAL_STATUS:
        import random
        import tempfile
        from pathlib import Path

        from conftest import _port_free

        from livestain import wire
        from livestain.acquisition.daemon import Daemon
        from livestain.acquisition.policies import Policies
        from livestain.devices.simulated import SimulatedScope, build_simulated_core
        from livestain.launch import demo_sequence

        base = next(b for b in (random.randrange(20000, 60000, 4) for _ in range(500))
                    if all(_port_free(b + i) for i in range(4)))
        with tempfile.TemporaryDirectory() as folder:
            daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(10, 0.0), Path(folder) / "run",
                            wire.endpoints(base_port=base), Policies(), report=lambda line: None)
            try:
                _REAL_STATUS.update(daemon.status())
            finally:
                daemon.sockets.close()
                daemon.journal.close()
                daemon.folder.release_lock()
    return dict(_REAL_STATUS)


def run_cli_in_process(argv: list[str]) -> str:
    """``livestain ARGV`` in this process; its stdout. Fails the test on a non-zero exit."""
    from livestain.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        a = build_parser().parse_args(argv)
        assert a.func(a) == 0
    return buf.getvalue()


class NoiseField:
    """A paired field of noise for `write_pairs`: brightfield (z, 40, 40) ~ N(100, 10) and
    |N(0, 1)| DNA truth, one plane (1, 40, 40) or a stack (1, z, 40, 40). For tests of what
    the training command does with its options, not of what it learns."""

    structures = ("dna",)

    def __init__(self, seed: int, planes: int = 6, voxel_size_um: tuple[float, float, float] = (1.0, 0.5, 0.5),
                 planar: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.voxel_size_um = voxel_size_um
        self.brightfield = rng.normal(100, 10, (planes, 40, 40)).astype(np.float32)
        shape = (1, 40, 40) if planar else (1, planes, 40, 40)
        self.targets = np.abs(rng.normal(0, 1, shape)).astype(np.float32)

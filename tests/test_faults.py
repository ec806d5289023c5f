"""Fault tests: what happens to the data when things go wrong during a long run.

Each test asserts on the files on disk: nothing written may be lost, corrupt or
misplaced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from livestain import wire
from livestain.acquisition.daemon import Daemon, DaemonHooks
from livestain.acquisition.policies import Policies
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.launch import demo_sequence
from livestain.run_reader import RunReader
from livestain.store import ref_file

pytestmark = pytest.mark.slow

from _helpers import CLI
from _helpers import wait_for_status as _wait_for


def _raws(out: Path) -> list[tuple[np.ndarray, dict]]:
    """Every brightfield stack the run recorded (whatever its storage), in time order."""
    with RunReader(out) as run:
        return [run.raw(e.t) for e in sorted(run.stacks("Brightfield"), key=lambda e: e.t)]


def _assert_dataset_complete(out: Path, n_t: int) -> None:
    """Every time point has a readable raw stack and a prediction, nothing half-written."""
    assert not list(out.rglob("*.partial"))
    run = RunReader(out)
    for t in range(n_t):
        raw, info = run.raw(t)
        pred, pinfo = run.prediction(t)
        assert raw.shape == (16, 256, 256) and info["t"] == t and info["gaps"] == []
        assert "Brightfield" in str(info["dose_ledger"])  # the light it got, read before the stack closed
        assert pred.shape == (3, 16, 256, 256) and pinfo["t"] == t
        assert pinfo["source_seq"] == info["seq"]


def _demo(out: Path, port: int, n_t: int, interval: float, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "demo", "--headless", "--timepoints", str(n_t), "--interval", str(interval),
         "--out", str(out), "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_kill_9_worker_mid_run_the_run_completes_and_everything_is_predicted(tmp_path, base_port) -> None:
    out = tmp_path / "run"
    # 10 time points: a loaded machine's worker can take 5 s to load, and the kill must
    # land while stacks are still coming (with 6 the run once ended first)
    demo = _demo(out, base_port, 10, 1.0)
    try:
        status = _wait_for(base_port, lambda s: s["stacks_predicted"] >= 1 and s.get("worker_alive"), proc=demo)
        os.kill(status["worker_pid"], signal.SIGKILL)
        later = _wait_for(base_port, lambda s: s["worker_restarts"] >= 1, proc=demo)
        assert later["worker_pid"] != status["worker_pid"]
        stdout, stderr = demo.communicate(timeout=240)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "exited with code -9; restarting" in stdout
    assert "10 stacks acquired, 10 predicted" in stdout
    _assert_dataset_complete(out, 10)


def test_kill_9_daemon_then_resume_completes_the_same_dataset(tmp_path, base_port) -> None:
    out = tmp_path / "run"
    demo = _demo(out, base_port, 5, 1.0)
    try:
        first = _wait_for(base_port, lambda s: s["stacks_acquired"] >= 2, proc=demo)
        demo.send_signal(signal.SIGKILL)
        demo.wait(30)
    finally:
        if demo.poll() is None:
            demo.kill()
    # the orphaned worker notices its daemon is gone and exits by itself
    if first.get("worker_pid"):
        for _ in range(100):
            try:
                os.kill(first["worker_pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(first["worker_pid"], signal.SIGKILL)
            pytest.fail("worker outlived its killed daemon")
    resumed = subprocess.run(
        [*CLI, "demo", "--headless", "--timepoints", "5", "--interval", "1", "--out", str(out),
         "--port", str(base_port), "--resume"],
        capture_output=True, text=True, timeout=240,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # "resuming run X at time point N", or, when the kill came after the last frame (a
    # loaded machine answers status late), "run X already has all 5 time points"
    assert f"run {first['run_id']}" in resumed.stdout and "resum" in resumed.stdout
    _assert_dataset_complete(out, 5)
    infos = [info for _, info in _raws(out)]
    assert {info["run_id"] for info in infos} == {first["run_id"]}
    seqs = [info["seq"] for info in infos]
    assert len(set(seqs)) == len(seqs)  # sequence numbers never reused across the crash


def test_sigterm_stops_cleanly_with_every_file_complete(tmp_path, base_port) -> None:
    out = tmp_path / "run"
    demo = _demo(out, base_port, 200, 0.5)
    try:
        _wait_for(base_port, lambda s: s["stacks_predicted"] >= 2, proc=demo)
        demo.send_signal(signal.SIGTERM)
        stdout, stderr = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stdout and "(stopped early)" in stdout
    raws = _raws(out)
    assert 2 <= len(raws) < 200
    for arr, info in raws:
        assert arr.shape[1:] == (256, 256) and arr.mean() > 100  # written, not a fill of zeros
    assert not list(out.rglob("*.partial"))


# -- in-process daemon tests (no worker needed) --------------------------------------


def _daemon(tmp_path: Path, port: int, scope: SimulatedScope, n_t: int, policies: dict | None = None,
            **kw) -> Daemon:
    core = build_simulated_core(scope)
    return Daemon(core, demo_sequence(n_t, 0.0), tmp_path / "run", wire.endpoints(base_port=port),
                  Policies(**({"drain_timeout_s": 0.5} | (policies or {}))),
                  report=lambda line: None, **kw)


@pytest.mark.parametrize("storage", ["zarr", "tiff"])
def test_disk_running_full_stops_the_run_cleanly_and_keeps_what_was_written(tmp_path, base_port, storage) -> None:
    calls = {"n": 0}

    def free_space(_path: Path) -> int:
        calls["n"] += 1
        return 50 * 10**9 if calls["n"] <= 2 else 10 * 10**6  # 10 MB left from the 3rd stack

    daemon = _daemon(tmp_path, base_port, SimulatedScope(), 6, {"min_free_gb": 1.0, "storage": storage},
                     hooks=DaemonHooks(free_space=free_space))
    summary = daemon.run()
    assert summary.error is not None and "10 MB free" in summary.error and "--resume" in summary.error
    assert summary.acquired == 2
    assert [info["t"] for _, info in _raws(tmp_path / "run")] == [0, 1]
    assert not list((tmp_path / "run").rglob("*.partial"))


def test_a_snap_that_fails_once_is_retried_and_leaves_no_gap(tmp_path, base_port) -> None:
    daemon = _daemon(tmp_path, base_port, SimulatedScope(failing_snaps={5}), 2)
    summary = daemon.run()
    assert summary.acquired == 2 and summary.incomplete == 0
    assert daemon.status()["snap_retries"] == 1 and daemon.status()["snap_failures"] == 0
    # through pymmcore-plus's extension point, an MDAEngine subclass; the core is untouched
    from pymmcore_plus.mda import MDAEngine

    assert isinstance(daemon.core.mda.engine, MDAEngine) and "snapImage" not in vars(daemon.core)
    raw0, info0 = RunReader(tmp_path / "run").raw(0)
    assert info0["gaps"] == [] and raw0[5].mean() > 1000


def test_the_retrying_engine_takes_the_runners_pause_and_cancel_signals() -> None:
    """The MDA runner sends "pause"/"cancel" into the engine's generator while it yields
    frames; the retrying engine must take them as pymmcore-plus's own does (it once
    died with "'list_iterator' object has no attribute 'send'" on the first pause)."""
    from useq import MDAEvent

    from livestain.acquisition.retry import install_snap_retries
    from livestain.devices.simulated import build_simulated_core

    core = build_simulated_core(SimulatedScope(failing_snaps={0}))
    counts = install_snap_retries(core, retries=2, report=lambda _: None, pause_s=0)
    for runner_signal in ("pause", "cancel"):
        frames = core.mda.engine.exec_single_event(MDAEvent(exposure=5))
        first = next(frames)
        assert first.image.mean() > 100  # the frame, after a retry for the first one
        with pytest.raises(StopIteration):
            frames.send(runner_signal)  # one camera: no more frames, and no AttributeError
    assert counts() == {"snap_retries": 1, "snap_failures": 0}


def test_a_failed_snap_is_a_gap_and_later_frames_stay_in_place(tmp_path, base_port) -> None:
    # plane 5 of the first stack times out three times: the first try and both retries
    scope = SimulatedScope(failing_snaps={5, 6, 7})
    reference = SimulatedScope()
    daemon = _daemon(tmp_path, base_port, scope, 2)
    summary = daemon.run()
    assert summary.acquired == 2 and summary.incomplete == 1
    (raw0, info0), (raw1, info1) = _raws(tmp_path / "run")
    assert info0["gaps"] == [5] and info1["gaps"] == []
    assert raw0[5].max() == 0  # the gap is empty, not filled with a neighbour
    # every other plane is the image of its own focus position: compare with the
    # noise-free expectation of the plane it claims to be
    zs = 4.0 + (np.arange(16) - 7.5)
    for z_index in (4, 6, 15):
        expected = reference.expected_plane("Brightfield", zs[z_index], (0, 0))
        assert np.corrcoef(raw0[z_index].ravel(), expected.ravel())[0, 1] > 0.6
        wrong = reference.expected_plane("Brightfield", zs[z_index - 1], (0, 0))
        assert np.corrcoef(raw0[z_index].ravel(), expected.ravel())[0, 1] > \
            np.corrcoef(raw0[z_index].ravel(), wrong.ravel())[0, 1]


def test_ten_thousand_malformed_messages_are_counted_and_survived(tmp_path, base_port) -> None:
    daemon = _daemon(tmp_path, base_port, SimulatedScope(), 1000)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    eps = wire.endpoints(base_port=base_port)
    ctx = zmq.Context.instance()
    push, req, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.REQ), ctx.socket(zmq.DEALER)
    push.connect(eps["results"])
    req.connect(eps["control"])
    dealer.connect(eps["stacks"])
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    rng = np.random.default_rng(0)
    try:
        for i in range(10_000):
            junk = rng.bytes(int(rng.integers(0, 64)))
            push.send_multipart([junk] if i % 3 == 0 else [junk, b"x"])
            dealer.send_multipart([b"", junk] if i % 2 else [junk])
            req.send_multipart([junk, b""])
            reply = wire.decode_reply(req.recv_multipart())
            assert reply["ok"] is False and reply["error"]
        req.send_multipart(wire.encode_command("status"))
        deadline = time.monotonic() + 30
        status = wire.decode_reply(req.recv_multipart())
        while status["malformed_results"] < 20_000 and time.monotonic() < deadline:
            time.sleep(0.2)
            req.send_multipart(wire.encode_command("status"))
            status = wire.decode_reply(req.recv_multipart())
        req.send_multipart(wire.encode_command("stop"))
        req.recv_multipart()
    finally:
        push.close(0)
        req.close(0)
        dealer.close(0)
        thread.join(60)
    assert status["malformed_results"] == 20_000  # 10,000 on results + 10,000 on stacks
    assert status["malformed_commands"] == 10_000
    assert status["stacks_acquired"] >= 1 and not thread.is_alive()


class _SlowPredictor:
    """Stands in for a model that takes far longer than the acquisition interval."""

    structures = ("dna",)
    device = "cpu"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.model = type("M", (), {"name": "slow@test"})()

    def predict(self, stack: np.ndarray, voxel_size_um=None, out: np.ndarray | None = None) -> np.ndarray:
        time.sleep(self.seconds)
        pred = np.zeros((1, *stack.shape), np.float32)
        if out is not None:
            out[...] = pred
            return out
        return pred


def test_a_worker_ten_times_slower_than_acquisition_never_delays_frames(tmp_path, base_port) -> None:
    from livestain.inference.worker import Worker

    interval = 0.5
    eps = wire.endpoints(base_port=base_port)
    core = build_simulated_core(SimulatedScope())
    # the simulator renders a field's sample on its first snap (a real camera has no such
    # cost): render it now, so the first time point is on the clock like the others
    core.snapImage()
    daemon = Daemon(core, demo_sequence(6, interval), tmp_path / "run", eps,
                    Policies(drain_timeout_s=0.5, live_backlog=2), report=lambda line: None)
    # in this process the worker's input checks would share the GIL with the MDA thread
    # (a real worker is a process of its own): off, this test is about the clock
    worker = Worker(eps["stacks"], eps["results"], _SlowPredictor(10 * interval), input_checks=False)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        summary = daemon.run()
    finally:
        worker.stop()
        thread.join(30)
        worker.close()
    assert summary.acquired == 6
    starts = np.array([info["acquired_start"] for _, info in _raws(tmp_path / "run")])
    # time points start on the plan's clock, as if no worker existed
    np.testing.assert_allclose(np.diff(starts), interval, atol=0.25)
    assert summary.not_predicted >= 3  # the slow worker could not keep up, and it is counted


def test_a_hung_worker_is_detected_and_its_stacks_sent_again(tmp_path, base_port) -> None:
    eps = wire.endpoints(base_port=base_port)
    hung = []
    core = build_simulated_core(SimulatedScope())
    daemon = Daemon(core, demo_sequence(2, 0.0), tmp_path / "run", eps,
                    Policies(drain_timeout_s=3.0, resend_after_s=1.0), report=lambda line: None,
                    hooks=DaemonHooks(on_hung_worker=lambda holders: hung.extend(holders)))
    sink = zmq.Context.instance().socket(zmq.DEALER)  # asks for a stack, never answers
    sink.connect(eps["stacks"])
    # a worker, so with the daemon's token: a peer without it is given no stack at all
    sink.send_multipart(wire.encode_ready("hung-worker", token=daemon.sockets.token.value))
    try:
        summary = daemon.run()
    finally:
        sink.close(0)
    assert hung and set(hung) == {"hung-worker"}, "the hung worker was never named"
    assert summary.acquired == 2 and summary.predicted == 0 and summary.not_predicted == 2


@pytest.mark.parametrize("storage", ["zarr", "tiff"])
def test_resume_never_overwrites_a_stack_already_on_disk(tmp_path, base_port, storage) -> None:
    # t=0 gets a recorded gap (plane 5 fails three times); then the run "crashes" at t=2
    first = _daemon(tmp_path, base_port, SimulatedScope(failing_snaps={5, 6, 7}), 2, {"storage": storage})
    first.run()
    with RunReader(tmp_path / "run") as run:
        ref0 = run.entry(0).raw_ref
        assert run.raw(0)[1]["gaps"] == [5]
    raw0 = ref_file(ref0)  # the stack's own file: the OME-TIFF, or its Zarr chunk
    assert raw0 is not None and raw0.is_file() and (storage == "zarr") == (".ome.zarr" in str(raw0))
    before = raw0.read_bytes()
    core = build_simulated_core(SimulatedScope())
    resumed = Daemon(core, demo_sequence(4, 0.0), tmp_path / "run", wire.endpoints(base_port=base_port),
                     Policies(drain_timeout_s=0.5), report=lambda line: None, resume=True)
    summary = resumed.run()
    assert summary.acquired == 2  # only t=2 and t=3: the gap at t=0 is final, not re-shot
    assert resumed.store.kind == storage  # a run continues in the storage it began in
    assert raw0.read_bytes() == before
    infos = [info for _, info in _raws(tmp_path / "run")]
    assert [i["t"] for i in infos] == [0, 1, 2, 3]
    assert len({i["seq"] for i in infos}) == 4 and len({i["run_id"] for i in infos}) == 1

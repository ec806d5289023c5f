"""Focus tracking (issue 12, item 1): a drifting sample stays in the stack, and the
prediction stays right, only because the daemon follows it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import useq

from livestain import wire
from livestain.acquisition.daemon import Daemon, DaemonHooks
from livestain.acquisition.focus_tracking import FocusTracker
from livestain.acquisition.journal import Journal
from livestain.acquisition.policies import Policies
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.focus import FocusEstimate
from livestain.launch import demo_sequence
from livestain.run_reader import RunReader


def _event(t: int, z: int, z_pos: float, p: int = 0) -> useq.MDAEvent:
    return useq.MDAEvent(index={"t": t, "p": p, "z": z}, z_pos=z_pos)


def _found(offset_um: float) -> FocusEstimate:
    return FocusEstimate(7.5 + offset_um, offset_um, 0.4)


def test_a_stack_keeps_one_correction_even_when_the_runner_looks_ahead() -> None:
    tracker = FocusTracker(enabled=True, max_step_um=2.0, deadband_um=0.5)
    first = [tracker.shift(_event(0, z, 4.0 + z)) for z in range(3)]
    assert [e.z_pos for e in first] == [4.0, 5.0, 6.0]  # nothing known yet: the plan's z
    ahead = tracker.shift(_event(1, 0, 4.0))  # the runner already made stack t=1's first event
    move = tracker.observe(0, 0, _found(1.5))  # then stack t=0 says: cells 1.5 um up
    assert move.moved_um == pytest.approx(1.5) and tracker.corrections[0] == pytest.approx(1.5)
    rest = [tracker.shift(_event(1, z, 4.0 + z)) for z in (1, 2)]
    assert ahead.z_pos == 4.0 and [e.z_pos for e in rest] == [5.0, 6.0]  # t=1 stays whole
    assert tracker.shift(_event(2, 0, 4.0)).z_pos == pytest.approx(5.5)  # t=2 moves
    # t=1 was taken without the correction, so it still sees 1.5 um: no double move
    tracker.observe(1, 0, _found(1.5))
    assert tracker.corrections[0] == pytest.approx(1.5)


def test_moves_are_bounded_ignore_noise_and_positions_are_separate() -> None:
    tracker = FocusTracker(enabled=True, max_step_um=2.0, deadband_um=0.5)
    tracker.shift(_event(0, 0, 4.0, p=0))
    tracker.shift(_event(0, 0, 4.0, p=1))
    assert tracker.observe(0, 0, _found(7.0)).moved_um == pytest.approx(2.0)  # bounded
    assert tracker.observe(0, 1, _found(0.3)).moved_um == 0.0  # within the dead band
    assert tracker.observe(1, 1, FocusEstimate(None, None, 1.1, "outside")).moved_um == 0.0  # unknown: stay
    assert tracker.corrections == {0: pytest.approx(2.0)}
    status = tracker.status()
    assert status["focus"]["0"]["correction_um"] == 2.0 and status["focus"]["1"]["offset_um"] is None
    off = FocusTracker(enabled=False)
    e = _event(0, 0, 4.0)
    assert off.shift(e) is e and off.observe(0, 0, _found(5.0)).moved_um == 0.0  # records only


class _BundledWorker:
    """The bundled model behind a real worker, on a thread."""

    def __init__(self, eps: dict[str, str]) -> None:
        from livestain.inference.predict import Predictor
        from livestain.inference.worker import Worker

        self.worker = Worker(eps["stacks"], eps["results"], Predictor(None, "cpu"), input_checks=False)
        self.thread = threading.Thread(target=self.worker.serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(30)
        self.worker.close()


def _drift_run(tmp_path: Path, base_port: int, track: bool, drift_um: float = 8.0,
               timepoints: int = 7, interval_s: float = 2.0, autofocus: bool = False,
               plan_off_um: float = 0.0) -> tuple[list[float], list[dict], Path]:
    """DNA Pearson r of every prediction against the simulator's truth, the daemon's
    status replies as the focus record changed, and the run folder, for a sample
    drifting ``drift_um`` over the run."""
    from livestain.inference.train import pearson

    rate = drift_um / (interval_s * (timepoints - 1))
    scope = SimulatedScope(seed=5, z_drift_um_per_s=rate, autofocus=autofocus)
    core = build_simulated_core(scope)
    frames: dict[tuple[int, int], list[tuple[int, float, float]]] = {}

    def on_frame(image: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        key = (event.index.get("t", 0), event.index.get("p", 0))
        # the stage's own z: a hardware autofocus adds its correction to the event's
        frames.setdefault(key, []).append((event.index.get("z", 0), float(scope.z_um),
                                           scope.now()))  # ms after the snap: the drift moved < 0.01 um

    core.mda.events.frameReady.connect(on_frame)
    eps = wire.endpoints(base_port=base_port)
    out = tmp_path / ("autofocus" if autofocus else "tracked" if track else "fixed")
    statuses: list[dict] = []

    def on_tick() -> None:  # a status reply each time the focus record changes, as a window polls
        latest = daemon.loop.focus.status()["focus"]
        if latest and (not statuses or statuses[-1]["focus"] != latest):
            statuses.append(daemon.status())

    plan = demo_sequence(timepoints, interval_s)
    if plan_off_um:  # the user centred the stack this far above the cells
        plan = plan.model_copy(update={"stage_positions": [
            pos.model_copy(update={"z": pos.z + plan_off_um}) for pos in plan.stage_positions]})
    daemon = Daemon(core, plan, out, eps,
                    Policies(track_focus=track, drain_timeout_s=120.0), report=lambda line: None,
                    hooks=DaemonHooks(on_tick=on_tick))
    worker = _BundledWorker(eps)
    try:
        summary = daemon.run()
    finally:
        worker.close()
    assert summary.predicted == timepoints
    statuses.append(daemon.status())
    rs = []
    for t in range(timepoints):
        planes = sorted(frames[(t, 0)])
        truth = np.stack([scope.expected_plane("DNA", z, (0, 0), ts) for _, z, ts in planes])
        prediction, info = RunReader(out).prediction(t)
        dna = list(info["structures"]).index("dna")
        rs.append(pearson(prediction[dna], truth))
    return rs, statuses, out


def test_a_drifting_sample_stays_predicted_only_with_focus_tracking(tmp_path, base_port, qapp) -> None:
    from livestain.ui.focus_plot import FocusPlot
    from livestain.ui.status_panel import StatusPanel

    tracked, statuses, out = _drift_run(tmp_path, base_port, track=True)
    # Without tracking, the worker's window still finds cells up to 3 planes beyond the
    # stack's end (`inference.zwindow.locate_cells`; DNA r >= 0.89 at 8 um of drift,
    # -0.03 before it): so the untracked sample drifts 12 um, 4.5 planes beyond.
    fixed, _, _ = _drift_run(tmp_path, base_port + 10, track=False, drift_um=12.0)
    print(f"DNA r per stack, 8 um drift: tracked {[round(r, 3) for r in tracked]}; "
          f"12 um, fixed {[round(r, 3) for r in fixed]}")
    assert min(tracked) >= 0.9, tracked  # every stack, not the mean
    assert fixed[-1] < 0.5 and min(fixed) < 0.5, fixed  # the feature is what keeps it
    status = statuses[-1]
    # recorded where a user looks: status, the journal, each stack's metadata
    assert status["track_focus"] is True
    assert status["focus"]["0"]["correction_um"] == pytest.approx(8.0, abs=2.0)
    rows = Journal(out).db.execute("SELECT focus_offset_um, z_correction_um FROM stacks ORDER BY seq").fetchall()
    assert all(offset is not None for offset, _ in rows)
    assert rows[-1][1] > 4.0  # the last stack was taken well above the plan's z
    _, info = RunReader(out).raw(6)
    assert info["focus"]["z_correction_um"] == pytest.approx(rows[-1][1])
    assert abs(info["focus"]["focus_offset_um"]) < 2.5  # the cells stayed near the centre

    # the window, fed the real daemon's replies: the panel says where the cells are, the
    # plot shows the sample rising ~8 um and the stack following it
    panel, plot = StatusPanel(), FocusPlot()
    for reply in statuses:
        panel.show_status(reply)
        plot.add_status(reply)
    assert "tracking" in panel.text("focus") and "stack moved +" in panel.text("focus")
    track = list(plot.tracks["0"])
    assert [t for t, _, _ in track] == list(range(7))
    sample = [z for _, z, _ in track]
    assert sample[-1] - sample[0] == pytest.approx(8.0, abs=1.5)  # the drift the scenario made
    xs, ys = plot._curves["0"][1].getData()
    assert list(xs) == list(range(1, 8)) and ys[-1] == pytest.approx(rows[-1][1], abs=0.01)
    _dispose(panel, plot)


def test_tracking_brings_back_a_stack_set_up_8_um_off_the_cells(tmp_path, base_port) -> None:
    """The cells at the stack's end, 8 um off: the contrast minimum sees nothing there,
    so tracking never moved (before 2026-12-02); the halos' sign
    (`livestain.focus.locate_cells`) says where they are, and the stack walks back to
    them at the bounded 2 um per time point."""
    rs, statuses, out = _drift_run(tmp_path, base_port, track=True, drift_um=0.0, plan_off_um=8.0)
    print(f"DNA r per stack, stack set up 8 um above the cells, tracked: {[round(r, 3) for r in rs]}")
    correction = statuses[-1]["focus"]["0"]["correction_um"]
    assert correction == pytest.approx(-8.0, abs=1.5), correction
    rows = Journal(out).db.execute("SELECT z_correction_um FROM stacks ORDER BY seq").fetchall()
    assert rows[0][0] == 0 and rows[1][0] == pytest.approx(-2.0, abs=0.01)  # the first move, bounded
    assert min(rs[-2:]) >= 0.9, rs  # centred again at the end


def _dispose(*widgets) -> None:  # noqa: ANN002
    """Delete Qt widgets here, on the GUI thread: left to the garbage collector, a
    pyqtgraph plot may be finalised on a worker thread of a later test, and PySide6 can
    deadlock disconnecting its signals there."""
    import gc

    for w in widgets:
        w.close()
        w.deleteLater()
    del widgets
    gc.collect()


def test_a_hardware_autofocus_device_does_the_tracking_when_the_scope_has_one(tmp_path, base_port) -> None:
    """With an autofocus device in the configuration, ``track_focus`` runs useq's
    autofocus_plan through pymmcore-plus (the device finds the sample) instead of moving
    the stage from the brightfield estimate."""
    rs, statuses, out = _drift_run(tmp_path, base_port, track=True, autofocus=True)
    print(f"DNA r per stack, 8 um drift, hardware autofocus: {[round(r, 3) for r in rs]}")
    assert min(rs) >= 0.9, rs
    status = statuses[-1]
    assert status["focus_mode"] == "hardware autofocus (SimAutoFocus)" and status["track_focus"] is False
    offsets = [f["offset_um"] for f in (s["focus"]["0"] for s in statuses) if f["offset_um"] is not None]
    assert offsets and max(abs(o) for o in offsets) < 2.0  # the device kept the cells centred
    run = json.loads((out / "run.json").read_text())
    assert run["sequence"]["autofocus_plan"]["autofocus_device_name"] == "SimAutoFocus"

"""Tests of the live viewer, read back from rendered pixels where it matters.

Images are small (5 x 64 x 80) with a bright square per structure at known places, so
a grab of the window can be checked for the structure's colour exactly where the
square is. The daemon is played by a fake REP server (control) and a PUB socket
(display) on free 127.0.0.1 ports.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import ctypes
import pathlib
import socket
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import zmq
from PySide6 import QtCore, QtGui, QtWidgets

from livestain import wire
from livestain.ui.app import control_endpoint_for, run_viewer
from livestain.ui.colors import STRUCTURE_COLORS, structure_color
from livestain.ui.control_client import ControlClient
from livestain.ui.history import History
from livestain.ui.qtcheck import ReferenceGuard, guard_if_needed, signal_reference_leak
from livestain.ui.render import Compositor, auto_levels, best_focus_plane, display_step
from livestain.ui.status_panel import RateMeter
from livestain.ui.subscriber import DisplaySubscriber
from livestain.ui.window import LiveWindow
from livestain.wire import StackHeader, encode

from _helpers import real_status  # noqa: E402

guard_if_needed()  # PySide6 6.12.0 + Python 3.11 loses references on every signal (see qtcheck)

NZ, NY, NX = 5, 64, 80
SQUARE = (slice(20, 36), slice(30, 50))  # (y, x) of the bright dna square
INSIDE = (27, 36)  # (y, x) well inside the square, off the default crosshair (40, 32)
SQUARE2 = (slice(44, 60), slice(4, 20))  # where dna is at t = 1 (and at position 1)
INSIDE2 = (52, 12)
OUTSIDE = (5, 5)
STRUCTURES = ["dna", "membrane", "mitochondria"]
DNA = STRUCTURE_COLORS["dna"]


def stack_header(seq: int = 0, t: int | None = None, p: int = 0, run: str = "r1") -> StackHeader:
    return StackHeader(
        kind="stack", run_id=run, seq=seq, t=seq if t is None else t, p=p, shape=[NZ, NY, NX],
        dtype="uint16", voxel_size_um=[1.0, 0.5, 0.5], acquired_end=time.time(),
    )


def pred_header(source_seq: int = 0, t: int | None = None, p: int = 0, run: str = "r1") -> StackHeader:
    return StackHeader(
        kind="prediction", run_id=run, seq=source_seq, t=source_seq if t is None else t, p=p,
        shape=[len(STRUCTURES), NZ, NY, NX], dtype="float32",
        voxel_size_um=[1.0, 0.5, 0.5], structures=STRUCTURES, source_seq=source_seq,
        acquired_end=time.time() - 0.5,
    )


def make_stack() -> np.ndarray:
    """Each plane a different gradient + offset, so planes differ after levelling too."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    planes = [(1000 + 500 * z + (xx if z % 2 else yy) * (z + 1) * 7) for z in range(NZ)]
    return np.stack(planes).astype(np.uint16)


def make_prediction(square: tuple[slice, slice] = SQUARE, planes: Any = slice(None)) -> np.ndarray:
    """Background noise in every channel; dna has a bright ``square`` in ``planes``."""
    rng = np.random.default_rng(0)
    pred = rng.normal(0.0, 0.05, (len(STRUCTURES), NZ, NY, NX)).astype(np.float32)
    pred[0, planes, square[0], square[1]] = 5.0
    return pred


def pixel(window: LiveWindow, y: float, x: float, box: Any = None) -> tuple[int, int, int]:
    """Colour at view point (x, y) of ``box`` (default: XY) in a fresh grab of the window."""
    window.flush()
    image = window.grab().toImage()
    pt = window.views.scene_point(box or window.views.xy_box, x + 0.5, y + 0.5)
    pt = window.views.mapTo(window, pt)
    c = image.pixelColor(pt.x(), pt.y())
    return c.red(), c.green(), c.blue()


def is_dna(rgb: tuple[int, int, int]) -> bool:
    r, g, b = rgb
    return b > r + 60 and b > g + 30


def is_grey(rgb: tuple[int, int, int]) -> bool:
    return max(rgb) - min(rgb) <= 12


@pytest.fixture
def window(qtbot) -> LiveWindow:
    w = LiveWindow(confirm_stop=False)
    qtbot.addWidget(w)
    w.resize(1200, 900)
    w.show()
    qtbot.waitExposed(w)
    return w


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeDaemon:
    """A control REP socket in a thread: answers every command with a known status
    (a real daemon's, `real_status`, with the figures the tests look for)."""

    def __init__(self, port: int, run_id: str = "run-A", **status: Any) -> None:
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.status: dict[str, Any] = real_status() | {
            "run_id": run_id, "state": "acquiring", "out_dir": "/data/x",
            "stacks_acquired": 7, "stacks_predicted": 5, "stacks_predicted_late": 1,
            "stacks_late": 2, "stacks_in_flight": 1, "stacks_dropped": 3, "backlog": 4,
            "malformed_results": 0, "timepoints": 10, "positions": 2, "stacks_total": 20,
            "disk_free_bytes": 123_400_000_000, "uptime_s": 70.0,
            "worker_pid": 4242, "worker_alive": True, "worker_restarts": 1, "error": None,
        } | status
        self.commands: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "fake daemon did not bind"

    def _serve(self) -> None:
        ctx = zmq.Context()
        rep = ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        rep.bind(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not rep.poll(20):
                    continue
                command, _ = wire.decode_command(rep.recv_multipart())
                self.commands.append(command)
                if command == "pause":
                    self.status["state"] = "paused"
                elif command == "resume":
                    self.status["state"] = "acquiring"
                elif command == "stop":
                    self.status["state"] = "finishing"
                rep.send_multipart(wire.encode_reply(True, **self.status))
        finally:
            rep.close(linger=0)
            ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- pure helpers ----------------------------------------------------------------------


def test_known_colors_fixed_and_fallback_deterministic() -> None:
    assert structure_color("dna") == (40, 110, 255)
    assert structure_color("membrane") == (255, 0, 200)
    assert structure_color("mitochondria") == (180, 255, 0)
    other = structure_color("nucleoli")
    assert other == structure_color("nucleoli")
    assert other not in STRUCTURE_COLORS.values()
    assert all(0 <= v <= 255 for v in other)


def test_compositor_mixes_colours_and_reuses_buffers() -> None:
    comp = Compositor()
    a = np.zeros((4, 4), np.float32)
    b = np.zeros((4, 4), np.float32)
    a[:2] = 1.0
    b[:, :2] = 1.0
    out = comp.composite(4, 4, [a, b], [(255, 0, 0), (0, 0, 255)], [1.0, 0.5], [(0, 1), (0, 1)])
    assert tuple(out[0, 3]) == (255, 0, 0, 255)  # only red, opaque
    assert tuple(out[3, 0]) == (0, 0, 255, 128)  # only blue, half
    assert tuple(out[0, 0][:3]) == (170, 0, 85) and out[0, 0, 3] == 255  # 2:1 mix by alpha
    assert out[3, 3, 3] == 0
    again = comp.composite(4, 4, [a], [(0, 255, 0)], [1.0], [(0, 1)])
    assert again is not out  # double-buffered: the image Qt holds is not overwritten
    assert comp.composite(4, 4, [], [], [], []) is out


def test_levels_subsample_and_focus() -> None:
    big = np.arange(16 * 2048 * 2048 // 64, dtype=np.float32).reshape(16, 256, 256)
    lo, hi = auto_levels(big, (0.0, 100.0))
    assert lo < 2048 and hi > big.max() * 0.98  # a subsample, but spans the range
    assert auto_levels(np.ones((8, 8)), (1, 99), min_span=2.0) == (1.0, 3.0)
    assert display_step(2048, 2048) == 2 and display_step(512, 512) == 1
    rng = np.random.default_rng(1)
    stack = np.full((5, 64, 64), 1000.0) + rng.normal(0, 1, (5, 64, 64))
    stack[3] += rng.normal(0, 200, (64, 64))  # the textured (in-focus) plane
    assert best_focus_plane(stack.astype(np.uint16)) == 3


def test_history_bounds_count_and_memory_keeps_newest() -> None:
    stack = make_stack()  # 5*64*80*2 = 51200 bytes
    h = History(max_timepoints=3, max_mb=10)
    for t in range(5):
        h.add(stack_header(seq=t), stack)
    assert h.times(0) == [2, 3, 4] and h.evicted == 2
    h.add(pred_header(source_seq=1, t=1), make_prediction())  # an old, late prediction:
    assert h.times(0) == [1, 3, 4]  # the newest prediction is kept, the oldest other goes
    # memory: room for ~2 stacks only; the newest stack (t 4) is never evicted
    h = History(max_timepoints=50, max_mb=2.5 * stack.nbytes / 1024**2)
    for t in range(4):
        h.add(stack_header(seq=t), stack)
    assert h.times(0) == [2, 3] and h.nbytes <= h.max_bytes
    h.add(stack_header(seq=9, t=9, p=1), stack)
    assert h.newest(1, "stack").header.t == 9 and h.newest(0, "stack").header.t == 3
    assert h.nbytes <= h.max_bytes and "MB" in h.describe()
    h.add(stack_header(seq=0, run="r2"), stack)  # a new run starts afresh
    assert h.positions() == [0] and h.times(0) == [0] and len(h) == 1


def test_reference_guard_tops_up_singletons() -> None:
    assert isinstance(signal_reference_leak(), bool)
    guard = ReferenceGuard(margin=10, period_s=60)
    try:
        before = sys.getrefcount(None)
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(None))  # what the binding bug does
        guard.top_up()
        assert sys.getrefcount(None) >= before
    finally:
        guard.stop()


def test_rate_meter() -> None:
    m = RateMeter(window_s=60)
    m.add("r", 0, now=0.0)
    assert m.per_minute() is None
    m.add("r", 10, now=30.0)
    assert m.per_minute() == pytest.approx(20.0) and m.overall_per_minute() == pytest.approx(20.0)
    m.add("other", 1, now=31.0)  # new run resets
    assert m.per_minute() is None


# -- main view, by pixels ------------------------------------------------------------------


def test_dna_square_drawn_in_dna_colour(window: LiveWindow) -> None:
    window.show_stack(stack_header(), make_stack())
    assert window.z_slider.value() == NZ // 2  # default: middle plane
    before = pixel(window, *INSIDE)
    assert is_grey(before) and window.overlay_rgba()[..., 3].max() == 0  # no prediction yet

    window.show_prediction(pred_header(), make_prediction())
    rgba = window.overlay_rgba()
    assert rgba.shape == (NY, NX, 4) and rgba.dtype == np.uint8
    inside = rgba[SQUARE].astype(int)
    assert np.abs(inside[..., :3] - DNA).max() <= 40  # tinted at most slightly by noise
    assert inside[..., 3].min() >= 170  # ~ opacity 0.7 * 255
    outside = rgba.astype(int)
    outside[SQUARE] = 0
    assert outside[..., 3].max() <= 64 and outside[..., 3].mean() <= 10

    assert is_dna(pixel(window, *INSIDE))  # drawn, on screen, where the square is
    assert is_grey(pixel(window, *OUTSIDE))  # and not elsewhere
    for y, x in ((SQUARE[0].start, SQUARE[1].start), (SQUARE[0].stop - 1, SQUARE[1].stop - 1)):
        assert is_dna(pixel(window, y, x))  # corners: at the right place, not shifted
    assert not is_dna(pixel(window, SQUARE[0].start - 2, SQUARE[1].start - 2))
    assert window.n_stacks == 1 and window.n_predictions == 1
    assert "seq 0" in window.status.text()


def test_unticking_dna_hides_it(window: LiveWindow) -> None:
    window.show_stack(stack_header(), make_stack())
    grey = pixel(window, *INSIDE)
    window.show_prediction(pred_header(), make_prediction())
    assert is_dna(pixel(window, *INSIDE))
    assert window.structures.checks["dna"].isChecked()

    window.structures.checks["dna"].setChecked(False)  # the user unticks the box
    shown = pixel(window, *INSIDE)
    assert is_grey(shown) and np.abs(np.subtract(shown, grey)).max() <= 12
    alpha = window.overlay_rgba()[..., 3].astype(int)
    assert alpha[SQUARE].max() <= 64 and alpha[SQUARE].mean() <= 10  # only noise left

    window.set_structure_visible("dna", True)
    assert window.structures.checks["dna"].isChecked()
    assert is_dna(pixel(window, *INSIDE))


def test_colour_opacity_and_manual_contrast(window: LiveWindow) -> None:
    window.show_stack(stack_header(), make_stack())
    window.show_prediction(pred_header(), make_prediction())
    window.structures.set_color("dna", (255, 0, 0))
    r, g, b = pixel(window, *INSIDE)
    assert r > g + 60 and r > b + 60  # now red
    window.structures.set_opacity("dna", 0.0)
    assert is_grey(pixel(window, *INSIDE))
    window.structures.set_opacity("dna", 1.0)
    r, g, b, a = window.overlay_rgba()[INSIDE]
    assert r == 255 and g <= 12 and b <= 12 and a == 255  # faint tint of the others' noise
    window.structures.set_manual("dna", 6.0, 10.0)  # square (5.0) is below the ramp
    assert is_grey(pixel(window, *INSIDE))
    window.structures.set_manual("dna", -1.0, 2.5)  # saturated, and noise now shows faintly
    assert window.overlay_rgba()[INSIDE][3] == 255
    assert window.overlay_rgba()[OUTSIDE][3] > 50
    window.structures.set_auto("dna")
    window.flush()
    lo, hi = window.structures.min_spins["dna"].value(), window.structures.max_spins["dna"].value()
    assert abs(lo) < 0.2 and hi == pytest.approx(5.0, abs=0.01)  # auto levels shown


def test_z_slider_changes_base_and_overlay(window: LiveWindow) -> None:
    stack = make_stack()
    window.show_stack(stack_header(), stack)
    window.show_prediction(pred_header(), make_prediction(planes=1))  # dna only in plane 1
    window.flush()
    np.testing.assert_array_equal(window.base_image(), stack[NZ // 2])
    grab_mid = window.grab().toImage()
    assert not is_dna(pixel(window, *INSIDE))

    window.z_slider.setValue(1)
    assert is_dna(pixel(window, *INSIDE))
    np.testing.assert_array_equal(window.base_image(), stack[1])
    assert window.z_label.text().startswith("z 1/")
    assert window.grab().toImage() != grab_mid

    window.set_plane(NZ + 10)  # clamped
    window.flush()
    assert window.z_slider.value() == NZ - 1
    np.testing.assert_array_equal(window.base_image(), stack[NZ - 1])
    window.show_stack(stack_header(seq=1), stack)  # same depth: the chosen plane stays
    assert window.z_slider.value() == NZ - 1

    window.set_mode("max")  # the projection shows plane 1's dna from any plane
    assert is_dna(pixel(window, *INSIDE))
    assert not window.z_slider.isEnabled()
    window.set_mode("focus")  # the sharpest plane of the stack, whatever the slider says
    window.flush()
    assert "(focus)" in window.z_label.text()
    assert window.z_slider.value() == int(window.z_label.text().split()[1].split("/")[0])
    window.set_mode("plane")
    window.set_plane(NZ - 1)
    assert not is_dna(pixel(window, *INSIDE))


def test_orthogonal_views_follow_the_crosshair(window: LiveWindow) -> None:
    window.show_stack(stack_header(), make_stack())
    window.show_prediction(pred_header(), make_prediction(planes=1))
    window.set_crosshair(INSIDE[1], INSIDE[0])  # through the square
    xz, yz = window.views.xz_box, window.views.yz_box
    # XZ rows are z (scaled by z step / pixel = 2): dna only in plane 1
    # (sampled off the crosshair lines, which are drawn over the images)
    y, x = INSIDE[0] - 4, INSIDE[1] - 5
    assert is_dna(pixel(window, 1 * 2 + 1, x, xz))
    assert not is_dna(pixel(window, 3 * 2 + 1, x, xz))
    assert not is_dna(pixel(window, 1 * 2 + 1, OUTSIDE[1], xz))
    assert is_dna(pixel(window, y, 1 * 2 + 1, yz))  # YZ columns are z
    assert not is_dna(pixel(window, y, 3 * 2 + 1, yz))
    window.set_crosshair(OUTSIDE[1], OUTSIDE[0])  # a section that misses the square
    assert not is_dna(pixel(window, 1 * 2 + 1, x, xz))
    assert not is_dna(pixel(window, y, 1 * 2 + 1, yz))


def test_time_scrubber_and_positions(window: LiveWindow) -> None:
    stack = make_stack()
    window.show_stack(stack_header(seq=0, t=0), stack)
    window.show_prediction(pred_header(0, t=0), make_prediction(SQUARE))
    window.show_stack(stack_header(seq=1, t=1), stack)
    window.show_prediction(pred_header(1, t=1), make_prediction(SQUARE2))
    assert window.live_check.isChecked()
    assert is_dna(pixel(window, *INSIDE2)) and not is_dna(pixel(window, *INSIDE))  # live: t 1

    window.time_slider.setValue(0)  # scrub back
    assert not window.live_check.isChecked()
    assert is_dna(pixel(window, *INSIDE)) and not is_dna(pixel(window, *INSIDE2))
    assert window.time_label.text().startswith("t 0")
    window.show_stack(stack_header(seq=2, t=2), stack)  # new data does not yank the view
    assert is_dna(pixel(window, *INSIDE))
    window.time_slider.setValue(window.time_slider.maximum())  # the end = live again
    assert window.live_check.isChecked()

    # a second position: the selector lists it; the view switches to its data
    window.show_stack(stack_header(seq=3, t=0, p=1), stack)
    window.show_prediction(pred_header(3, t=0, p=1), make_prediction(SQUARE2))
    assert [window.position_combo.itemData(i) for i in range(window.position_combo.count())] == [0, 1]
    window.set_time(0)
    assert is_dna(pixel(window, *INSIDE))
    window.set_position(1)
    assert is_dna(pixel(window, *INSIDE2)) and not is_dna(pixel(window, *INSIDE))
    assert "p 1" in window.status.text()


def test_large_frames_drawn_downsampled_in_place(qtbot) -> None:
    w = LiveWindow(display_max_px=32)  # 80 x 64 -> stride 3, as 2048 -> 1024 would
    qtbot.addWidget(w)
    w.resize(1200, 900)
    w.show()
    qtbot.waitExposed(w)
    w.show_stack(stack_header(), make_stack())
    w.show_prediction(pred_header(), make_prediction())
    assert w.overlay_rgba().shape[:2] == (-(-NY // 3), -(-NX // 3))
    assert is_dna(pixel(w, *INSIDE)) and not is_dna(pixel(w, *OUTSIDE))  # same place


def test_draws_are_rate_bounded(qtbot) -> None:
    w = LiveWindow(max_draw_hz=5)
    qtbot.addWidget(w)
    w.show()
    calls = []
    original = w._draw
    w._draw = lambda: (calls.append(time.monotonic()), original())[1]  # type: ignore[method-assign]
    for seq in range(20):  # a burst of data: many ingests, few draws
        w.ingest(stack_header(seq=seq), make_stack())
        qtbot.wait(10)
    qtbot.wait(300)
    assert 1 <= len(calls) < 20
    # the limiter spaces draws at least 1/5 s apart (a loaded machine only spaces them more)
    assert all(b - a >= 0.18 for a, b in zip(calls, calls[1:]))


# -- status panel and control socket -------------------------------------------------------


def attach_fake(window: LiveWindow, port: int) -> ControlClient:
    client = ControlClient(f"tcp://127.0.0.1:{port}", interval_ms=100, timeout_ms=300)
    window.attach_control(client)
    return client


def test_status_panel_shows_the_daemons_figures(window: LiveWindow, qtbot) -> None:
    port = free_port()
    daemon = FakeDaemon(port)
    client = attach_fake(window, port)
    panel = window.panel
    try:
        qtbot.waitUntil(lambda: panel.text("run") == "run-A", timeout=5000)
        assert panel.text("connection") == "answering"
        assert panel.text("state") == "acquiring"
        assert "t 4/10" in panel.text("progress") and "p 2/2" in panel.text("progress")
        assert "stacks 7/20" in panel.text("progress") and "predicted 5" in panel.text("progress")
        assert panel.text("backlog") == "4 waiting, 1 in flight"
        assert panel.text("late").startswith("2") and panel.text("dropped") == "3"
        assert panel.text("worker") == "alive (pid 4242), 1 restart(s)"
        assert panel.text("disk") == "123.4 GB"
        assert "ETA" not in panel.text("eta") and "≈" in panel.text("eta")  # 13 left at 6/min
        assert panel.text("eta") == "≈ 2m10s"
        assert panel.text("dose") == "fluorescence light avoided: 5 stacks x ? channels"
        window.show_prediction(pred_header(), make_prediction())
        assert "5 stacks x 3 channels = 15" in panel.text("dose")
        assert panel.text("latency").startswith("0.")  # acquired_end 0.5 s before
        daemon.status.update(fluorescence_dose_ms=30.0, equivalent_fluorescence_run_dose_ms=12000.0)
        qtbot.waitUntil(lambda: panel.text("dose") == "fluorescence light: 30 ms used of 12000 ms a "
                        "fluorescence run would have used (0.2%)", timeout=3000)
        daemon.status.update(worker_alive=False, worker_restarts=2)
        qtbot.waitUntil(lambda: panel.text("worker").startswith("DOWN"), timeout=3000)
    finally:
        client.stop()
        daemon.close()


def test_buttons_send_pause_resume_stop(window: LiveWindow, qtbot, monkeypatch) -> None:
    port = free_port()
    daemon = FakeDaemon(port)
    client = attach_fake(window, port)
    try:
        qtbot.waitUntil(window.pause_button.isEnabled, timeout=5000)
        qtbot.mouseClick(window.pause_button, QtCore.Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: "pause" in daemon.commands, timeout=3000)
        qtbot.waitUntil(window.resume_button.isEnabled, timeout=3000)  # state: paused
        assert window.panel.text("state") == "paused" and not window.pause_button.isEnabled()
        qtbot.mouseClick(window.resume_button, QtCore.Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: "resume" in daemon.commands, timeout=3000)

        window.confirm_stop = True  # the user says No: nothing is sent
        monkeypatch.setattr(QtWidgets.QMessageBox, "question",
                            lambda *a, **k: QtWidgets.QMessageBox.StandardButton.No)
        qtbot.waitUntil(window.stop_button.isEnabled, timeout=3000)
        qtbot.mouseClick(window.stop_button, QtCore.Qt.MouseButton.LeftButton)
        qtbot.wait(300)
        assert "stop" not in daemon.commands
        monkeypatch.setattr(QtWidgets.QMessageBox, "question",
                            lambda *a, **k: QtWidgets.QMessageBox.StandardButton.Yes)
        qtbot.mouseClick(window.stop_button, QtCore.Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: "stop" in daemon.commands, timeout=3000)
        qtbot.waitUntil(lambda: window.command_label.text() == "stop: done", timeout=3000)
        assert window.stop(confirm=False)  # the bypass used by scripts and tests
        qtbot.waitUntil(lambda: daemon.commands.count("stop") == 2, timeout=3000)
    finally:
        client.stop()
        daemon.close()


def test_reattaches_after_daemon_restart(window: LiveWindow, qtbot) -> None:
    port = free_port()
    daemon = FakeDaemon(port, run_id="run-A")
    client = attach_fake(window, port)
    panel = window.panel
    try:
        qtbot.waitUntil(lambda: panel.text("run") == "run-A", timeout=5000)
        daemon.close()
        qtbot.waitUntil(lambda: "not answering" in panel.text("connection"), timeout=5000)
        ticks = []
        timer = QtCore.QTimer()
        timer.timeout.connect(lambda: ticks.append(1))
        timer.start(20)
        qtbot.waitUntil(lambda: len(ticks) >= 5, timeout=5000)  # the GUI keeps running
        timer.stop()
        window.pause()  # a command while the daemon is gone fails cleanly
        qtbot.waitUntil(lambda: "failed" in window.command_label.text(), timeout=3000)
        assert not window.pause_button.isEnabled()

        daemon = FakeDaemon(port, run_id="run-B")  # restarted on the same port
        qtbot.waitUntil(lambda: panel.text("run") == "run-B", timeout=5000)
        assert panel.text("connection") == "answering"
        assert client.reconnects >= 1
    finally:
        client.stop()
        daemon.close()


def test_control_endpoint_beside_display() -> None:
    assert control_endpoint_for("tcp://10.0.0.5:5562") == "tcp://10.0.0.5:5563"
    assert control_endpoint_for("ipc:///tmp/x") is None


# -- display subscriber -------------------------------------------------------------------


def publish_until(pub: zmq.Socket, sub: DisplaySubscriber, seq: int, timeout: float = 5.0) -> Any:
    """Send stack ``seq`` until the subscriber has it (PUB/SUB joins asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.send_multipart(encode(stack_header(seq=seq), make_stack()), copy=False)
        time.sleep(0.05)
        got, _ = sub.poll()
        if got:
            while True:  # drain copies still in flight, so what follows starts empty
                time.sleep(0.2)
                if sub.poll() == ([], 0):
                    return got
    raise AssertionError(f"stack {seq} not received within {timeout} s")


def test_subscriber_receives_valid_and_drops_malformed() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(endpoint)
    sub = DisplaySubscriber(endpoint, ctx=ctx)
    try:
        got = publish_until(pub, sub, seq=3)
        header, array = got[-1]
        assert header.kind == "stack" and header.seq == 3
        np.testing.assert_array_equal(array, make_stack())
        assert not array.flags.writeable  # a view of the zmq frame, not a copy

        pub.send_multipart([b"not json", b"x"])
        pub.send_multipart(encode(pred_header(source_seq=3), make_prediction()), copy=False)
        dropped_total, got_pred = 0, None
        deadline = time.monotonic() + 5.0
        while (got_pred is None or dropped_total < 1) and time.monotonic() < deadline:
            time.sleep(0.02)
            _, pred, dropped = sub.poll_latest()
            dropped_total += dropped
            got_pred = got_pred or pred
        assert dropped_total == 1 and sub.n_malformed == 1
        assert got_pred is not None and got_pred.header.source_seq == 3
        assert sub.poll_latest() == (None, None, 0)  # drained
    finally:
        sub.close()
        pub.close()
        ctx.term()


def test_subscriber_keeps_newest_per_position() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(endpoint)
    sub = DisplaySubscriber(endpoint, ctx=ctx)
    try:
        publish_until(pub, sub, seq=0)
        before = dict(sub.received)
        # three messages (within the receive high-water mark of 4)
        for seq, p in ((1, 0), (3, 0)):
            pub.send_multipart(encode(stack_header(seq=seq, p=p), make_stack()), copy=False)
        pub.send_multipart(encode(pred_header(source_seq=2, p=1), make_prediction()), copy=False)
        time.sleep(0.3)
        got, _ = sub.poll()
        kept = sorted((m.header.kind, m.header.p, m.header.seq) for m in got)
        assert kept == [("prediction", 1, 2), ("stack", 0, 3)]  # stack seq 1 superseded
        assert sub.received["stack"] - before["stack"] == 2  # counted, though not returned
        assert sub.received["prediction"] - before["prediction"] == 1
        views = {m.header.kind: m.array for m in got}
        assert not views["stack"].flags.writeable  # zero-copy views of the frames...
        for seq in range(10):  # ...that stay valid while newer messages come and go
            pub.send_multipart(encode(stack_header(seq=10 + seq), np.zeros((NZ, NY, NX), np.uint16)),
                               copy=False)
        time.sleep(0.2)
        sub.poll()
        np.testing.assert_array_equal(views["stack"], make_stack())
        np.testing.assert_array_equal(views["prediction"], make_prediction())
    finally:
        sub.close()
        pub.close()
        ctx.term()


def test_subscriber_reattaches_when_publisher_restarts() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    sub = DisplaySubscriber(endpoint, ctx=ctx)
    try:
        for seq in (1, 2):  # the daemon, then a restarted daemon on the same port
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(endpoint)
            try:
                got = publish_until(pub, sub, seq=seq)
                assert got[-1].header.seq == seq
            finally:
                pub.close()
            time.sleep(0.2)
    finally:
        sub.close()
        ctx.term()


# -- run_viewer ----------------------------------------------------------------------------


def test_run_viewer_screenshots_once_a_prediction_arrives(qapp, tmp_path: pathlib.Path) -> None:
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    control_port = free_port()
    daemon = FakeDaemon(control_port, run_id="run-shot")
    stop = threading.Event()

    def publish() -> None:  # a stand-in daemon: stack + prediction, over and over
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(endpoint)
        while not stop.is_set():
            pub.send_multipart(encode(stack_header(), make_stack()), copy=False)
            pub.send_multipart(encode(pred_header(), make_prediction()), copy=False)
            time.sleep(0.05)
        pub.close()
        ctx.term()

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    shot = tmp_path / "shot.png"
    try:
        code = run_viewer(endpoint, screenshot=shot, screenshot_after_s=30.0,
                          control_endpoint=f"tcp://127.0.0.1:{control_port}")
    finally:
        stop.set()
        thread.join(5)
        daemon.close()
    assert code == 0  # saved on the prediction (the blue square below), not on the timeout
    assert "status" in daemon.commands
    image = QtGui.QImage(str(shot))
    assert not image.isNull() and image.width() > 100
    colors = {image.pixelColor(x, y).getRgb()[:3] for x in range(0, image.width(), 7)
              for y in range(0, image.height(), 7)}
    assert any(b > r + 80 and b > g + 40 for r, g, b in colors)  # the blue dna square shows


def test_run_viewer_without_daemon_saves_after_timeout(qapp, tmp_path: pathlib.Path) -> None:
    shot = tmp_path / "empty.png"
    t0 = time.monotonic()
    code = run_viewer(
        f"tcp://127.0.0.1:{free_port()}", screenshot=shot,
        screenshot_after_s=0.3, wait_for_prediction=False,
    )
    waited = time.monotonic() - t0
    assert code == 0 and shot.exists()
    assert waited >= 0.3  # it waited for the timeout before saving an empty window


def test_a_prediction_wakes_the_window_without_its_poll_timer(window: LiveWindow, qtbot) -> None:
    """The socket's notifier, not a timer, brings messages in (the drawn latency)."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = DisplaySubscriber(f"tcp://127.0.0.1:{port}")
    try:
        publish_until(pub, sub, seq=0)  # joined; the queue is empty again
        window.attach(sub)
        window._poll_timer.stop()  # only the notifier can deliver now
        for seq in (1, 2):  # two rounds: the edge-triggered descriptor re-arms after a drain
            before = window.n_predictions
            pub.send_multipart(encode(stack_header(seq=seq), make_stack()), copy=False)
            pub.send_multipart(encode(pred_header(source_seq=seq), make_prediction()), copy=False)
            qtbot.waitUntil(lambda: window.n_predictions > before, timeout=3000)
        assert window.shown()[1].header.source_seq == 2
    finally:
        window.close()
        sub.close()
        pub.close(linger=0)


def test_every_status_field_the_panel_reads_is_one_a_daemon_sends(tmp_path, qapp, monkeypatch) -> None:
    """The panel once read `stacks_total` and `dose`, which no daemon sent: the light-dose
    row showed a fallback and paired-mode progress read "complete" at 25%."""
    from livestain.acquisition.daemon import Daemon
    from livestain.devices.simulated import SimulatedScope, build_simulated_core
    from livestain.runconfig import load_run_config
    from livestain.ui.status_panel import StatusPanel
    from pathlib import Path

    port = free_port()
    paired = load_run_config(Path(__file__).resolve().parents[1] / "examples" / "paired.yaml")
    daemon = Daemon(build_simulated_core(SimulatedScope()), paired.sequence(), tmp_path / "run",
                    wire.endpoints(base_port=port), paired.policies, report=lambda line: None)
    try:
        status = daemon.status() | {"worker_alive": True, "worker_restarts": 0, "worker_pid": 1}
    finally:
        daemon.sockets.close()
        daemon.journal.close()
        daemon.folder.release_lock()
    assert set(StatusPanel.FIELDS_READ) <= set(status), set(StatusPanel.FIELDS_READ) - set(status)
    n = paired.sequence().sizes
    assert status["stacks_total"] == n["t"] * n["p"] * n["c"]  # every channel of paired mode
    panel = StatusPanel()
    # a quarter of the plan acquired: t 1 of 2 done at both positions, 4 channels each
    panel.show_status(status | {"stacks_acquired": status["stacks_total"] // 4})
    assert "(25%)" in panel.text("progress") and "t 1/2" in panel.text("progress")
    assert panel.text("eta") != "acquisition complete"

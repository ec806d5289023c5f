"""Tests of the live viewer: overlay compositing, controls, and the display subscriber."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pathlib
import socket
import threading
import time

import numpy as np
import pytest
import zmq
from PySide6 import QtCore, QtGui

from livestain.ui.app import run_viewer
from livestain.ui.colors import STRUCTURE_COLORS, structure_color
from livestain.ui.subscriber import DisplaySubscriber
from livestain.ui.window import LiveWindow
from livestain.wire import StackHeader, encode

NZ, NY, NX = 5, 64, 80
SQUARE = (slice(20, 36), slice(30, 50))  # (y, x) of the bright dna square
INSIDE = (28, 40)  # (y, x) well inside the square
OUTSIDE = (5, 5)
STRUCTURES = ["dna", "membrane", "mitochondria"]


def stack_header(seq: int = 0) -> StackHeader:
    return StackHeader(
        kind="stack", run_id="r1", seq=seq, t=seq, p=0, shape=[NZ, NY, NX],
        dtype="uint16", voxel_size_um=[1.0, 0.5, 0.5],
    )


def pred_header(source_seq: int = 0) -> StackHeader:
    return StackHeader(
        kind="prediction", run_id="r1", seq=source_seq, t=0, p=0,
        shape=[len(STRUCTURES), NZ, NY, NX], dtype="float32",
        voxel_size_um=[1.0, 0.5, 0.5], structures=STRUCTURES, source_seq=source_seq,
    )


def make_stack() -> np.ndarray:
    """Each plane a different gradient + offset, so planes differ after levelling too."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    planes = [(1000 + 500 * z + (xx if z % 2 else yy) * (z + 1) * 7) for z in range(NZ)]
    return np.stack(planes).astype(np.uint16)


def make_prediction() -> np.ndarray:
    """Background noise in every channel; dna has a bright square in every plane."""
    rng = np.random.default_rng(0)
    pred = rng.normal(0.0, 0.05, (len(STRUCTURES), NZ, NY, NX)).astype(np.float32)
    pred[0][:, SQUARE[0], SQUARE[1]] = 5.0
    return pred


def window_pixel(window: LiveWindow, image: QtGui.QImage, y: int, x: int) -> tuple[int, int, int]:
    """Colour of image pixel (y, x) as rendered in a grab of the whole window."""
    scene = window.base_item.mapToScene(QtCore.QPointF(x + 0.5, y + 0.5))
    view_pt = window.graphics.mapFromScene(scene)
    pt = window.graphics.mapTo(window, view_pt)
    c = image.pixelColor(pt.x(), pt.y())
    return c.red(), c.green(), c.blue()


@pytest.fixture
def window(qtbot) -> LiveWindow:
    w = LiveWindow()
    qtbot.addWidget(w)
    w.resize(500, 500)
    w.show()
    qtbot.waitExposed(w)
    return w


def test_known_colors_fixed_and_fallback_deterministic() -> None:
    assert structure_color("dna") == (40, 110, 255)
    assert structure_color("membrane") == (255, 0, 200)
    assert structure_color("mitochondria") == (180, 255, 0)
    other = structure_color("nucleoli")
    assert other == structure_color("nucleoli")
    assert other not in STRUCTURE_COLORS.values()
    assert all(0 <= v <= 255 for v in other)


def test_dna_square_drawn_in_dna_colour(window: LiveWindow) -> None:
    window.show_stack(stack_header(), make_stack())
    assert window.z_slider.value() == NZ // 2  # default: middle plane
    before = window_pixel(window, window.grab().toImage(), *INSIDE)
    assert window.overlay_rgba()[..., 3].max() == 0  # no prediction yet

    window.show_prediction(pred_header(), make_prediction())
    rgba = window.overlay_rgba()
    assert rgba.shape == (NY, NX, 4) and rgba.dtype == np.uint8
    inside = rgba[SQUARE].astype(int)
    dna = np.array(STRUCTURE_COLORS["dna"])
    # dna colour, tinted at most slightly by the other channels' faint noise
    assert np.abs(inside[..., :3] - dna).max() <= 40
    assert np.abs(inside[..., :3].mean(axis=(0, 1)) - dna).max() <= 12
    assert inside[..., 3].min() >= 170  # ~ opacity 0.7 * 255
    outside = rgba.astype(int)
    outside[SQUARE] = 0
    assert outside[..., 3].max() <= 64  # noise stays faint...
    assert outside[..., 3].mean() <= 10  # ...and ~transparent overall

    after = window_pixel(window, window.grab().toImage(), *INSIDE)
    assert after != before
    assert after[2] > after[0]  # blue tint dominates where dna is
    assert window.n_stacks == 1 and window.n_predictions == 1
    assert "seq 0" in window.status.text()


def test_unticking_dna_removes_it(window: LiveWindow) -> None:
    window.show_stack(stack_header(), make_stack())
    window.show_prediction(pred_header(), make_prediction())
    assert window.overlay_rgba()[INSIDE][3] > 150
    assert window._checks["dna"].isChecked()

    window._checks["dna"].setChecked(False)  # the user unticks the box
    alpha = window.overlay_rgba()[..., 3].astype(int)
    assert alpha[SQUARE].max() <= 64 and alpha[SQUARE].mean() <= 10  # only noise left
    assert not np.any(np.all(window.overlay_rgba()[SQUARE][..., :3] == STRUCTURE_COLORS["dna"], axis=-1))

    window.set_structure_visible("dna", True)
    assert window._checks["dna"].isChecked()
    assert window.overlay_rgba()[INSIDE][3] > 150


def test_z_slider_changes_base_image(window: LiveWindow) -> None:
    stack = make_stack()
    window.show_stack(stack_header(), stack)
    np.testing.assert_array_equal(window.base_image(), stack[NZ // 2])
    grab_mid = window.grab().toImage()

    window.z_slider.setValue(0)
    np.testing.assert_array_equal(window.base_image(), stack[0])
    assert window.z_label.text().startswith("z 0/")
    assert window.grab().toImage() != grab_mid

    window.set_plane(NZ + 10)  # clamped
    assert window.z_slider.value() == NZ - 1
    np.testing.assert_array_equal(window.base_image(), stack[NZ - 1])

    window.show_stack(stack_header(seq=1), stack)  # same depth: the chosen plane stays
    assert window.z_slider.value() == NZ - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_subscriber_receives_valid_and_drops_malformed() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(endpoint)
    sub = DisplaySubscriber(endpoint, ctx=ctx)
    stack = make_stack()
    try:
        got_stack = None
        deadline = time.monotonic() + 5.0
        while got_stack is None and time.monotonic() < deadline:  # PUB/SUB slow joiner
            pub.send_multipart(encode(stack_header(seq=3), stack), copy=False)
            time.sleep(0.05)
            got_stack, got_pred, dropped = sub.poll_latest()
            assert got_pred is None and dropped == 0
        assert got_stack is not None, "no stack received within 5 s"
        header, array = got_stack
        assert header.kind == "stack" and header.seq == 3
        np.testing.assert_array_equal(array, stack)
        assert array.flags.writeable  # a copy, not a view of the zmq frame

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
        assert got_pred.array.shape == (len(STRUCTURES), NZ, NY, NX)
        assert sub.poll_latest() == (None, None, 0)  # drained
    finally:
        sub.close()
        pub.close()
        ctx.term()


def test_subscriber_keeps_only_newest() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(endpoint)
    sub = DisplaySubscriber(endpoint, ctx=ctx)
    try:
        deadline = time.monotonic() + 5.0
        while sub.poll_latest()[0] is None and time.monotonic() < deadline:  # join
            pub.send_multipart(encode(stack_header(seq=0), make_stack()), copy=False)
            time.sleep(0.05)
        for seq in (1, 2, 3):
            pub.send_multipart(encode(stack_header(seq=seq), make_stack()), copy=False)
        time.sleep(0.3)
        got, _, _ = sub.poll_latest()
        assert got is not None and got.header.seq == 3
    finally:
        sub.close()
        pub.close()
        ctx.term()


def test_run_viewer_screenshots_once_a_prediction_arrives(qapp, tmp_path: pathlib.Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
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
        t0 = time.monotonic()
        assert run_viewer(endpoint, screenshot=shot, screenshot_after_s=10.0) == 0
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        thread.join(5)
    assert elapsed < 10.0  # saved on the prediction, not on the timeout
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
    assert code == 0 and shot.exists()
    assert 0.3 <= time.monotonic() - t0 < 5.0

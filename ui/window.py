"""The live viewer window: brightfield plane in grey with predicted structures on top.

Drawing never blocks receipt: the window keeps only the newest stack and the newest
prediction, a timer polls the subscriber (draining its queue) and redraws only when
something new arrived. The newest stack and newest prediction are shown together even
when the prediction belongs to an earlier stack, because predictions lag acquisition
and waiting for a match would leave the overlay blank most of the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets

from livestain.ui.colors import structure_color
from livestain.ui.subscriber import DisplaySubscriber
from livestain.wire import StackHeader

#: Poll interval of the subscriber (10 Hz is smooth enough and leaves CPU for the daemon).
POLL_MS = 100
#: Grey display levels of the brightfield plane, as percentiles (robust to hot pixels).
BASE_PERCENTILES = (1.0, 99.5)
#: Overlay ramp per structure: transparent at the median (background), opaque near the max.
OVERLAY_PERCENTILES = (50.0, 99.8)
#: Smallest overlay ramp, in the predictions' (z-scored) units: a plane whose brightest
#: pixels are less than this above its median holds no structure, only noise, which a
#: pure percentile ramp would stretch to full opacity.
MIN_OVERLAY_SPAN = 1.0
#: Percentiles are estimated on at most about this many pixels per axis, for speed.
PERCENTILE_SAMPLE = 512


@dataclass
class _Received:
    header: StackHeader
    array: np.ndarray
    received_at: float


def _latency(msg: _Received) -> str:
    since = msg.header.acquired_end or msg.header.sent_at
    return f"{msg.received_at - since:.2f}s" if since else "?"


def _percentiles(
    plane: np.ndarray, q: tuple[float, float], min_span: float = 1e-6
) -> tuple[float, float]:
    """Low/high percentiles of a plane on a strided subsample; hi >= lo + min_span."""
    step = max(1, max(plane.shape) // PERCENTILE_SAMPLE)
    lo, hi = np.percentile(plane[::step, ::step], q)
    return float(lo), float(max(hi, lo + min_span))


def composite_overlay(
    planes: np.ndarray, colors: list[tuple[int, int, int]], opacity: float
) -> np.ndarray:
    """Alpha-composite structure planes [s, y, x] into one straight-alpha RGBA uint8 image.

    Each structure's alpha ramps from 0 at its plane's median to ``opacity`` at its
    99.8th percentile (but over at least `MIN_OVERLAY_SPAN`), so the overlay adapts to
    each model's output scale without amplifying empty planes. Colours mix
    by alpha weight; coverage is ``1 - prod(1 - alpha)`` (independent layers).
    """
    ny, nx = planes.shape[1:]
    premult = np.zeros((ny, nx, 3), np.float32)
    clear = np.ones((ny, nx), np.float32)
    weight = np.zeros((ny, nx), np.float32)
    for plane, color in zip(planes, colors):
        lo, hi = _percentiles(plane, OVERLAY_PERCENTILES, MIN_OVERLAY_SPAN)
        alpha = np.clip((plane.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * opacity
        premult += alpha[..., None] * np.asarray(color, np.float32)
        weight += alpha
        clear *= 1.0 - alpha
    rgba = np.zeros((ny, nx, 4), np.uint8)
    covered = weight > 0
    rgba[covered, :3] = np.clip(premult[covered] / weight[covered, None], 0, 255).round()
    rgba[..., 3] = np.clip((1.0 - clear) * 255, 0, 255).round()
    return rgba


class LiveWindow(QtWidgets.QMainWindow):
    """Brightfield plane (grey) with an RGBA overlay of the visible predicted structures."""

    #: Emitted when the window is closed, so whoever runs the event loop can stop it.
    closed = QtCore.Signal()

    def __init__(self, opacity: float = 0.7, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("livestain viewer")
        self.opacity = opacity
        self._stack: _Received | None = None
        self._pred: _Received | None = None
        self._z = 0
        self._nz = 0
        self._visible: dict[str, bool] = {}
        self._checks: dict[str, QtWidgets.QCheckBox] = {}
        self._subscriber: DisplaySubscriber | None = None
        self.n_stacks = 0
        self.n_predictions = 0
        self.n_malformed = 0
        self._overlay = np.zeros((1, 1, 4), np.uint8)
        self._base = np.zeros((1, 1), np.uint16)

        self.graphics = pg.GraphicsLayoutWidget()
        self.view = self.graphics.addViewBox(lockAspect=True, invertY=True)
        self.base_item = pg.ImageItem(axisOrder="row-major")
        self.overlay_item = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.base_item)
        self.view.addItem(self.overlay_item)
        self.overlay_item.setZValue(1)

        self.z_slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.z_slider.setRange(0, 0)
        self.z_slider.valueChanged.connect(self.set_plane)
        self.z_label = QtWidgets.QLabel("z 0/0")
        self.status = QtWidgets.QLabel("waiting for data…")
        self.status.setWordWrap(True)
        self._checks_row = QtWidgets.QHBoxLayout()
        self._checks_row.addStretch(1)

        controls = QtWidgets.QHBoxLayout()
        controls.addWidget(self.z_label)
        controls.addWidget(self.z_slider, 1)
        controls.addLayout(self._checks_row)
        central = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(central)
        layout.addWidget(self.graphics, 1)
        layout.addLayout(controls)
        layout.addWidget(self.status)
        self.setCentralWidget(central)
        self.resize(900, 800)

        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 (Qt override)
        """Stop polling; closing only closes this viewer, the daemon is never told."""
        self._timer.stop()
        super().closeEvent(event)
        self.closed.emit()

    # -- data in -----------------------------------------------------------------------

    def attach(self, subscriber: DisplaySubscriber) -> None:
        """Poll ``subscriber`` at 10 Hz from now on (the window does not own or close it)."""
        self._subscriber = subscriber
        self._timer.start()

    def show_stack(self, header: StackHeader, array: np.ndarray) -> None:
        """Show a new brightfield stack [z, y, x] (replaces the previous one)."""
        self.n_stacks += 1
        self._set_stack(header, array)
        self._redraw()

    def show_prediction(self, header: StackHeader, array: np.ndarray) -> None:
        """Show a new prediction [structure, z, y, x] (replaces the previous one)."""
        self.n_predictions += 1
        self._set_prediction(header, array)
        self._redraw()

    def _set_stack(self, header: StackHeader, array: np.ndarray) -> None:
        self._stack = _Received(header, array, time.time())
        self._sync_slider(array.shape[0])

    def _set_prediction(self, header: StackHeader, array: np.ndarray) -> None:
        self._pred = _Received(header, array, time.time())
        for name in header.structures:
            if name not in self._checks:
                self._add_check(name)
        if self._stack is None:
            self._sync_slider(array.shape[1])

    def _poll(self) -> None:
        """Drain the subscriber; redraw once if anything new arrived."""
        if self._subscriber is None:
            return
        before = dict(self._subscriber.received)
        stack, pred, dropped = self._subscriber.poll_latest()
        # Count everything received, also messages a newer one superseded in this poll.
        self.n_stacks += self._subscriber.received["stack"] - before["stack"]
        self.n_predictions += self._subscriber.received["prediction"] - before["prediction"]
        self.n_malformed += dropped
        if stack is not None:
            self._set_stack(*stack)
        if pred is not None:
            self._set_prediction(*pred)
        if stack is not None or pred is not None:
            self._redraw()
        elif dropped:
            self.status.setText(self._status_text())

    # -- controls ----------------------------------------------------------------------

    def set_plane(self, z: int) -> None:
        """Show plane ``z`` (clamped to the stack)."""
        z = int(np.clip(z, self.z_slider.minimum(), self.z_slider.maximum()))
        if self.z_slider.value() != z:
            self.z_slider.setValue(z)  # re-enters via valueChanged
            return
        self._z = z
        self._redraw()

    def set_structure_visible(self, name: str, visible: bool) -> None:
        """Show or hide one structure's overlay (remembered for later predictions too)."""
        self._visible[name] = visible
        check = self._checks.get(name)
        if check is not None and check.isChecked() != visible:
            check.setChecked(visible)  # re-enters via toggled
            return
        self._redraw()

    def _sync_slider(self, nz: int) -> None:
        """Fit the slider to a depth; jump to the middle plane only when the depth changes,
        so the user's chosen plane survives new stacks of the same run."""
        if nz == self._nz:
            return
        self._nz = nz
        self.z_slider.blockSignals(True)
        self.z_slider.setRange(0, nz - 1)
        self.z_slider.setValue(nz // 2)
        self.z_slider.blockSignals(False)
        self._z = nz // 2

    def _add_check(self, name: str) -> None:
        check = QtWidgets.QCheckBox(name)
        r, g, b = structure_color(name)
        check.setStyleSheet(f"QCheckBox {{ color: rgb({r},{g},{b}); }}")
        check.setChecked(self._visible.setdefault(name, True))
        check.toggled.connect(lambda on, n=name: self.set_structure_visible(n, on))
        self._checks[name] = check
        self._checks_row.insertWidget(self._checks_row.count() - 1, check)
        check.show()  # a child added to a shown window stays hidden until the event loop runs

    # -- drawing -----------------------------------------------------------------------

    def base_image(self) -> np.ndarray:
        """The brightfield plane shown now, raw values (y, x); 1x1 zeros before any stack."""
        return self._base

    def overlay_rgba(self) -> np.ndarray:
        """The overlay shown now as straight-alpha RGBA uint8 (y, x, 4)."""
        return self._overlay

    def _redraw(self) -> None:
        """Redraw base and overlay for the current plane; refit the view on a new size."""
        old_shape = (self._base.shape, self._overlay.shape[:2])
        if self._stack is not None:
            self._base = self._stack.array[min(self._z, self._stack.array.shape[0] - 1)]
            lo, hi = _percentiles(self._base, BASE_PERCENTILES)
            self.base_item.setImage(self._base, levels=(lo, hi), autoLevels=False)
        self._overlay = self._compute_overlay()
        self.overlay_item.setImage(self._overlay, autoLevels=False, levels=(0, 255))
        if self._stack is not None:
            ny, nx = self._base.shape
            self.overlay_item.setRect(QtCore.QRectF(0, 0, nx, ny))  # stretch if sizes differ
        if (self._base.shape, self._overlay.shape[:2]) != old_shape:
            self.view.autoRange(padding=0)
        self.z_label.setText(f"z {self._z}/{max(self.z_slider.maximum(), 0)}")
        self.status.setText(self._status_text())

    def _compute_overlay(self) -> np.ndarray:
        if self._pred is None:
            ny, nx = self._base.shape
            return np.zeros((ny, nx, 4), np.uint8)
        header, pred = self._pred.header, self._pred.array
        z = min(self._z, pred.shape[1] - 1)
        shown = [i for i, n in enumerate(header.structures) if self._visible.get(n, True)]
        colors = [structure_color(header.structures[i]) for i in shown]
        planes = pred[shown, z] if shown else np.zeros((0,) + pred.shape[2:], pred.dtype)
        return composite_overlay(planes, colors, self.opacity)

    def _status_text(self) -> str:
        """Run/t/p/seq of the shown data, counts, and latencies.

        Latency is receipt time minus the end of acquisition (what the user waits for),
        falling back to the send time when the header does not carry acquisition times.
        """
        parts = []
        if self._stack is not None:
            h = self._stack.header
            parts.append(f"run {h.run_id}  t {h.t}  p {h.p}  seq {h.seq}")
            parts.append(f"stack latency {_latency(self._stack)}")
        if self._pred is not None:
            h = self._pred.header
            parts.append(f"prediction of seq {h.source_seq}, latency {_latency(self._pred)}")
        parts.append(f"received: stacks {self.n_stacks}  predictions {self.n_predictions}")
        if self.n_malformed:
            parts.append(f"malformed {self.n_malformed}")
        return "   ".join(parts)

"""What the user chose to look at: position, time point (or live), z plane, projection
mode and the crosshair, with the two rows of controls that choose them.

Kept apart from the window so the rules of choosing live in one place: live mode
follows the newest stack of the position; scrubbing back stays on a time point until
it is evicted from history (then back to live); a new stack shape resets the plane to
the middle and centres the crosshair, while new stacks of the same shape keep the
user's choices. The window only asks `shown` what to draw and redraws on `changed`.
"""

from __future__ import annotations

import numpy as np
from PySide6 import QtCore, QtWidgets

from livestain.ui import render
from livestain.ui.history import History, Received


class NavigationBar(QtWidgets.QWidget):
    """Position, projection mode, z slider (first row); time scrubber and live (second)."""

    #: Something the user chose changed what should be drawn.
    changed = QtCore.Signal()

    def __init__(self, history: History, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.history = history
        self.p: int | None = None
        self.t: int | None = None  # shown time point when not live
        self.live = True
        self.z = 0
        self.mode = "plane"
        self.cross: tuple[int, int] | None = None
        self.shape: tuple[int, int, int] | None = None  # (nz, ny, nx) of what is shown
        self._build()

    def _build(self) -> None:
        self.position_combo = QtWidgets.QComboBox()
        self.position_combo.setToolTip("stage position (positions seen so far)")
        self.position_combo.setSizeAdjustPolicy(QtWidgets.QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.position_combo.currentIndexChanged.connect(self._position_chosen)
        self.mode_combo = QtWidgets.QComboBox()
        self.mode_combo.addItems(list(render.MODES))
        self.mode_combo.setToolTip("plane: the z slider's plane; focus: the sharpest plane of each "
                                   "stack; max / mean: projections over z")
        self.mode_combo.currentTextChanged.connect(self.set_mode)
        self.z_slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.z_slider.setRange(0, 0)
        self.z_slider.valueChanged.connect(self.set_plane)
        self.z_label = QtWidgets.QLabel("z 0/0")
        self.time_slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.time_slider.setRange(0, 0)
        self.time_slider.valueChanged.connect(self._time_chosen)
        self.time_label = QtWidgets.QLabel("t —")
        self.live_check = QtWidgets.QCheckBox("live")
        self.live_check.setChecked(True)
        self.live_check.toggled.connect(self.set_live)
        for w in (self.time_slider, self.time_label):
            w.setToolTip(f"recent time points of this position held in memory: "
                         f"{self.history.describe()}")

        row1 = QtWidgets.QHBoxLayout()
        row1.addWidget(self.position_combo)
        row1.addWidget(self.mode_combo)
        row1.addWidget(self.z_label)
        row1.addWidget(self.z_slider, 1)
        row2 = QtWidgets.QHBoxLayout()
        row2.addWidget(self.time_label)
        row2.addWidget(self.time_slider, 1)
        row2.addWidget(self.live_check)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row1)
        lay.addLayout(row2)

    # -- what arrives ---------------------------------------------------------------

    def add_position(self, p: int) -> None:
        """List position ``p`` (in order) the first time data of it arrives; the first
        position seen is shown."""
        if self.position_combo.findData(p) >= 0:
            return
        held = [self.position_combo.itemData(i) for i in range(self.position_combo.count())]
        index = sum(1 for q in held if q < p)
        self.position_combo.insertItem(index, f"position {p}", p)
        if self.p is None:
            self.position_combo.setCurrentIndex(index)  # -> _position_chosen

    def new_run(self) -> None:
        """Forget the previous run's positions and go live."""
        self.position_combo.blockSignals(True)
        self.position_combo.clear()
        self.position_combo.blockSignals(False)
        self.p, self.t, self.live = None, None, True
        self.live_check.setChecked(True)

    # -- user choices -----------------------------------------------------------------

    def set_plane(self, z: int) -> None:
        """Show plane ``z`` (clamped to the stack)."""
        z = int(np.clip(z, self.z_slider.minimum(), self.z_slider.maximum()))
        if self.z_slider.value() != z:
            self.z_slider.setValue(z)  # re-enters via valueChanged
            return
        self.z = z
        self.changed.emit()

    def set_mode(self, mode: str) -> None:
        """``plane``, ``focus`` (sharpest plane), ``max`` or ``mean`` projection."""
        if mode not in render.MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {render.MODES}")
        if self.mode_combo.currentText() != mode:
            self.mode_combo.setCurrentText(mode)  # re-enters via currentTextChanged
            return
        self.mode = mode
        self.z_slider.setEnabled(mode == "plane")
        self.changed.emit()

    def set_position(self, p: int) -> None:
        """Show stage position ``p`` (must have been received)."""
        index = self.position_combo.findData(p)
        if index < 0:
            raise KeyError(f"no data received for position {p}")
        self.position_combo.setCurrentIndex(index)
        self._position_chosen(index)

    def set_live(self, live: bool) -> None:
        """Follow the newest data (True) or stay on the time point chosen with the scrubber."""
        self.live = bool(live)
        if self.live_check.isChecked() != self.live:
            self.live_check.blockSignals(True)
            self.live_check.setChecked(self.live)
            self.live_check.blockSignals(False)
        if not self.live and self.t is None and self.p is not None:
            times = self.history.times(self.p)
            self.t = times[-1] if times else None
        self.changed.emit()

    def set_time(self, t: int) -> None:
        """Show time point ``t`` of the current position from history (leaves live mode
        unless ``t`` is the newest time point held)."""
        times = self.history.times(self.p) if self.p is not None else []
        if t not in times:
            raise KeyError(f"time point {t} is not in history (held: {times})")
        self.time_slider.setValue(times.index(t))
        self._time_chosen(times.index(t))

    def set_crosshair(self, x: int, y: int) -> None:
        """Sections through full-resolution pixel (x, y): XZ at row y, YZ at column x."""
        if self.shape is None:
            self.cross = (int(x), int(y))
        else:
            _, ny, nx = self.shape
            self.cross = (int(np.clip(x, 0, nx - 1)), int(np.clip(y, 0, ny - 1)))
        self.changed.emit()

    def _position_chosen(self, index: int) -> None:
        p = self.position_combo.itemData(index)
        if p is None or p == self.p:
            return
        self.p, self.t = p, None
        self.set_live(True)

    def _time_chosen(self, index: int) -> None:
        times = self.history.times(self.p) if self.p is not None else []
        if not times:
            return
        index = min(max(index, 0), len(times) - 1)
        self.t = times[index]
        self.set_live(index == len(times) - 1)

    # -- what to draw -----------------------------------------------------------------

    def shown(self) -> tuple[Received | None, Received | None]:
        """The stack and prediction records to show now."""
        if self.p is None:
            return None, None
        if not self.live and self.t is not None:
            entry = self.history.get(self.p, self.t)
            if entry is not None:
                return entry.stack, entry.prediction
            self.live = True  # evicted: back to live
            self.live_check.setChecked(True)
        return self.history.newest(self.p, "stack"), self.history.newest(self.p, "prediction")

    def fit(self, nz: int, ny: int, nx: int) -> None:
        """Fit the z slider to a depth; jump to the middle plane (and centre the crosshair)
        only when the shape changes, so the user's choices survive new stacks."""
        if self.shape == (nz, ny, nx):
            return
        if self.shape is None or self.shape[0] != nz:
            self.z_slider.blockSignals(True)
            self.z_slider.setRange(0, nz - 1)
            self.z_slider.setValue(nz // 2)
            self.z_slider.blockSignals(False)
            self.z = nz // 2
        if self.shape is None and self.cross is not None:  # chosen before any data
            self.cross = (int(np.clip(self.cross[0], 0, nx - 1)), int(np.clip(self.cross[1], 0, ny - 1)))
        elif self.shape is None or self.shape[1:] != (ny, nx):
            self.cross = (nx // 2, ny // 2)
        self.shape = (nz, ny, nx)
        self.z = min(self.z, nz - 1)

    def drawn(self, z: int, nz: int) -> None:
        """Show the plane a redraw drew: in focus mode the sharpest plane becomes the
        slider's plane, so leaving focus mode stays on it."""
        if self.mode == "focus":
            self.z = z
            self.z_slider.blockSignals(True)
            self.z_slider.setValue(z)
            self.z_slider.blockSignals(False)
        suffix = "" if self.mode == "plane" else f" ({self.mode})"
        self.z_label.setText(f"z {z}/{nz - 1}{suffix}")

    def sync_time_slider(self) -> None:
        """Fit the scrubber to the time points held for the position, and say which one
        is shown."""
        times = self.history.times(self.p) if self.p is not None else []
        self.time_slider.blockSignals(True)
        self.time_slider.setRange(0, max(len(times) - 1, 0))
        if times:
            if self.live or self.t not in times:
                self.time_slider.setValue(len(times) - 1)
            else:
                self.time_slider.setValue(times.index(self.t))
        self.time_slider.blockSignals(False)
        if not times:
            self.time_label.setText("t —")
        elif self.live:
            self.time_label.setText(f"t {times[-1]} (live; history t {times[0]}–{times[-1]})")
        else:
            self.time_label.setText(f"t {self.t} (history t {times[0]}–{times[-1]})")

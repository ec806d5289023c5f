"""Per-structure display controls: visibility, colour, opacity and contrast.

One row per predicted structure, added the first time a prediction names it, and kept
for the whole session so the user's choices survive new predictions and new runs.
Contrast is automatic by default (percentiles of the prediction, which adapt to each
model's output scale) or manual (fixed min/max in prediction units, for comparing
time points without the auto ramp re-normalising each one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from livestain.ui.colors import structure_color
from livestain.wire import UNCERTAINTY_SUFFIX
from livestain.ui.render import OVERLAY_PERCENTILES, RGB


@dataclass
class StructureStyle:
    """How one structure is drawn."""

    color: RGB
    visible: bool = True
    opacity: float = 0.7
    auto: bool = True
    percentiles: tuple[float, float] = OVERLAY_PERCENTILES
    vmin: float = 0.0
    vmax: float = 1.0


class StructurePanel(QtWidgets.QGroupBox):
    """Rows of controls; emits ``changed`` whenever any style changes."""

    changed = QtCore.Signal()

    def __init__(self, default_opacity: float = 0.7, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__("structures", parent)
        self.default_opacity = default_opacity
        self.styles: dict[str, StructureStyle] = {}
        self.checks: dict[str, QtWidgets.QCheckBox] = {}
        self.color_buttons: dict[str, QtWidgets.QPushButton] = {}
        self.opacity_sliders: dict[str, QtWidgets.QSlider] = {}
        self.auto_checks: dict[str, QtWidgets.QCheckBox] = {}
        self.min_spins: dict[str, QtWidgets.QDoubleSpinBox] = {}
        self.max_spins: dict[str, QtWidgets.QDoubleSpinBox] = {}
        self._grid = QtWidgets.QGridLayout(self)
        self._grid.setColumnStretch(0, 1)
        for col, text in enumerate(("show", "", "opacity", "auto", "min", "max")):
            self._grid.addWidget(QtWidgets.QLabel(text), 0, col)
        self.setToolTip("auto contrast: transparent at the median, opaque at the 99.8th "
                        "percentile of the prediction; untick auto for fixed min/max")
        # shown once a prediction carries uncertainty channels (a worker with --uncertainty)
        self.uncertainty_check = QtWidgets.QCheckBox("show uncertainty instead of the structures")
        self.uncertainty_check.setToolTip(
            "each structure's per-voxel uncertainty (expected absolute error, z-score units: "
            "8 rotated and flipped predictions' spread); bright = do not trust the overlay there")
        self.uncertainty_check.setVisible(False)
        self.uncertainty_check.toggled.connect(self.show_uncertainty)
        self._grid.addWidget(self.uncertainty_check, 999, 0, 1, 6)

    def ensure(self, name: str) -> StructureStyle:
        """The style of ``name``, adding its row on first sight."""
        if name in self.styles:
            return self.styles[name]
        # an uncertainty channel takes its structure's colour: toggled in, it reads as
        # "this structure, where unsure"
        base = name[: -len(UNCERTAINTY_SUFFIX)] if name.endswith(UNCERTAINTY_SUFFIX) else name
        style = self.styles[name] = StructureStyle(structure_color(base), opacity=self.default_opacity)
        row = len(self.styles)
        check = QtWidgets.QCheckBox(name)
        if name.endswith(UNCERTAINTY_SUFFIX):  # hidden until the user asks for it
            style.visible = self.uncertainty_check.isChecked()
            self.uncertainty_check.setVisible(True)
        check.setChecked(style.visible)
        check.toggled.connect(lambda on, n=name: self.set_visible(n, on))
        color = QtWidgets.QPushButton()
        color.setFixedWidth(28)
        color.setToolTip(f"colour of {name}")
        color.clicked.connect(lambda _=False, n=name: self._pick_color(n))
        opacity = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        opacity.setRange(0, 100)
        opacity.setMaximumWidth(70)
        opacity.setValue(round(style.opacity * 100))
        opacity.setToolTip(f"opacity of {name} where it is brightest")
        opacity.valueChanged.connect(lambda v, n=name: self.set_opacity(n, v / 100))
        auto = QtWidgets.QCheckBox()
        auto.setChecked(True)
        auto.toggled.connect(lambda on, n=name: self._on_auto(n, on))
        spins = []
        for _ in range(2):
            spin = QtWidgets.QDoubleSpinBox()
            spin.setRange(-1e6, 1e6)
            spin.setDecimals(2)
            spin.setEnabled(False)
            spin.setKeyboardTracking(False)
            spin.setMaximumWidth(66)
            spin.valueChanged.connect(lambda _v, n=name: self._on_spin(n))
            spins.append(spin)
        for col, w in enumerate((check, color, opacity, auto, *spins)):
            self._grid.addWidget(w, row, col)
            w.show()  # children added to a shown window stay hidden until shown
        self.checks[name], self.color_buttons[name] = check, color
        self.opacity_sliders[name], self.auto_checks[name] = opacity, auto
        self.min_spins[name], self.max_spins[name] = spins
        self._paint(name)
        return style

    # -- setters (also the API tests and scripts use) ---------------------------------

    def show_uncertainty(self, on: bool) -> None:
        """Swap every structure that has an uncertainty channel for it (or back)."""
        for name in list(self.styles):
            if name.endswith(UNCERTAINTY_SUFFIX):
                base = name[: -len(UNCERTAINTY_SUFFIX)]
                self.set_visible(name, on)
                if base in self.styles:
                    self.set_visible(base, not on)
        self._quiet(self.uncertainty_check, lambda w: w.setChecked(on))

    def set_visible(self, name: str, visible: bool) -> None:
        self.ensure(name).visible = visible
        self._quiet(self.checks[name], lambda w: w.setChecked(visible))
        self.changed.emit()

    def set_color(self, name: str, color: RGB) -> None:
        self.ensure(name).color = tuple(int(c) for c in color)  # type: ignore[assignment]
        self._paint(name)
        self.changed.emit()

    def set_opacity(self, name: str, opacity: float) -> None:
        self.ensure(name).opacity = float(min(max(opacity, 0.0), 1.0))
        self._quiet(self.opacity_sliders[name], lambda w: w.setValue(round(opacity * 100)))
        self.changed.emit()

    def set_manual(self, name: str, vmin: float, vmax: float) -> None:
        """Fixed contrast: transparent at ``vmin``, full opacity at ``vmax``."""
        style = self.ensure(name)
        style.auto, style.vmin, style.vmax = False, float(vmin), float(vmax)
        self._quiet(self.auto_checks[name], lambda w: w.setChecked(False))
        for spin, v in ((self.min_spins[name], vmin), (self.max_spins[name], vmax)):
            spin.setEnabled(True)
            self._quiet(spin, lambda w, v=v: w.setValue(v))
        self.changed.emit()

    def set_auto(self, name: str, percentiles: tuple[float, float] | None = None) -> None:
        style = self.ensure(name)
        style.auto = True
        if percentiles is not None:
            style.percentiles = percentiles
        self._quiet(self.auto_checks[name], lambda w: w.setChecked(True))
        for spin in (self.min_spins[name], self.max_spins[name]):
            spin.setEnabled(False)
        self.changed.emit()

    def show_levels(self, name: str, lo: float, hi: float) -> None:
        """Display the automatic levels in use (no signal: they are outputs, not inputs)."""
        if name in self.styles and self.styles[name].auto:
            self._quiet(self.min_spins[name], lambda w: w.setValue(lo))
            self._quiet(self.max_spins[name], lambda w: w.setValue(hi))

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _quiet(widget: QtWidgets.QWidget, action: Callable[[Any], object]) -> None:
        widget.blockSignals(True)
        try:
            action(widget)
        finally:
            widget.blockSignals(False)

    def _paint(self, name: str) -> None:
        r, g, b = self.styles[name].color
        self.checks[name].setStyleSheet(f"QCheckBox {{ color: rgb({r},{g},{b}); }}")
        self.color_buttons[name].setStyleSheet(f"background-color: rgb({r},{g},{b});")

    def _pick_color(self, name: str) -> None:
        r, g, b = self.styles[name].color
        chosen = QtWidgets.QColorDialog.getColor(QtGui.QColor(r, g, b), self, f"colour of {name}")
        if chosen.isValid():
            self.set_color(name, (chosen.red(), chosen.green(), chosen.blue()))

    def _on_auto(self, name: str, on: bool) -> None:
        if on:
            self.set_auto(name)
        else:  # start manual contrast from the levels auto was using
            self.set_manual(name, self.min_spins[name].value(), self.max_spins[name].value())

    def _on_spin(self, name: str) -> None:
        if not self.styles[name].auto:
            self.set_manual(name, self.min_spins[name].value(), self.max_spins[name].value())

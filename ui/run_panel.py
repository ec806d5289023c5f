"""The window's right-hand column: how the run is doing, and what to do about it.

Run figures (`StatusPanel`), the focus and check-frame plots, the pause / resume /
stop buttons and the structures' display settings, stacked in that order: the
questions a microscopist asks walking up to the scope (is it running, is it in focus,
can I trust it) come before the knobs. Everything here is fed by the daemon's status
through one `ControlClient`.
"""

from __future__ import annotations

from PySide6 import QtWidgets

from livestain.ui.control_bar import ControlBar
from livestain.ui.control_client import ControlClient
from livestain.ui.focus_plot import CheckPlot, FocusPlot
from livestain.ui.status_panel import StatusPanel
from livestain.ui.structure_panel import StructurePanel


class RunPanel(QtWidgets.QWidget):
    """Status figures, focus and check plots, control buttons, structure styles."""

    def __init__(self, opacity: float, confirm_stop: bool, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumWidth(400)
        self.setMaximumWidth(520)
        self.status = StatusPanel()
        self.focus_plot = FocusPlot()
        self.check_plot = CheckPlot()
        self.controls = ControlBar(confirm_stop)
        self.structures = StructurePanel(opacity)
        lay = QtWidgets.QVBoxLayout(self)
        for widget in (self.status, self.focus_plot, self.check_plot, self.controls, self.structures):
            lay.addWidget(widget)
        lay.addStretch(1)

    def attach(self, client: ControlClient) -> None:
        """Show ``client``'s status replies and send the buttons' commands through it."""
        client.status.connect(self.status.show_status)
        client.status.connect(self.focus_plot.add_status)
        client.status.connect(self.check_plot.add_status)
        client.not_answering.connect(self.status.show_not_answering)
        self.controls.attach(client)

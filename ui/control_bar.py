"""Pause / Resume / Stop buttons, sent through a `ControlClient`.

Buttons are enabled only for what the daemon's last status allows (Pause while
acquiring, Resume while paused) and all disabled while it is not answering, so a click
never goes nowhere silently. Stop asks first: it cannot be undone from the viewer (the
run continues only with ``--resume`` from the command line), and one stray click must
not end a three-day experiment.
"""

from __future__ import annotations

from typing import Any

from PySide6 import QtWidgets

from livestain.ui.control_client import ControlClient


class ControlBar(QtWidgets.QWidget):
    """The three buttons and a line saying what became of the last command."""

    def __init__(self, confirm_stop: bool = True, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.confirm_stop = confirm_stop
        self.client: ControlClient | None = None
        self.run_id = "this run"
        self.pause_button = QtWidgets.QPushButton("Pause")
        self.resume_button = QtWidgets.QPushButton("Resume")
        self.stop_button = QtWidgets.QPushButton("Stop…")
        self.pause_button.setToolTip("pause acquisition after the current frame")
        self.stop_button.setToolTip("end the run after the current frame (asks first)")
        self.pause_button.clicked.connect(self.pause)
        self.resume_button.clicked.connect(self.resume)
        self.stop_button.clicked.connect(self._stop_clicked)
        self.command_label = QtWidgets.QLabel("")
        self.command_label.setWordWrap(True)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QtWidgets.QHBoxLayout()
        for b in self.buttons:
            b.setEnabled(False)
            row.addWidget(b)
        layout.addLayout(row)
        layout.addWidget(self.command_label)

    @property
    def buttons(self) -> tuple[QtWidgets.QPushButton, ...]:
        return (self.pause_button, self.resume_button, self.stop_button)

    def attach(self, client: ControlClient) -> None:
        """Send commands through ``client`` and follow its status for the button states."""
        self.client = client
        client.status.connect(self.show_status)
        client.not_answering.connect(self.show_not_answering)
        client.command_done.connect(self.show_command_done)

    def pause(self) -> bool:
        return self._send("pause")

    def resume(self) -> bool:
        return self._send("resume")

    def stop(self, confirm: bool | None = None) -> bool:
        """Ask the daemon to stop; True if the command was sent. Asks the user first
        unless ``confirm`` (default: ``confirm_stop``) is False."""
        if self.confirm_stop if confirm is None else confirm:
            answer = QtWidgets.QMessageBox.question(
                self, "Stop acquisition?",
                f"Stop {self.run_id} after the current frame?\n\nEverything acquired so far stays "
                f"on disk; continuing needs `livestain run --resume` from the command line.",
                QtWidgets.QMessageBox.StandardButton.Yes | QtWidgets.QMessageBox.StandardButton.No,
                QtWidgets.QMessageBox.StandardButton.No,
            )
            if answer != QtWidgets.QMessageBox.StandardButton.Yes:
                self.command_label.setText("stop: cancelled")
                return False
        return self._send("stop")

    def show_status(self, status: dict[str, Any]) -> None:
        self.run_id = str(status.get("run_id", self.run_id))
        state = status.get("state")
        self.pause_button.setEnabled(state == "acquiring")
        self.resume_button.setEnabled(state == "paused")
        self.stop_button.setEnabled(state in ("acquiring", "paused"))

    def show_not_answering(self, _reason: str) -> None:
        for b in self.buttons:
            b.setEnabled(False)

    def show_command_done(self, command: str, ok: bool, error: str) -> None:
        self.command_label.setText(f"{command}: {'done' if ok else 'failed — ' + error}")

    def _stop_clicked(self) -> None:
        self.stop()

    def _send(self, command: str) -> bool:
        if self.client is None:
            self.command_label.setText(f"{command}: no control connection")
            return False
        self.command_label.setText(f"{command}: sent…")
        self.client.send(command)
        return True

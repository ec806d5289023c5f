"""The live viewer window: brightfield with predicted structures on top, and run health.

Data flow, chosen so the display can never slow the run or fall behind it:

* a 10 Hz timer drains the display subscriber (newest stack and prediction per
  position only) into a bounded `History`; receiving never waits for drawing;
* drawing is requested, not done, on new data or user input, and happens at most
  ``max_draw_hz`` times a second (many slider steps or messages -> one redraw);
* a `ControlClient` polls the daemon's status at 1 Hz without ever blocking and sends
  pause/resume/stop; the `StatusPanel` shows its figures.

Live mode shows the newest stack of the chosen position with its newest prediction,
even when that prediction belongs to an earlier time point: predictions lag
acquisition, and waiting for a match would leave the overlay blank most of the time.
Scrubbing back in time shows the stack and prediction of the same time point.
"""

from __future__ import annotations

import time

import numpy as np
from PySide6 import QtCore, QtGui, QtWidgets

from livestain.ui import render
from livestain.ui.control_client import ControlClient
from livestain.ui.frames import FrameRenderer
from livestain.ui.history import History, Received
from livestain.ui.navigation import NavigationBar
from livestain.ui.run_panel import RunPanel
from livestain.ui.subscriber import DisplaySubscriber
from livestain.ui.views import OrthoViews
from livestain.wire import StackHeader

#: Poll interval of the subscriber when nothing wakes the window (the socket's
#: notifier normally drains a message the moment it arrives; this is the safety net).
POLL_MS = 100
#: Upper bound on redraws per second, whatever arrives or however fast sliders move.
MAX_DRAW_HZ = 10.0


class LiveWindow(QtWidgets.QMainWindow):
    """Image views and time/z/position controls on the left, run panel on the right."""

    #: Emitted when the window is closed, so whoever runs the event loop can stop it.
    closed = QtCore.Signal()
    #: Emitted once per live prediction, the first time it is drawn: its `StackHeader`
    #: and the Unix time of that redraw (composited and handed to the views; Qt paints
    #: it on its next turn). The status panel's latency is measured at the same moment.
    prediction_drawn = QtCore.Signal(object, float)

    def __init__(
        self,
        opacity: float = 0.7,
        history: History | None = None,
        confirm_stop: bool = True,
        max_draw_hz: float = MAX_DRAW_HZ,
        display_max_px: int = render.DISPLAY_MAX_PX,
        parent: QtWidgets.QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("livestain viewer")
        self.history = history or History()
        self._min_draw_s = 1.0 / max_draw_hz
        self._subscriber: DisplaySubscriber | None = None
        self._control: ControlClient | None = None
        self._dirty, self._last_draw = False, 0.0
        self._last_drawn_pred: dict[int, int] = {}
        self.renderer = FrameRenderer(display_max_px)
        self._overlay, self._base = np.zeros((1, 1, 4), np.uint8), np.zeros((1, 1), np.uint16)
        self.n_stacks = self.n_predictions = self.n_malformed = 0  # messages received
        #: Seconds the last redraw took (composite + setImage, not the paint).
        self.last_draw_s = 0.0
        self._build(opacity, confirm_stop)
        self._notifier: QtCore.QSocketNotifier | None = None
        self._poll_timer = QtCore.QTimer(self)
        self._poll_timer.setInterval(POLL_MS)
        self._poll_timer.timeout.connect(self._poll)
        self._draw_timer = QtCore.QTimer(self)
        self._draw_timer.setSingleShot(True)
        self._draw_timer.timeout.connect(self.flush)

    # -- layout ---------------------------------------------------------------------

    def _build(self, opacity: float, confirm_stop: bool) -> None:
        self.views = OrthoViews()
        self.views.crosshair_moved.connect(self.set_crosshair)

        self.navigation = NavigationBar(self.history)
        self.navigation.changed.connect(self._request_draw)
        nav = self.navigation  # its controls, reachable from the window for scripts and tests
        self.position_combo, self.mode_combo = nav.position_combo, nav.mode_combo
        self.z_slider, self.z_label = nav.z_slider, nav.z_label
        self.time_slider, self.time_label, self.live_check = nav.time_slider, nav.time_label, nav.live_check
        self.history_label = QtWidgets.QLabel(self.history.describe())
        self.history_label.setToolTip(self.history.describe())
        self.status = QtWidgets.QLabel("waiting for data…")
        self.status.setWordWrap(True)

        left = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(left)
        lay.addWidget(self.views, 1)
        lay.addWidget(self.navigation)
        lay.addWidget(self.history_label)
        lay.addWidget(self.status)

        self.side = RunPanel(opacity, confirm_stop)
        self.structures = self.side.structures
        self.structures.changed.connect(self._request_draw)
        # its parts and buttons, reachable from the window for scripts and tests
        self.panel, self.controls = self.side.status, self.side.controls
        self.focus_plot, self.check_plot = self.side.focus_plot, self.side.check_plot
        self.pause_button, self.resume_button = self.controls.pause_button, self.controls.resume_button
        self.stop_button, self.command_label = self.controls.stop_button, self.controls.command_label

        splitter = QtWidgets.QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.side)
        splitter.setStretchFactor(0, 1)
        self.setCentralWidget(splitter)
        self.resize(1300, 900)

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 (Qt override)
        """Stop polling; closing only closes this viewer, the daemon is never told."""
        self._poll_timer.stop()
        self._draw_timer.stop()
        if self._notifier is not None:
            self._notifier.setEnabled(False)
        if self._control is not None:
            self._control.stop()
        super().closeEvent(event)
        self.closed.emit()

    # -- data in --------------------------------------------------------------------

    def attach(self, subscriber: DisplaySubscriber) -> None:
        """Take ``subscriber``'s messages as they arrive from now on (the window does not
        own or close it).

        Qt wakes the window on the socket's notification descriptor, so a prediction is
        drawn within one redraw instead of waiting for a timer (a 10 Hz poll added
        ~50 ms on average to what the user sees); the timer stays as a safety net for
        wake-ups ZeroMQ's edge-triggered descriptor does not give.
        """
        self._subscriber = subscriber
        self._poll_timer.start()
        if self._notifier is not None:
            self._notifier.setEnabled(False)
        self._notifier = QtCore.QSocketNotifier(subscriber.fileno(), QtCore.QSocketNotifier.Type.Read, self)
        self._notifier.activated.connect(self._poll)

    def attach_control(self, client: ControlClient) -> None:
        """Show ``client``'s status replies and send the buttons' commands through it
        (the window stops it when closed)."""
        self._control = client
        self.side.attach(client)
        client.start()

    def show_stack(self, header: StackHeader, array: np.ndarray) -> None:
        """Take a stack [z, y, x] and draw now (programmatic feed; the poll path batches)."""
        self.n_stacks += 1
        self.ingest(header, array)
        self.flush()

    def show_prediction(self, header: StackHeader, array: np.ndarray) -> None:
        """Take a prediction [structure, z, y, x] and draw now."""
        self.n_predictions += 1
        self.ingest(header, array)
        self.flush()

    def ingest(self, header: StackHeader, array: np.ndarray) -> Received:
        """Store one message in history and schedule a redraw; never draws itself."""
        if header.run_id != self.history.run_id:
            self._new_run()
        rec = self.history.add(header, array)
        if header.kind == "prediction":
            for name in header.structures:
                self.structures.ensure(name)
            self.panel.set_structures(len(header.structures))
        self.navigation.add_position(header.p)
        self._request_draw()
        return rec

    def _new_run(self) -> None:
        self.navigation.new_run()
        self.renderer.clear()
        self._last_drawn_pred.clear()

    def _poll(self) -> None:
        """Drain the subscriber (all of it, newest per position kept); request one redraw."""
        if self._subscriber is None:
            return
        before = dict(self._subscriber.received)
        messages, dropped = self._subscriber.poll()
        # Count everything received, also messages a newer one superseded in this poll.
        self.n_stacks += self._subscriber.received["stack"] - before["stack"]
        self.n_predictions += self._subscriber.received["prediction"] - before["prediction"]
        self.n_malformed += dropped
        for msg in messages:
            self.ingest(msg.header, msg.array)
        if dropped:
            self.status.setText(self._status_text())

    # -- user controls (see `NavigationBar`) ----------------------------------------------

    def set_plane(self, z: int) -> None:
        """Show plane ``z`` (clamped to the stack)."""
        self.navigation.set_plane(z)

    def set_mode(self, mode: str) -> None:
        """``plane``, ``focus`` (sharpest plane), ``max`` or ``mean`` projection."""
        self.navigation.set_mode(mode)

    def set_structure_visible(self, name: str, visible: bool) -> None:
        """Show or hide one structure's overlay (remembered for later predictions too)."""
        self.structures.set_visible(name, visible)

    def set_position(self, p: int) -> None:
        """Show stage position ``p`` (must have been received)."""
        self.navigation.set_position(p)

    def set_live(self, live: bool) -> None:
        """Follow the newest data (True) or stay on the time point chosen with the scrubber."""
        self.navigation.set_live(live)

    def set_time(self, t: int) -> None:
        """Show time point ``t`` of the current position from history."""
        self.navigation.set_time(t)

    def set_crosshair(self, x: int, y: int) -> None:
        """Sections through full-resolution pixel (x, y): XZ at row y, YZ at column x."""
        self.navigation.set_crosshair(x, y)

    # -- control socket -------------------------------------------------------------

    @property
    def confirm_stop(self) -> bool:
        """Whether Stop asks for confirmation (False for scripts and tests)."""
        return self.controls.confirm_stop

    @confirm_stop.setter
    def confirm_stop(self, value: bool) -> None:
        self.controls.confirm_stop = value

    def pause(self) -> bool:
        return self.controls.pause()

    def resume(self) -> bool:
        return self.controls.resume()

    def stop(self, confirm: bool | None = None) -> bool:
        """Ask the daemon to stop after the current frame (see `ControlBar.stop`)."""
        return self.controls.stop(confirm)

    # -- drawing --------------------------------------------------------------------

    def _request_draw(self) -> None:
        """Mark dirty and draw within the rate bound (coalesces bursts into one redraw)."""
        self._dirty = True
        if not self._draw_timer.isActive():
            wait = self._last_draw + self._min_draw_s - time.monotonic()
            self._draw_timer.start(max(0, int(wait * 1000)))

    def flush(self) -> None:
        """Redraw now if anything changed since the last redraw."""
        self._draw_timer.stop()
        if self._dirty:
            self._dirty = False
            self._draw()

    def base_image(self) -> np.ndarray:
        """The brightfield image in the XY view (pending changes drawn first), raw values
        (y, x); 1x1 zeros before any stack."""
        self.flush()
        return self._base

    def overlay_rgba(self) -> np.ndarray:
        """The XY overlay (pending changes drawn first), straight-alpha RGBA uint8 (y, x, 4)."""
        self.flush()
        return self._overlay

    def shown(self) -> tuple[Received | None, Received | None]:
        """The stack and prediction records the views show (or would show) now."""
        return self.navigation.shown()

    def _draw(self) -> None:
        t0 = time.perf_counter()
        self._last_draw = time.monotonic()
        stack, pred = self.shown()
        nav = self.navigation
        nav.sync_time_slider()
        if stack is not None or pred is not None:
            nav.fit(*(stack.array.shape if stack is not None else pred.array.shape[1:]))
        frame = self.renderer.render(stack, pred, nav.z, nav.mode, nav.cross, self.structures.styles)
        if frame is None:
            self.status.setText(self._status_text())
            return
        for layer, images in ((self.views.xy, frame.xy), (self.views.xz, frame.xz), (self.views.yz, frame.yz)):
            layer.show(images.base, images.levels, images.overlay, QtCore.QRectF(*images.rect))
        cx, cy = nav.cross or (frame.shape[2] // 2, frame.shape[1] // 2)
        self.views.set_crosshair(cx, cy, (frame.z + 0.5) * frame.z_scale)
        for name, (lo, hi) in frame.auto_levels.items():
            self.structures.show_levels(name, lo, hi)
        nav.drawn(frame.z, frame.shape[0])
        self._base = frame.xy.base if frame.xy.base is not None else np.zeros((1, 1), np.uint16)
        self._overlay = frame.xy.overlay
        self.last_draw_s = time.perf_counter() - t0
        self._note_latency(pred)
        self.history_label.setText(self.history.describe())
        self.status.setText(self._status_text())

    def _note_latency(self, pred: Received | None) -> None:
        """End-to-end latency of a live prediction the first time it is drawn."""
        p = self.navigation.p
        if pred is None or not self.navigation.live or p is None:
            return
        if self._last_drawn_pred.get(p) == pred.serial:
            return
        self._last_drawn_pred[p] = pred.serial
        drawn_at = time.time()
        since = pred.header.acquired_end
        if since > 0:
            self.panel.add_latency(drawn_at - since)
        self.prediction_drawn.emit(pred.header, drawn_at)

    def _status_text(self) -> str:
        """What is shown (run/t/p/seq), receipt counts and the last draw time."""
        stack, pred = self.shown()
        parts = []
        if stack is not None:
            h = stack.header
            parts.append(f"run {h.run_id}  p {h.p}  t {h.t}  seq {h.seq}")
        if pred is not None:
            h = pred.header
            parts.append(f"prediction of seq {h.source_seq} (t {h.t})")
        parts.append(f"received: stacks {self.n_stacks}  predictions {self.n_predictions}")
        if self.n_malformed:
            parts.append(f"malformed {self.n_malformed}")
        parts.append(f"draw {self.last_draw_s * 1000:.0f} ms")
        return "   ".join(parts)

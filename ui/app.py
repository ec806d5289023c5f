"""Entry point of the viewer: subscribe to a daemon's display socket and show it.

The viewer runs its own local event loop rather than ``app.exec()`` so it also works
inside a process that already has a QApplication (tests, napari, an IPython session),
and closing it never quits the host application. It subscribes to the display socket
and polls the control socket (status at 1 Hz, pause/resume/stop on request); opening,
closing or freezing it has no effect on the daemon or the acquisition.
"""

from __future__ import annotations

import logging
import pathlib
import signal
from collections.abc import Callable

from PySide6 import QtCore, QtWidgets

from livestain import wire
from livestain.ui.control_client import ControlClient
from livestain.ui.endpoints import check_endpoint
from livestain.ui.history import DEFAULT_MAX_MB, DEFAULT_TIMEPOINTS, History
from livestain.ui.qtcheck import guard_if_needed, require_display
from livestain.ui.screenshot import DAEMON_TIMEOUT_S, PAIR_WAIT_S, ScreenshotTaker
from livestain.ui.subscriber import DisplaySubscriber
from livestain.ui.window import LiveWindow

log = logging.getLogger(__name__)

#: After the first prediction, how long a screenshot waits for a stack to show under it.
SCREENSHOT_PAIR_WAIT_S = PAIR_WAIT_S


def run_viewer(
    display_endpoint: str,
    screenshot: pathlib.Path | None = None,
    screenshot_after_s: float = 5.0,
    wait_for_prediction: bool = True,
    keys: str | None = None,
    control_endpoint: str | None = None,
    history_timepoints: int = DEFAULT_TIMEPOINTS,
    history_mb: float = DEFAULT_MAX_MB,
    confirm_stop: bool = True,
    on_window: Callable[[LiveWindow], object] | None = None,
    daemon_timeout_s: float = DAEMON_TIMEOUT_S,
) -> int:
    """Show the live viewer for ``display_endpoint``; return the exit status.

    With ``screenshot``, save a grab of the window as soon as a prediction has been
    drawn, then close (0). Without a prediction, save what is shown after
    ``screenshot_after_s`` if ``wait_for_prediction`` is False, else after twice that
    (so a demo never hangs on a dead worker); with nothing to show, write nothing and
    return 1. If no daemon answers the control socket within ``daemon_timeout_s``,
    raise `NoDaemonError` (a TimeoutError) without writing the file. The rules and
    messages are in `livestain.ui.screenshot`. Without ``screenshot``, run until the
    window is closed (0).

    ``control_endpoint`` defaults to the daemon's control port beside the display port
    (`control_endpoint_for`); pass "" to show no status and offer no controls.
    History keeps ``history_timepoints`` time points per position within ``history_mb``.
    ``on_window`` is called with the window, attached, before it is shown (e.g. to
    connect to its signals).

    Raises ValueError for an endpoint that cannot be a daemon (`check_endpoint`) or
    unusable ``keys``, and `NoDisplayError` (an OSError) where Qt could not open a window:
    both before any window exists, so the command line prints one line and exits 2
    instead of Qt aborting the process.
    """
    if control_endpoint is None:
        control_endpoint = control_endpoint_for(display_endpoint)
    for endpoint in (display_endpoint, control_endpoint):
        if endpoint:
            check_endpoint(endpoint)
    subscriber = DisplaySubscriber(display_endpoint, keys=keys)  # a bad --keys fails here, before Qt
    try:
        _application()
    except BaseException:
        subscriber.close()
        raise
    window = LiveWindow(history=History(history_timepoints, history_mb), confirm_stop=confirm_stop)
    window.setWindowTitle(f"livestain viewer — {display_endpoint}")
    window.attach(subscriber)
    control = ControlClient(control_endpoint, keys=keys) if control_endpoint else None
    if control is not None:
        window.attach_control(control)
    if on_window is not None:
        on_window(window)
    loop = QtCore.QEventLoop()
    window.closed.connect(loop.quit)
    timers: list[QtCore.QTimer] = []

    def every(ms: int, slot: Callable[[], object]) -> None:
        timer = QtCore.QTimer()
        timer.timeout.connect(slot)
        timer.start(ms)
        timers.append(timer)

    taker = None
    if screenshot is not None:
        limit = screenshot_after_s if not wait_for_prediction else 2 * screenshot_after_s
        taker = ScreenshotTaker(window, control, screenshot, limit, control_endpoint or display_endpoint,
                                keys=keys, daemon_timeout_s=daemon_timeout_s)
        every(100, taker.tick)

    # Ctrl+C closes the window: Qt blocks Python signal handlers unless the
    # interpreter gets to run now and then, hence the idle timer.
    previous = signal.signal(signal.SIGINT, lambda *_: window.close())
    every(200, lambda: None)
    try:
        window.show()
        loop.exec()
    finally:
        signal.signal(signal.SIGINT, previous)
        for timer in timers:
            timer.stop()
        subscriber.close()
        if control is not None:
            control.stop()
        window.deleteLater()
    return taker.result() if taker is not None else 0


def _application() -> QtWidgets.QApplication:
    """The process's QApplication, created if needed once a window can open (Qt would
    abort the process otherwise, see `require_display`)."""
    app = QtWidgets.QApplication.instance()
    if app is None:
        require_display()
        app = QtWidgets.QApplication([])
    assert isinstance(app, QtWidgets.QApplication)
    guard_if_needed()  # PySide6 6.12.0 on Python 3.11 would abort the viewer otherwise
    return app


def control_endpoint_for(display_endpoint: str) -> str | None:
    """The control endpoint of the daemon whose display socket is ``display_endpoint``
    (same host, port + 1 in the `livestain.wire` layout); None if it is not tcp://host:port."""
    head, sep, port = display_endpoint.rpartition(":")
    if not sep or not head.startswith("tcp://") or not port.isdigit():
        return None
    offset = wire.PORT_OFFSETS["control"] - wire.PORT_OFFSETS["display"]
    return f"{head}:{int(port) + offset}"

"""Entry point of the viewer: subscribe to a daemon's display socket and show it.

The viewer runs its own local event loop rather than ``app.exec()`` so it also works
inside a process that already has a QApplication (tests, napari, an IPython session),
and closing it never quits the host application. It only subscribes, so closing it has
no effect on the daemon or the acquisition.
"""

from __future__ import annotations

import logging
import pathlib
import signal
import time
from collections.abc import Callable

from PySide6 import QtCore, QtWidgets

from livestain.ui.subscriber import DisplaySubscriber
from livestain.ui.window import LiveWindow

log = logging.getLogger(__name__)


def run_viewer(
    display_endpoint: str,
    screenshot: pathlib.Path | None = None,
    screenshot_after_s: float = 5.0,
    wait_for_prediction: bool = True,
    keys: str | None = None,
) -> int:
    """Show the live viewer for ``display_endpoint``; return the exit status (0).

    With ``screenshot``, save a grab of the window as soon as a prediction has been
    drawn, then close. Without a prediction, save anyway after ``screenshot_after_s``
    if ``wait_for_prediction`` is False, else after twice that (so a demo never hangs
    on a dead worker). Without ``screenshot``, run until the window is closed.
    """
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    assert isinstance(app, QtWidgets.QApplication)
    subscriber = DisplaySubscriber(display_endpoint, keys=keys)
    window = LiveWindow()
    window.setWindowTitle(f"livestain viewer — {display_endpoint}")
    window.attach(subscriber)
    loop = QtCore.QEventLoop()
    window.closed.connect(loop.quit)
    timers: list[QtCore.QTimer] = []

    def every(ms: int, slot: Callable[[], object]) -> None:
        timer = QtCore.QTimer()
        timer.timeout.connect(slot)
        timer.start(ms)
        timers.append(timer)

    if screenshot is not None:
        start = time.monotonic()
        limit = screenshot_after_s if not wait_for_prediction else 2 * screenshot_after_s

        def maybe_grab() -> None:
            elapsed = time.monotonic() - start
            if window.n_predictions == 0 and elapsed < limit:
                return
            if window.n_predictions == 0:
                log.warning("no prediction after %.1fs; saving the screenshot anyway", elapsed)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            if not window.grab().save(str(screenshot)):
                log.error("could not save screenshot to %s", screenshot)
            window.close()

        every(100, maybe_grab)

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
        window.deleteLater()
    return 0

"""The real live viewer, offscreen, noting when each live prediction is first drawn.

Used by ``bench/bench_latency.py`` for the "drawn" stage: it builds `LiveWindow` the way
``livestain view`` does (display subscriber polled at 10 Hz, draws rate-limited, control
client polling the daemon's status), runs Qt's event loop on the offscreen platform, and
appends one JSON line per live prediction drawn to ``OUT``::

    {"run_id", "source_seq", "t", "p", "acquired_end", "published_at", "drawn_at", "draw_s"}

``published_at`` is when the daemon sent the prediction to viewers (the header's
``sent_at``), ``drawn_at`` the Unix time of the redraw that first showed it
(`LiveWindow.prediction_drawn`), ``draw_s`` how long that redraw took.

    .venv/bin/python bench/_viewer_probe.py DISPLAY_ENDPOINT OUT.jsonl [--ready FILE] [--seconds N]

It runs until SIGTERM / SIGINT (or ``--seconds``); ``--ready`` names a file it creates
once the window is shown and subscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtWidgets  # noqa: E402

from livestain.ui.app import control_endpoint_for  # noqa: E402
from livestain.ui.control_client import ControlClient  # noqa: E402
from livestain.ui.qtcheck import guard_if_needed  # noqa: E402
from livestain.ui.subscriber import DisplaySubscriber  # noqa: E402
from livestain.ui.window import LiveWindow  # noqa: E402
from livestain.wire import StackHeader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("endpoint")
    ap.add_argument("out", type=Path)
    ap.add_argument("--ready", type=Path, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    guard_if_needed()
    subscriber = DisplaySubscriber(args.endpoint)
    window = LiveWindow(confirm_stop=False)
    window.attach(subscriber)
    control_ep = control_endpoint_for(args.endpoint)
    control = ControlClient(control_ep) if control_ep else None
    if control is not None:
        window.attach_control(control)
    out = args.out.open("a", buffering=1)

    def drawn(header: StackHeader, drawn_at: float) -> None:
        out.write(json.dumps({
            "run_id": header.run_id, "source_seq": header.source_seq, "t": header.t, "p": header.p,
            "acquired_end": header.acquired_end, "published_at": header.sent_at,
            "drawn_at": drawn_at, "draw_s": window.last_draw_s,
        }) + "\n")

    window.prediction_drawn.connect(drawn)
    loop = QtCore.QEventLoop()
    window.closed.connect(loop.quit)
    signal.signal(signal.SIGTERM, lambda *_: window.close())
    signal.signal(signal.SIGINT, lambda *_: window.close())
    idle = QtCore.QTimer()  # lets the interpreter run the signal handlers
    idle.timeout.connect(lambda: None)
    idle.start(200)
    if args.seconds is not None:
        QtCore.QTimer.singleShot(int(args.seconds * 1000), window.close)
    if args.ready is not None:
        QtCore.QTimer.singleShot(0, lambda: args.ready.write_text(str(os.getpid())))
    window.show()
    try:
        loop.exec()
    finally:
        idle.stop()
        subscriber.close()
        if control is not None:
            control.stop()
        out.close()
        window.deleteLater()
        app.processEvents()


if __name__ == "__main__":
    main()

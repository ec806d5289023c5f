"""The real live viewer, offscreen, noting when each live prediction is first drawn.

Used by ``bench/bench_latency.py`` for the "drawn" stage: it runs `run_viewer`, the
same code as ``livestain view`` (display subscriber woken as messages arrive, draws
rate-limited, control client polling the daemon's status), on Qt's offscreen platform,
and appends one JSON line per live prediction drawn to ``OUT``::

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

from PySide6 import QtCore  # noqa: E402

from livestain.ui.app import run_viewer  # noqa: E402
from livestain.ui.window import LiveWindow  # noqa: E402
from livestain.wire import StackHeader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("endpoint")
    ap.add_argument("out", type=Path)
    ap.add_argument("--ready", type=Path, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()

    with args.out.open("a", buffering=1) as out:

        def note_draws(window: LiveWindow) -> None:
            def drawn(header: StackHeader, drawn_at: float) -> None:
                out.write(json.dumps({
                    "run_id": header.run_id, "source_seq": header.source_seq, "t": header.t,
                    "p": header.p, "acquired_end": header.acquired_end, "published_at": header.sent_at,
                    "drawn_at": drawn_at, "draw_s": window.last_draw_s,
                }) + "\n")

            window.prediction_drawn.connect(drawn)
            signal.signal(signal.SIGTERM, lambda *_: window.close())
            if args.seconds is not None:
                QtCore.QTimer.singleShot(int(args.seconds * 1000), window.close)
            if args.ready is not None:  # runs once the event loop (and the window) is up
                QtCore.QTimer.singleShot(0, lambda: args.ready.write_text(str(os.getpid())))

        run_viewer(args.endpoint, confirm_stop=False, on_window=note_draws)


if __name__ == "__main__":
    main()

"""``livestain view --screenshot``: when to save the window, and what to say when it cannot.

A screenshot is for scripts and demos, so it must end on its own and say why:

* a prediction is shown (with its stack): save it, exit 0;
* no daemon answers at all (nothing listens, another program, other ``--keys``): give
  up after ``daemon_timeout_s`` without writing the file; `NoDaemonError` (exit 2, as
  ``livestain status`` does for the same mistake);
* the daemon answers but no prediction comes by the deadline: save the raw stack if one
  is shown, else write nothing and exit 1 (the daemon is there but had nothing to show,
  e.g. a paused or finished run: the viewer only sees stacks acquired while it is open);
  either way the log line says what the daemon reported (paused, no worker, ...);
* the daemon stops answering for ``daemon_timeout_s`` mid-wait: nothing more will come,
  so finish now as at the deadline.

`decide` holds these rules without Qt, so they are tested directly; `ScreenshotTaker`
feeds it what the window and the control client have seen, ten times a second.
"""

from __future__ import annotations

import logging
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from PySide6 import QtWidgets

from livestain.ui.control_client import ControlClient
from livestain.ui.endpoints import listening
from livestain.ui.window import LiveWindow

log = logging.getLogger(__name__)

#: After the first prediction, how long a screenshot waits for a stack to show under it.
PAIR_WAIT_S = 5.0
#: How long a daemon may stay silent (no control reply, no display message) before the
#: viewer decides there is none: a few of the control client's 2 s reply deadlines.
DAEMON_TIMEOUT_S = 10.0
#: A worker not heard from for this long is reported as silent in the log line.
WORKER_SILENT_S = 10.0

EXIT_SAVED = 0
#: The daemon answered but there was nothing to save (or the file could not be written).
EXIT_NOTHING_SAVED = 1


class NoDaemonError(TimeoutError):
    """No livestain daemon answered (a TimeoutError, so the command line prints it as one
    line and exits 2, as ``livestain status`` does)."""


@dataclass(frozen=True)
class Seen:
    """What the viewer has seen so far, the input of `decide`."""

    elapsed_s: float
    #: Seconds since the daemon was last heard from (since start if never).
    silent_s: float
    #: A control reply or a display message arrived at some point.
    heard: bool
    has_control: bool
    #: The control client's state: True after a reply, False after a missed deadline,
    #: None before either (or without a control socket).
    answering: bool | None
    n_predictions: int
    shows_stack: bool
    shows_prediction: bool
    #: Seconds since the first prediction arrived (None before it).
    since_first_prediction_s: float | None


class Verdict(NamedTuple):
    """``wait``; ``save`` the window; ``no-daemon``; or ``nothing`` to save."""

    action: Literal["wait", "save", "no-daemon", "nothing"]
    #: The daemon went silent for the whole daemon timeout (for the message).
    gone: bool = False


def decide(seen: Seen, limit_s: float, daemon_timeout_s: float = DAEMON_TIMEOUT_S,
           pair_wait_s: float = PAIR_WAIT_S) -> Verdict:
    """The screenshot rules of the module doc, for one look at what was seen."""
    gone = seen.answering is False and seen.silent_s >= daemon_timeout_s
    if not seen.heard and seen.answering is False and (gone or seen.elapsed_s >= limit_s):
        return Verdict("no-daemon", gone=True)
    if not gone and seen.elapsed_s < limit_s:
        if not seen.n_predictions:
            return Verdict("wait")
        if seen.has_control and seen.answering is None:
            return Verdict("wait")  # let the status panel fill in before the picture
        first = seen.since_first_prediction_s
        if not (seen.shows_stack and seen.shows_prediction) and first is not None and first < pair_wait_s:
            return Verdict("wait")  # joined mid-run: give the next stack of that position a moment
        return Verdict("save")
    if seen.shows_stack or seen.shows_prediction:
        return Verdict("save", gone=gone)
    if not seen.heard:
        # The caller's deadline came before the first reply deadline: no verdict on the
        # daemon yet, so keep the old promise of a picture (an empty window).
        return Verdict("save")
    return Verdict("nothing", gone=gone)


def describe_daemon(status: dict[str, Any]) -> str:
    """The daemon's last status in a few words: the run, its counts, and what would keep
    predictions from coming (paused, an error, no worker)."""
    if not status:
        return "no status reply yet"
    parts = [f"run {status.get('run_id', '?')} {status.get('state', '?')}",
             f"{status.get('stacks_acquired', '?')} stacks acquired, "
             f"{status.get('stacks_predicted', '?')} predicted"]
    if status.get("state") == "paused":
        parts.append("`livestain resume` continues it")
    if status.get("error"):
        parts.append(f"error: {status['error']}")
    parts.extend(_worker_note(status))
    return "; ".join(parts)


def _worker_note(status: dict[str, Any]) -> list[str]:
    """Why no worker may be predicting, from the fields a daemon reports (none if fine)."""
    if status.get("worker_alive") is False:  # None: no local worker (remote workers only)
        return ["its worker is down"]
    beats = status.get("worker_heartbeats_s")
    if not isinstance(beats, dict):
        return []
    if not beats:
        return ["no worker has connected (start one with `livestain worker`)"]
    freshest = min(float(v) for v in beats.values())
    return [f"no worker heard from for {freshest:.0f} s"] if freshest > WORKER_SILENT_S else []


class ScreenshotTaker:
    """Watches the window and the control client; saves, or records why not, then closes
    the window. `result` gives the exit status afterwards (or raises `NoDaemonError`)."""

    def __init__(
        self,
        window: LiveWindow,
        control: ControlClient | None,
        path: pathlib.Path,
        limit_s: float,
        endpoint: str,
        keys: str | None = None,
        daemon_timeout_s: float = DAEMON_TIMEOUT_S,
    ) -> None:
        self.window, self.control, self.path = window, control, path
        self.limit_s, self.endpoint, self.keys = limit_s, endpoint, keys
        self.daemon_timeout_s = daemon_timeout_s
        self.start = time.monotonic()
        self._last_heard: float | None = None
        self._received = 0
        self._first_prediction: float | None = None
        self._outcome: int | NoDaemonError | None = None

    def tick(self) -> None:
        """One look (a timer slot: it never raises, the outcome waits for `result`)."""
        if self._outcome is not None:
            return
        verdict = decide(self._seen(time.monotonic()), self.limit_s, self.daemon_timeout_s)
        if verdict.action == "wait":
            return
        if verdict.action == "no-daemon":
            self._outcome = NoDaemonError(self._no_daemon_message())
        elif verdict.action == "nothing":
            log.error("%s", self._nothing_message(verdict.gone))
            self._outcome = EXIT_NOTHING_SAVED
        else:
            self._outcome = self._save(verdict.gone)
        self.window.close()

    def result(self) -> int:
        """Exit status once the window closed: 0 saved, 1 nothing saved; raises
        `NoDaemonError` when no daemon answered. Closed by hand before a verdict: 1."""
        if isinstance(self._outcome, NoDaemonError):
            raise self._outcome
        if self._outcome is None:
            log.error("the window was closed before a screenshot was taken; nothing saved")
            return EXIT_NOTHING_SAVED
        return self._outcome

    # -- inputs -----------------------------------------------------------------------

    def _seen(self, now: float) -> Seen:
        """Snapshot of the window and the control client (and when the daemon last spoke)."""
        window, control = self.window, self.control
        received = window.n_stacks + window.n_predictions
        if received > self._received or (control is not None and control.answering):
            self._last_heard = now
        self._received = received
        if window.n_predictions and self._first_prediction is None:
            self._first_prediction = now
        stack, pred = window.shown()
        return Seen(
            elapsed_s=now - self.start,
            silent_s=now - (self._last_heard if self._last_heard is not None else self.start),
            heard=self._last_heard is not None,
            has_control=control is not None,
            answering=None if control is None else control.answering,
            n_predictions=window.n_predictions,
            shows_stack=stack is not None,
            shows_prediction=pred is not None,
            since_first_prediction_s=None if self._first_prediction is None else now - self._first_prediction,
        )

    # -- outcomes ---------------------------------------------------------------------

    def _save(self, gone: bool) -> int:
        """Draw what is pending, grab the window and write it; say what it lacks."""
        elapsed = time.monotonic() - self.start
        stack, pred = self.window.shown()
        if gone:
            log.warning("the daemon on %s stopped answering; saving what was shown", self.endpoint)
        if pred is None and stack is not None:
            log.warning("no prediction in %.0f s (%s); saving the raw stack without one",
                        elapsed, self._daemon_state())
        elif stack is None and pred is None:
            log.warning("nothing received in %.1f s and no answer yet from %s; saving the "
                        "empty window anyway", elapsed, self.endpoint)
        self.window.flush()
        app = QtWidgets.QApplication.instance()
        if app is not None:
            app.processEvents()  # lay out the labels the redraw changed before grabbing
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("could not save the screenshot to %s: %s", self.path, e)
            return EXIT_NOTHING_SAVED
        if not self.window.grab().save(str(self.path)):
            log.error("could not save the screenshot to %s (is the folder writable, and the "
                      "name a .png or another image type Qt writes?)", self.path)
            return EXIT_NOTHING_SAVED
        return EXIT_SAVED

    def _daemon_state(self) -> str:
        return describe_daemon(self.window.panel.last_status)

    def _nothing_message(self, gone: bool) -> str:
        elapsed = time.monotonic() - self.start
        if gone:
            return (f"the daemon on {self.endpoint} stopped answering before it sent anything "
                    f"to show ({self._daemon_state()}); no screenshot written")
        return (f"the daemon on {self.endpoint} answers ({self._daemon_state()}) but sent no "
                f"stack or prediction in {elapsed:.0f} s, so there is nothing to show and no "
                f"screenshot was written (the viewer only sees stacks acquired while it is open)")

    def _no_daemon_message(self) -> str:
        elapsed = time.monotonic() - self.start
        probe = listening(self.endpoint)
        if probe is True:
            where = (" (something listens on that port but does not answer as a livestain daemon: "
                     "another program, or a daemon started with other --keys)")
        elif probe is False:
            where = " (nothing listens on that port)"
        else:
            where = ""
        keys = " and that the daemon uses the same --keys folder" if self.keys else ""
        return (f"no livestain daemon answered on {self.endpoint} within {elapsed:.0f} s{where}. "
                f"Is a run going (`livestain demo` / `livestain run`)? Check --connect/--port{keys}; "
                f"no screenshot written")

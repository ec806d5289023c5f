"""Side panel: the run's health at a glance, from the daemon's status replies.

Every figure is labelled with where it comes from. Numbers the daemon reports are
shown as reported; numbers the viewer derives (rate, ETA, latency, dose avoided) say
how they are derived in their tooltips, so nobody mistakes an estimate for a
measurement. Fields a daemon does not report show as "—" rather than a guess.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any

from PySide6 import QtCore, QtWidgets

#: Window over which stacks per minute is measured.
RATE_WINDOW_S = 120.0

#: Rows of the panel: key -> label text. Keys are also the test-facing names.
ROWS: dict[str, str] = {
    "connection": "daemon",
    "run": "run",
    "state": "state",
    "progress": "progress",
    "eta": "ETA",
    "rate": "stacks/min",
    "latency": "latency",
    "backlog": "queue",
    "late": "late",
    "dropped": "skipped",
    "failed": "failed",
    "worker": "worker",
    "disk": "disk free",
    "dose": "light dose",
    "trust": "confidence",
    "focus": "focus",
    "checks": "check frames",
    "model": "model",
}

TOOLTIPS: dict[str, str] = {
    "progress": "time point / position from the daemon's stack count, assuming one "
                "streamed stack per (t, p); 'stacks' is acquired / planned",
    "eta": "remaining stacks / acquisition rate observed by this viewer "
           "(falls back to stacks / daemon uptime)",
    "rate": f"stacks acquired per minute over the last {RATE_WINDOW_S:.0f} s, seen by this viewer",
    "latency": "stack complete (header acquired_end, daemon clock) -> prediction drawn here "
               "(this computer's clock: across hosts it includes their clock offset); last "
               "value and median of the last 50 predictions drawn live",
    "backlog": "stacks waiting for a worker (backlog) and stacks at a worker (in flight)",
    "late": "stacks whose live prediction fell behind and are predicted from disk later; "
            "'caught up' = predicted late so far",
    "dropped": "stacks dropped from live prediction (backlog overflow); they are on disk",
    "failed": "results the daemon rejected as malformed or unknown, and the run's error",
    "trust": "the last prediction's confidence (0-1: 1 when no input check flags it; blank, "
             "saturated, fluorescence-as-brightfield, empty, out-of-focus stacks and a voxel size "
             "far from the model's lower it) and the stacks below 0.5 so far; red: do not trust "
             "the overlay without a look at the brightfield",
    "focus": "where each position's cells are along z, from its last brightfield stack (the "
             "contrast minimum between the reversed halos): their offset from the stack's centre, "
             "and the z correction focus tracking applied; red: cells not found in the stack",
    "checks": "real fluorescence taken every few time points (policies.checks) and scored "
              "against the prediction of the same stack: the last Pearson r per structure and how "
              "many were scored; red: the last r is below 0.7",
    "model": "the model the workers use now (name@hash; every prediction file names its own), its "
             "Pearson r on its own validation fields (how good it is where it was trained: the "
             "confidence is relative to that) and, with policies.adapt, the fine-tuning rounds, "
             "swaps and roll-backs so far",
    "dose": "with a 'dose' field from the daemon: its figures. Otherwise an honest count: "
            "every predicted stack x structure is one fluorescence stack not exposed",
}


def _fmt_duration(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class RateMeter:
    """Stacks per minute from (time, stacks_acquired) samples of one run."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._first: tuple[float, int] | None = None
        self._run: str | None = None

    def add(self, run_id: str, acquired: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if run_id != self._run or (self._samples and acquired < self._samples[-1][1]):
            self._samples.clear()
            self._first, self._run = None, run_id
        self._samples.append((now, acquired))
        self._first = self._first or (now, acquired)
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def per_minute(self) -> float | None:
        """Recent rate, None until two samples some seconds apart exist."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) * 60 if t1 - t0 >= 2.0 else None

    def overall_per_minute(self) -> float | None:
        """Rate since this viewer attached to the run (steadier, for the ETA)."""
        if self._first is None or not self._samples:
            return None
        (t0, n0), (t1, n1) = self._first, self._samples[-1]
        return (n1 - n0) / (t1 - t0) * 60 if t1 - t0 >= 5.0 and n1 > n0 else None


class StatusPanel(QtWidgets.QGroupBox):
    """Labels for the daemon's figures; `show_status` fills them from one reply."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__("run", parent)
        form = QtWidgets.QFormLayout(self)
        form.setFieldGrowthPolicy(QtWidgets.QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.labels: dict[str, QtWidgets.QLabel] = {}
        for key, text in ROWS.items():
            label = QtWidgets.QLabel("—")
            label.setWordWrap(True)
            label.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
            if key in TOOLTIPS:
                label.setToolTip(TOOLTIPS[key])
            form.addRow(text, label)
            self.labels[key] = label
        self.labels["connection"].setText("connecting…")
        self.rate = RateMeter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=50)
        self.last_status: dict[str, Any] = {}
        self.n_structures: int | None = None

    def text(self, key: str) -> str:
        return self.labels[key].text()

    def _set(self, key: str, text: str, alarm: bool = False) -> None:
        label = self.labels[key]
        label.setText(text)
        label.setStyleSheet("color: #d03030; font-weight: bold;" if alarm else "")

    # -- inputs ---------------------------------------------------------------------

    def show_not_answering(self, reason: str) -> None:
        """The daemon is gone or stuck: say so, keep the last figures (greyed by the label)."""
        self._set("connection", f"daemon not answering — retrying ({reason})", alarm=True)
        self._set("eta", "—")

    def add_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        last = self.latencies[-1]
        med = statistics.median(self.latencies)
        self._set("latency", f"{last:.2f} s (median {med:.2f} s of {len(self.latencies)})")

    def set_structures(self, n: int) -> None:
        """Number of predicted structures (for the dose-avoided count)."""
        self.n_structures = n
        if self.last_status:
            self._show_dose(self.last_status)

    #: Status fields the panel reads: each one the daemon sends (a test holds them to
    #: it; the panel once read `stacks_total` and `dose`, which no daemon sent).
    FIELDS_READ = (
        "run_id", "stacks_acquired", "state", "backlog", "stacks_in_flight", "stacks_late",
        "stacks_predicted_late", "stacks_dropped", "malformed_results", "stacks_failed", "error", "disk_free_bytes",
        "timepoints", "positions", "stacks_total", "stacks_done_before", "stacks_predicted",
        "uptime_s", "worker_alive", "worker_restarts", "worker_pid", "fluorescence_dose_ms",
        "equivalent_fluorescence_run_dose_ms", "dose_note", "last_confidence", "low_confidence_stacks",
        "focus", "track_focus",
    )

    def show_status(self, s: dict[str, Any], now: float | None = None) -> None:
        """Fill every row from one status reply."""
        self.last_status = s
        run_id = str(s.get("run_id", "?"))
        acquired = int(s.get("stacks_acquired", 0))
        self.rate.add(run_id, acquired, now)
        self._set("connection", "answering")
        self._set("run", run_id)
        state = str(s.get("state", "?"))
        self._set("state", state, alarm=state == "stopped")
        self._show_progress(s, acquired)
        self._set("backlog", f"{s.get('backlog', '—')} waiting, {s.get('stacks_in_flight', '—')} in flight")
        self._set("late", f"{s.get('stacks_late', '—')} (caught up {s.get('stacks_predicted_late', '—')})")
        dropped = s.get("stacks_dropped")
        self._set("dropped", "—" if dropped is None else str(dropped), alarm=bool(dropped))
        malformed = s.get("malformed_results")
        unpredictable = int(s.get("stacks_failed", 0) or 0)
        error = s.get("error")
        failed = "—" if malformed is None else f"{malformed} rejected result(s)"
        if unpredictable:
            failed += f"; {unpredictable} stack(s) the model could not predict (see the log)"
        self._set("failed", failed + (f"; error: {error}" if error else ""),
                  alarm=bool(error) or bool(unpredictable))
        self._show_worker(s)
        disk = s.get("disk_free_bytes")
        self._set("disk", "—" if disk is None else _fmt_bytes(float(disk)),
                  alarm=disk is not None and float(disk) < 5e9)
        self._show_dose(s)
        self._show_trust(s)
        self._show_focus(s)
        self._show_checks(s)
        self._show_model(s)

    # -- rows -----------------------------------------------------------------------

    def _show_progress(self, s: dict[str, Any], acquired: int) -> None:
        n_t, n_p = int(s.get("timepoints", 0) or 0), int(s.get("positions", 0) or 0)
        total = int(s.get("stacks_total", n_t * n_p) or 0)
        # a resumed run: what the first session(s) acquired counts towards the plan too
        acquired += int(s.get("stacks_done_before", 0) or 0)
        predicted = s.get("stacks_predicted", "—")
        if n_t and n_p:
            done = min(acquired, total)
            per_tp = max(1, total // (n_t * n_p))  # channels per (t, p): 4 in paired mode
            t = min(done // (n_p * per_tp) + 1, n_t)
            p = (done // per_tp) % n_p + 1 if done < total else n_p
            pct = 100.0 * done / total if total else 0.0
            self._set("progress", f"t {t}/{n_t} · p {p}/{n_p} · stacks {acquired}/{total} "
                                  f"({pct:.0f}%) · predicted {predicted}")
        else:
            self._set("progress", f"stacks {acquired} · predicted {predicted}")
        rate = self.rate.per_minute()
        self._set("rate", "measuring…" if rate is None else f"{rate:.1f}")
        state = s.get("state")
        remaining = total - acquired if total else None
        if remaining is not None and remaining <= 0:
            self._set("eta", "acquisition complete")
        elif state == "paused":
            self._set("eta", "paused")
        elif remaining is None:
            self._set("eta", "—")
        else:
            per_min = self.rate.overall_per_minute()
            uptime = float(s.get("uptime_s", 0) or 0)
            if per_min is None and acquired > 0 and uptime > 0:
                per_min = acquired / uptime * 60
            if not per_min:
                self._set("eta", "measuring…")
            else:
                self._set("eta", f"≈ {_fmt_duration(remaining / per_min * 60)}")

    def _show_trust(self, s: dict[str, Any]) -> None:
        last = s.get("last_confidence")
        low = int(s.get("low_confidence_stacks", 0) or 0)
        if not isinstance(last, dict) or "confidence" not in last:
            self._set("trust", "—")
            return
        c = float(last["confidence"])
        text = f"{c:.2f} at t {int(last.get('t', 0)) + 1} p {int(last.get('p', 0)) + 1}; {low} stack(s) below 0.5"
        reasons = [str(r) for r in last.get("reasons") or []]
        if reasons:
            text += " — " + "; ".join(reasons)
        self._set("trust", text, alarm=c < 0.5 or bool(reasons))

    #: A check frame's r below this turns the row red.
    CHECK_ALARM_R = 0.7

    def _show_checks(self, s: dict[str, Any]) -> None:
        checks = s.get("checks")
        if not isinstance(checks, dict) or not checks:
            self._set("checks", "— (none planned: policies.checks)")
            return
        parts, alarm = [], False
        for structure, c in checks.items():
            last = c.get("last") if isinstance(c, dict) else None
            if not last:
                parts.append(f"{structure}: none yet (every {s.get('checks_every', '?')} time points)")
                continue
            r = float(last["pearson"])
            alarm |= r < self.CHECK_ALARM_R
            why = "" if str(last.get("reason", "")).startswith("every") else f", taken because {last['reason']}"
            parts.append(f"{structure}: r {r:.2f} at t {int(last['t']) + 1} p {int(last['p']) + 1} "
                         f"({c.get('count', 0)} checked{why})")
        self._set("checks", "; ".join(parts), alarm=alarm)

    def _show_model(self, s: dict[str, Any]) -> None:
        name = s.get("model_version") or s.get("model_name")
        adaptation = s.get("adaptation")
        if not name:
            self._set("model", "—")
            return
        text = str(name)
        validation = s.get("model_validation_r")
        if isinstance(validation, dict) and validation and name == s.get("model_name"):
            # the starting model's own figure (an adapted version has other scores)
            text += " — validation r " + ", ".join(f"{k} {float(v):.2f}" for k, v in validation.items())
        if isinstance(adaptation, dict):
            swaps = sum(1 for v in adaptation.get("versions", []) if str(v.get("why", "")).startswith("adapted"))
            text += (f" — adapting: {adaptation.get('rounds', 0)} round(s)"
                     f"{' (one running)' if adaptation.get('running') else ''}, {swaps} swap(s), "
                     f"{adaptation.get('rollbacks', 0)} roll-back(s)")
        self._set("model", text)

    def _show_focus(self, s: dict[str, Any]) -> None:
        focus = s.get("focus")
        if not isinstance(focus, dict) or not focus:
            self._set("focus", "—")
            return
        parts, lost = [], False
        for p, f in sorted(focus.items(), key=lambda kv: int(kv[0]))[:6]:
            offset, correction = f.get("offset_um"), float(f.get("correction_um") or 0.0)
            if offset is None:
                lost = True
                parts.append(f"p{int(p) + 1}: cells not found")
            else:
                parts.append(f"p{int(p) + 1}: cells {float(offset):+.1f} um"
                             + (f", stack moved {correction:+.1f} um" if correction else ""))
        if len(focus) > 6:
            parts.append(f"… {len(focus) - 6} more")
        mode = {"brightfield": "tracking", "off": "not tracking (policies.track_focus)"}.get(
            str(s.get("focus_mode")), str(s.get("focus_mode") or ("tracking" if s.get("track_focus") else "not tracking")))
        self._set("focus", f"{'; '.join(parts)} — {mode}", alarm=lost)

    def _show_worker(self, s: dict[str, Any]) -> None:
        if s.get("worker_alive") is None:  # no local worker: remote workers only
            self._set("worker", "—")
            return
        alive = bool(s["worker_alive"])
        restarts = s.get("worker_restarts", 0)
        pid = s.get("worker_pid")
        text = (f"alive (pid {pid})" if alive else "DOWN") + f", {restarts} restart(s)"
        self._set("worker", text, alarm=not alive)

    def _show_dose(self, s: dict[str, Any]) -> None:
        used = s.get("fluorescence_dose_ms")
        avoided = s.get("equivalent_fluorescence_run_dose_ms")
        if avoided:
            used_ms = float(used or 0.0)
            share = 100.0 * used_ms / float(avoided)
            self._set("dose", f"fluorescence light: {used_ms:.0f} ms used of {float(avoided):.0f} ms a "
                              f"fluorescence run would have used ({share:.1f}%)"
                              + ("" if used is not None else "; this microscope keeps no light ledger"))
            self.labels["dose"].setToolTip(str(s.get("dose_note", "")))
        else:
            n = int(s.get("stacks_predicted", 0) or 0)
            k = self.n_structures
            if k is None:
                self._set("dose", f"fluorescence light avoided: {n} stacks x ? channels")
            else:
                self._set("dose", f"fluorescence light avoided: {n} stacks x {k} channels "
                                  f"= {n * k} fluorescence stacks not exposed")

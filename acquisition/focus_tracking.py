"""Keeping a drifting sample in the stack: focus tracking from the brightfield itself.

Over a run of days the sample drifts in z (thermal expansion, evaporation, a settling
dish). Measured with the bundled model: 6 um of drift takes DNA r from 0.98 to ~0.1,
and nothing in the image says so to the eye. Every streamed stack's focal plane is
estimated from its brightfield (`livestain.focus.estimate_focus`: the contrast minimum
between the reversed halos) and recorded (stack metadata, journal, ``status``). With
``policies.track_focus`` the next stacks of that position are moved to put the cells
back at the stack's centre: at most ``focus_max_step_um`` per time point (a wrong
estimate can never throw the stack far), nothing within ``focus_deadband_um`` (no
jitter from estimation noise), every move logged.

The move is applied to the plan's events as the MDA runner asks for them (pymmcore-plus
runs an iterable of events lazily), per (t, p): every plane and channel of one stack
gets the same correction. The runner asks for a stack's first event as soon as the
previous stack is taken and only then waits for its start time, which would make every
move a time point late; `tracked_events` holds that first event back until its start
time, so the stack just taken has been judged when the next one is placed.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import useq

from livestain.focus import FocusEstimate


@dataclass(frozen=True)
class FocusMove:
    """What one stack's estimate did to its position's next stacks."""

    offset_um: float | None  # cells' focal plane from the stack's centre (None: not found)
    correction_um: float  # the position's z correction from now on (0: the plan's own z)
    moved_um: float  # the change (0: none)


class FocusTracker:
    """Per-position z corrections from focus estimates, applied to the plan's events.

    Parameters
    ----------
    enabled : bool
        Move the stage (``policies.track_focus``); off, estimates are only recorded.
    max_step_um : float
        Largest move per time point of a position.
    deadband_um : float
        Offsets smaller than this are left alone.
    target_um : float
        Where the cells should sit, from the stack's centre (0: centred).
    """

    #: Focus history kept per position for ``status`` and the window's plot (the full
    #: record is in the journal and each stack's metadata).
    HISTORY = 256
    #: Corrections remembered for stacks whose estimate has not come yet (bounded: a
    #: stack that never completes leaves its entry, the oldest are dropped).
    PENDING = 4096

    def __init__(self, enabled: bool = False, max_step_um: float = 2.0, deadband_um: float = 0.5,
                 target_um: float = 0.0) -> None:
        self.enabled = enabled
        self.max_step_um = float(max_step_um)
        self.deadband_um = float(deadband_um)
        self.target_um = float(target_um)
        self.corrections: dict[int, float] = {}
        self._applied: OrderedDict[tuple[int, int], float] = OrderedDict()
        #: per position: (t, offset found, correction the stack was taken with, correction after)
        self.history: dict[int, deque[tuple[int, float | None, float, float]]] = {}

    def shift(self, event: useq.MDAEvent) -> useq.MDAEvent:
        """``event`` with its position's current correction (fixed per stack) added to z."""
        if not self.enabled or event.z_pos is None:
            return event
        key = (event.index.get("t", 0), event.index.get("p", 0))
        if key not in self._applied:
            self._applied[key] = self.corrections.get(key[1], 0.0)
            while len(self._applied) > self.PENDING:
                self._applied.popitem(last=False)
        correction = self._applied[key]
        return event if correction == 0.0 else event.model_copy(update={"z_pos": event.z_pos + correction})

    def observe(self, t: int, p: int, estimate: FocusEstimate) -> FocusMove:
        """Record stack (t, p)'s estimate and, when tracking, set the position's correction."""
        used = self._applied.pop((t, p), self.corrections.get(p, 0.0))
        correction = self.corrections.get(p, 0.0)
        moved = 0.0
        if self.enabled and estimate.offset_um is not None:
            error = estimate.offset_um - self.target_um
            if abs(error) > self.deadband_um:
                step = max(-self.max_step_um, min(self.max_step_um, error))
                new = used + step  # relative to the z this stack was taken at
                moved, correction = new - correction, new
                self.corrections[p] = correction
        history = self.history.setdefault(p, deque(maxlen=self.HISTORY))
        history.append((t, estimate.offset_um, used, correction))
        return FocusMove(estimate.offset_um, correction, moved)

    def correction_of(self, t: int, p: int) -> float:
        """The correction stack (t, p) was (or will be) acquired with."""
        return self._applied.get((t, p), self.corrections.get(p, 0.0))

    def status(self) -> dict[str, Any]:
        """``focus``: per position, its latest stack's time point, where its cells were
        from the stack's centre (``offset_um``), the z correction that stack was taken
        with (``taken_at_um``) and the one its next stacks get (``correction_um``);
        ``track_focus``."""
        latest = {}
        for p, h in self.history.items():
            t, offset, used, correction = h[-1]
            latest[str(p)] = {"t": t, "offset_um": None if offset is None else round(offset, 3),
                              "taken_at_um": round(used, 3), "correction_um": round(correction, 3)}
        return {"track_focus": self.enabled, "focus": latest}


class _Runner(Protocol):
    """What `tracked_events` needs of pymmcore-plus's `MDARunner` (its public methods)."""

    def is_running(self) -> bool: ...
    def is_paused(self) -> bool: ...
    def event_seconds_elapsed(self) -> float: ...


def tracked_events(events: Iterable[useq.MDAEvent], tracker: FocusTracker, runner: _Runner,
                   poll_s: float = 0.1) -> Iterator[useq.MDAEvent]:
    """``events`` with the tracker's corrections, each stack's first event held back until
    its start time (see the module docstring). While the runner is paused the wait goes
    on; once it stops running (a cancelled run) nothing is held back."""
    current = None
    for event in events:
        key = (event.index.get("t", 0), event.index.get("p", 0))
        if key != current:
            current = key
            start = event.min_start_time or 0.0
            while start and runner.is_running():
                remaining = start - runner.event_seconds_elapsed()
                if remaining <= 0 and not runner.is_paused():
                    break
                time.sleep(min(poll_s, max(remaining, 0.005)))
        yield tracker.shift(event)

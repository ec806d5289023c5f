"""Retrying a failed snap before it becomes a gap in the data.

Cameras time out now and then (a dropped USB packet, a busy frame grabber). pymmcore-plus's
engine logs a failed snap and moves on, which livestain records as a gap in the stack;
retrying first turns most such hiccups into nothing at all.

The retry is an `MDAEngine` subclass, the extension point pymmcore-plus offers for this
(its ``exec_single_event`` "is made public in case a user wants to subclass this engine
and override this method"): the engine yields a frame per camera channel for a snap that
worked and nothing for one that failed, so the subclass runs the event again while it
yields nothing. It subclasses the core's own engine class and copies its settings, so a
scope with an engine of its own keeps it. Hardware-sequenced stacks stream from the camera
and are not retried frame by frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

#: The MDAEngine settings a replacement engine copies from the one it replaces.
_ENGINE_SETTINGS = ("use_hardware_sequencing", "force_set_xy_position", "restore_initial_state",
                    "timeout_base", "timeout_multiplier", "timeout_first_frame", "timeout_action")


class SnapRetries:
    """Mixin for an MDAEngine class: a snap that yields no frame is tried ``retries`` more
    times (``pause_s`` apart); counts are kept in ``counts``."""

    retries: int = 2
    pause_s: float = 0.05
    report: Callable[[str], None] = staticmethod(print)
    counts: dict[str, int]

    def exec_single_event(self, event: Any) -> Iterator[Any]:
        for attempt in range(self.retries + 1):
            frames = list(super().exec_single_event(event))  # type: ignore[misc]
            if frames:
                # One plain yield per frame, never ``yield from frames``: the runner sends
                # "pause" / "cancel" into the engine's generator, and ``yield from`` a list
                # hands that to the list's iterator, which has no ``send`` (the MDA thread
                # died the first time a run was paused mid-event).
                for frame in frames:
                    yield frame
                return
            if attempt == self.retries:
                self.counts["snap_failures"] += 1
                self.report(f"snap failed {self.retries + 1} times; the plane is recorded as a gap")
                return
            self.counts["snap_retries"] += 1
            log.warning("snap gave no frame; retry %d/%d", attempt + 1, self.retries)
            time.sleep(self.pause_s)


def install_snap_retries(
    core: Any, retries: int, report: Callable[[str], None] = print, pause_s: float = 0.05
) -> Callable[[], dict[str, int]]:
    """Give ``core`` an engine that retries failed snaps; returns a reader of its counts."""
    engine = core.mda.engine
    base = type(engine)
    if isinstance(engine, SnapRetries):  # installed before (a second daemon on this core)
        base = next(c for c in base.__mro__[1:] if not issubclass(c, SnapRetries))
    counts = {"snap_retries": 0, "snap_failures": 0}
    retrying = type(f"SnapRetrying{base.__name__}", (SnapRetries, base),
                    {"retries": retries, "pause_s": pause_s, "report": staticmethod(report), "counts": counts})
    settings = {name: getattr(engine, name) for name in _ENGINE_SETTINGS if hasattr(engine, name)}
    core.register_mda_engine(retrying(core, **settings))
    return lambda: dict(counts)

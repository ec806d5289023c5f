"""Retrying a failed snap before it becomes a gap in the data.

Cameras time out now and then (a dropped USB packet, a busy frame grabber). pymmcore-plus's
engine logs a failed snap and moves on, which livestain records as a gap in the stack;
retrying first turns most such hiccups into nothing at all. The retry wraps the core's
``snapImage`` on this one core instance, so it works for the simulated and real cores
alike and the MDA engine needs no changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def install_snap_retries(
    core: Any, retries: int, report: Callable[[str], None] = print, pause_s: float = 0.05
) -> Callable[[], dict[str, int]]:
    """Make ``core.snapImage`` retry up to ``retries`` times; returns a counter reader."""
    counts = {"snap_retries": 0, "snap_failures": 0}
    if getattr(core, "_livestain_original_snap", None) is None:
        core._livestain_original_snap = core.snapImage
    snap = core._livestain_original_snap

    def snap_with_retries() -> None:
        for attempt in range(retries + 1):
            try:
                snap()
                return
            except Exception as e:  # any adapter error: that is what a retry is for
                if attempt == retries:
                    counts["snap_failures"] += 1
                    report(f"snap failed {retries + 1} times ({e}); the plane is recorded as a gap")
                    raise
                counts["snap_retries"] += 1
                log.warning("snap failed (%s); retry %d/%d", e, attempt + 1, retries)
                time.sleep(pause_s)

    core.snapImage = snap_with_retries
    return lambda: dict(counts)

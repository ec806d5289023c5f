"""Bounded in-memory history of received stacks and predictions, per stage position.

The viewer must be able to look back a few time points (did that cell just divide?)
without ever growing without bound during a three-day run. So history holds at most
``max_timepoints`` time points per position and at most ``max_bytes`` of pixels in all,
evicting the oldest first. The newest stack and the newest prediction of every
position are never evicted (they are what the live view draws), so the cap can be
exceeded by at most one stack + one prediction per position; `over_cap` says so.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from livestain.wire import StackHeader

#: Defaults: enough to scrub back a few minutes at typical intervals on a 16 GB PC.
DEFAULT_TIMEPOINTS = 50
DEFAULT_MAX_MB = 1024

_serials = itertools.count()


@dataclass(eq=False)
class Received:
    """One stack or prediction as received: header, pixels, local receipt time."""

    header: StackHeader
    array: np.ndarray
    received_at: float = field(default_factory=time.time)
    #: Unique per record (unlike ``id()``, never reused): the key of derived-image caches.
    serial: int = field(default_factory=lambda: next(_serials))

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass
class Entry:
    """What the viewer holds for one (position, time point)."""

    p: int
    t: int
    stack: Received | None = None
    prediction: Received | None = None
    touched: int = 0  # insertion counter of the last update (eviction order)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in (self.stack, self.prediction) if r is not None)


class History:
    """Stacks and predictions by position and time point, bounded in count and bytes."""

    def __init__(self, max_timepoints: int = DEFAULT_TIMEPOINTS, max_mb: float = DEFAULT_MAX_MB) -> None:
        if max_timepoints < 1:
            raise ValueError("history must hold at least one time point per position")
        self.max_timepoints = max_timepoints
        self.max_bytes = int(max_mb * 1024**2)
        self.run_id: str | None = None
        self._entries: dict[int, dict[int, Entry]] = {}
        self._newest: dict[tuple[int, str], Received] = {}
        self._counter = 0
        self.nbytes = 0
        #: Entries evicted so far (count or memory cap).
        self.evicted = 0

    def clear(self) -> None:
        self._entries.clear()
        self._newest.clear()
        self.nbytes = 0

    def add(self, header: StackHeader, array: np.ndarray, received_at: float | None = None) -> Received:
        """Store one message (a new run clears everything first); return its record."""
        if header.run_id != self.run_id:
            self.clear()
            self.run_id = header.run_id
        rec = Received(header, array, received_at if received_at is not None else time.time())
        per_p = self._entries.setdefault(header.p, {})
        entry = per_p.get(header.t)
        if entry is None:
            entry = per_p[header.t] = Entry(header.p, header.t)
        old = entry.stack if header.kind == "stack" else entry.prediction
        if old is not None:
            self.nbytes -= old.nbytes
        if header.kind == "stack":
            entry.stack = rec
        else:
            entry.prediction = rec
        self.nbytes += rec.nbytes
        self._counter += 1
        entry.touched = self._counter
        newest = self._newest.get((header.p, header.kind))
        if newest is None or (header.t, header.seq) >= (newest.header.t, newest.header.seq):
            self._newest[(header.p, header.kind)] = rec
        self._evict()
        return rec

    # -- queries --------------------------------------------------------------------

    def positions(self) -> list[int]:
        return sorted(self._entries)

    def times(self, p: int) -> list[int]:
        """Time points held for position ``p``, ascending."""
        return sorted(self._entries.get(p, {}))

    def get(self, p: int, t: int) -> Entry | None:
        return self._entries.get(p, {}).get(t)

    def newest(self, p: int, kind: str) -> Received | None:
        """Newest ``kind`` ("stack"/"prediction") of position ``p`` (by t, then seq)."""
        return self._newest.get((p, kind))

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    @property
    def over_cap(self) -> bool:
        return self.nbytes > self.max_bytes

    def describe(self) -> str:
        """One line for the UI: what is held against which caps."""
        return (f"history {len(self)} frame(s), {self.nbytes / 1024**2:.0f} of "
                f"{self.max_bytes / 1024**2:.0f} MB; keeps ≤{self.max_timepoints} time points "
                f"per position, oldest evicted first")

    # -- eviction -------------------------------------------------------------------

    def _protected(self, entry: Entry) -> bool:
        return any(
            r is not None and self._newest.get((entry.p, k)) is r
            for k, r in (("stack", entry.stack), ("prediction", entry.prediction))
        )

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.p][entry.t]
        self.nbytes -= entry.nbytes
        self.evicted += 1

    def _evict(self) -> None:
        for per_p in self._entries.values():
            while len(per_p) > self.max_timepoints:
                victims = [e for e in per_p.values() if not self._protected(e)]
                if not victims:
                    break
                self._drop(min(victims, key=lambda e: e.t))
        while self.nbytes > self.max_bytes:
            victims = [e for per_p in self._entries.values() for e in per_p.values()
                       if not self._protected(e)]
            if not victims:
                break
            self._drop(min(victims, key=lambda e: (e.t, e.touched)))

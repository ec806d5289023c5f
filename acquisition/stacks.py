"""Assembling single frames into whole z-stacks, keyed by the event's index.

pymmcore-plus delivers frames one at a time with the `useq.MDAEvent` that produced them.
Frames are placed by the event's ``(t, p, c)`` and ``z`` indices, never by arrival
order, so a skipped or failed frame leaves a recorded gap instead of shifting every
later plane into the wrong place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import useq

StackKey = tuple[int, int, str]  # (t, p, channel)


@dataclass
class Stack:
    """A z-stack being filled, or finished.

    Attributes
    ----------
    key : tuple[int, int, str]
        (t index, p index, channel name).
    planes : np.ndarray
        (z, y, x) pixels; planes not yet received are zero.
    received : np.ndarray
        Per-plane flag: did its frame arrive?
    positions_um : np.ndarray
        (z, 3) stage x, y, z of each plane (NaN where missing).
    times : np.ndarray
        Unix time each plane arrived (NaN where missing).
    """

    key: StackKey
    planes: np.ndarray
    received: np.ndarray
    positions_um: np.ndarray
    times: np.ndarray
    exposure_ms: float = 0.0
    metadata: dict = field(default_factory=dict)

    @classmethod
    def all_missing(cls, key: StackKey, n_z: int, like: np.ndarray) -> Stack:
        """A stack whose every plane failed: zeros, every plane listed missing. It is
        written as a recorded gap (never sent for prediction), so the audit finds it with
        its reason instead of it vanishing without a record."""
        return cls(key=key, planes=np.zeros((n_z, *like.shape), like.dtype),
                   received=np.zeros(n_z, bool), positions_um=np.full((n_z, 3), np.nan),
                   times=np.full(n_z, time.time()))

    @property
    def t(self) -> int:
        return self.key[0]

    @property
    def p(self) -> int:
        return self.key[1]

    @property
    def channel(self) -> str:
        return self.key[2]

    @property
    def complete(self) -> bool:
        return bool(self.received.all())

    @property
    def gaps(self) -> list[int]:
        """z indices whose frame never arrived."""
        return [int(i) for i in np.flatnonzero(~self.received)]


class StackAssembler:
    """Collects frames of a useq plan into `Stack` objects and hands out finished ones.

    Parameters
    ----------
    n_z : int
        Planes per stack (1 for plans without a z-plan).
    """

    def __init__(self, n_z: int) -> None:
        self.n_z = max(1, int(n_z))
        self._open: dict[StackKey, Stack] = {}

    @classmethod
    def for_sequence(cls, sequence: useq.MDASequence) -> StackAssembler:
        return cls(sequence.sizes.get("z", 1) or 1)

    def add(self, event: useq.MDAEvent, image: np.ndarray, arrived: float | None = None) -> list[Stack]:
        """Place one frame; returns the stacks that are now finished.

        That is the frame's own stack when it completed it, and any open stack of an
        earlier (t, p): since z is an inner axis, no more frames can arrive for it, so a
        frame that failed there is a recorded gap, and the stack is not held back.
        """
        idx = event.index
        channel = event.channel.config if event.channel is not None else ""
        t, p = int(idx.get("t", 0)), int(idx.get("p", 0))
        key = (t, p, channel)
        z = int(idx.get("z", 0))
        if not 0 <= z < self.n_z:
            raise IndexError(f"frame z index {z} outside a {self.n_z}-plane stack")
        finished = [self._open.pop(k) for k in list(self._open) if k[:2] != (t, p)]
        stack = self._open.get(key)
        if stack is None:
            stack = Stack(
                key=key,
                planes=np.zeros((self.n_z, *image.shape), image.dtype),
                received=np.zeros(self.n_z, bool),
                positions_um=np.full((self.n_z, 3), np.nan),
                times=np.full(self.n_z, np.nan),
                exposure_ms=float(event.exposure or 0.0),
            )
            self._open[key] = stack
        stack.planes[z] = image
        stack.received[z] = True
        stack.positions_um[z] = [
            np.nan if v is None else v for v in (event.x_pos, event.y_pos, event.z_pos)
        ]
        stack.times[z] = time.time() if arrived is None else arrived
        if stack.complete:
            finished.append(self._open.pop(key))
        return finished

    def flush(self) -> list[Stack]:
        """Hand out every unfinished stack (end of run), oldest first, gaps recorded."""
        stacks = sorted(self._open.values(), key=lambda s: (s.t, s.p, s.channel))
        self._open.clear()
        return stacks

    @property
    def n_open(self) -> int:
        return len(self._open)


class LostStackTracker:
    """Finds the stacks of the plan that got no frame at all.

    The assembler opens a stack on its first frame, so a stack whose every plane failed
    on the camera never existed: it vanished without a record (found by the soak: the
    audit counted it missing, with no reason). Frames arrive in the plan's order, so a
    frame of one stack means every planned stack before it, not yet seen, is lost.

    Parameters
    ----------
    keys : iterator of (t, p, channel)
        The plan's stacks still to acquire, in acquisition order.
    """

    def __init__(self, keys: Iterator[StackKey]) -> None:
        self._keys = keys
        self._current: StackKey | None = None
        self._next: StackKey | None = next(keys, None)
        self.enabled = True

    def seen(self, key: StackKey) -> list[StackKey]:
        """A frame of ``key`` arrived; returns the planned stacks before it that got none."""
        if key == self._current or not self.enabled:
            return []
        lost = []
        while self._next is not None and self._next != key:
            lost.append(self._next)
            self._next = next(self._keys, None)
        if self._next is None:  # a frame the plan does not list: stop judging, claim nothing
            self.enabled = False
            return []
        self._current, self._next = key, next(self._keys, None)
        return lost

    def remaining(self) -> Iterator[StackKey]:
        """Planned stacks after the last frame (lost if the plan ran to its end)."""
        if not self.enabled:
            return
        while self._next is not None:
            yield self._next
            self._next = next(self._keys, None)

"""What remains of a plan, and what the plan needs from the scope: pure functions of a
useq sequence (and, for the last two, of the core's configuration).

A stack is keyed by ``(t, p, channel)``: z makes up the stack. A resumed run skips
every key already on disk, so nothing on disk is ever acquired twice or replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import useq

from .checks import with_check_channels
from .policies import Policies
from .stacks import StackKey


def stack_key(event: useq.MDAEvent) -> StackKey:
    """The ``(t, p, channel)`` of the stack an event's frame belongs to."""
    return (event.index.get("t", 0), event.index.get("p", 0),
            event.channel.config if event.channel else "")


def interval_s(sequence: useq.MDASequence) -> float:
    """The plan's time step in seconds (0 for none), the t scale of a Zarr run."""
    interval = getattr(sequence.time_plan, "interval", None)
    return float(interval.total_seconds()) if interval is not None else 0.0


def first_incomplete_t(sequence: useq.MDASequence, done: set[StackKey]) -> int:
    """First time point with a stack not yet on disk (for the console line); the number
    of time points when none is left."""
    return scan_pending(sequence, done)[0]


def scan_pending(sequence: useq.MDASequence, done: set[StackKey]) -> tuple[int, float | None]:
    """One pass over the plan (a three-day plan's pass takes seconds): the first time
    point still to take (the number of time points when none is) and the clock offset
    of the first pending event (None when nothing is pending)."""
    first_t, offset = sequence.sizes.get("t", 1) or 1, None
    for e in sequence.iter_events():
        key = stack_key(e)
        if key in done:
            continue
        first_t = min(first_t, key[0])
        start = e.min_start_time or 0.0
        offset = start if offset is None else min(offset, start)
    return first_t, offset


_UNSCANNED = object()


def pending_events(sequence: useq.MDASequence, done: set[StackKey],
                   offset: float | None | object = _UNSCANNED) -> Iterable[useq.MDAEvent]:
    """The plan less every stack already on disk, its clock shifted to now.

    Lazy: a three-day plan is millions of events (96 positions x 16 planes x 4,320
    time points), and a list of them (~2.7 KB each) took gigabytes at ``--resume``.
    One pass finds the clock offset without keeping anything; the events themselves
    are made as the runner asks for them. No pending event: an empty list.
    """
    if not done:
        return sequence
    if offset is _UNSCANNED:  # ``offset`` from `scan_pending` saves this pass
        offset = scan_pending(sequence, done)[1]
    if offset is None:
        return []
    return PendingEvents(sequence, frozenset(done), float(offset), stack_key)  # type: ignore[arg-type]


class PendingEvents:
    """The plan's events not yet on disk, shifted by ``offset`` s, made on demand.

    An iterable, not an iterator: pymmcore-plus runs an iterator as given, but passes
    other iterables through its engine's ``event_iterator`` (which merges z-stacks into
    hardware sequences), as it did the list this replaces.
    """

    def __init__(self, sequence: useq.MDASequence, done: frozenset[StackKey],
                 offset: float, key: Callable[[useq.MDAEvent], StackKey]) -> None:
        self.sequence, self.done, self.offset, self.key = sequence, done, offset, key

    def __iter__(self) -> Iterator[useq.MDAEvent]:
        for e in self.sequence.iter_events():
            if self.key(e) in self.done:
                continue
            if e.min_start_time is not None:
                e = e.model_copy(update={"min_start_time": e.min_start_time - self.offset})
            yield e


def pending_keys(sequence: useq.MDASequence, done: set[StackKey]) -> Iterator[StackKey]:
    """The plan's stacks not yet on disk, in acquisition order, made on demand."""
    previous = None
    for event in sequence.model_copy(update={"z_plan": None}).iter_events():
        if event.action is not None and type(event.action).__name__ != "AcquireImage":
            continue  # an autofocus event takes no image
        key = stack_key(event)
        if key != previous and key not in done:
            yield key
        previous = key


def check_axis_order(sequence: useq.MDASequence) -> None:
    """z must be inner to t and p: livestain assembles whole z-stacks."""
    order = "".join(sequence.axis_order)
    if "z" in order:
        z = order.index("z")
        outer = [a for a in "tp" if a in order and order.index(a) > z]
        if outer:
            raise ValueError(
                f"axis_order {order!r} puts z outside {''.join(outer)}: livestain needs whole "
                f"z-stacks, so z must come after t and p (e.g. 'tpcz' or 'tpzc')"
            )


def autofocus_device(core: Any) -> str:
    """The scope's hardware autofocus device, "" when it has none."""
    try:
        return str(core.getAutoFocusDevice() or "")
    except (RuntimeError, AttributeError):
        return ""


def channel_presets(core: Any, sequence: useq.MDASequence) -> list[str]:
    """The presets of the plan's channel group on this scope (where check channels come from)."""
    group = sequence.channels[0].group if sequence.channels else "Channel"
    try:
        return list(core.getAvailableConfigs(group))
    except (RuntimeError, ValueError):
        return []


def focus_mode(track_focus: bool, core: Any) -> str:
    """How the run keeps its cells in the stack: a hardware autofocus device does it
    itself (useq's ``autofocus_plan``, run by pymmcore-plus; the brightfield estimate is
    then only recorded), else the brightfield estimate moves the stacks, else nothing."""
    if not track_focus:
        return "off"
    device = autofocus_device(core)
    return f"hardware autofocus ({device})" if device else "brightfield"


def plan_for_scope(sequence: useq.MDASequence, policies: Policies, core: Any, n_predicted: int) -> useq.MDASequence:
    """The plan as the scope runs it: the hardware autofocus (when tracking focus on a
    scope with one) and the check frames' channels (``acquire_every``: counted,
    audited and budgeted like any channel) added."""
    device = autofocus_device(core)
    if policies.track_focus and device and sequence.autofocus_plan is None:
        sequence = sequence.model_copy(update={"autofocus_plan": useq.AxesBasedAF(
            autofocus_device_name=device, axes=("t", "p"))})
    return with_check_channels(sequence, policies.checks, channel_presets(core, sequence),
                               n_predicted, policies.equivalent_fluorescence_exposure_ms)

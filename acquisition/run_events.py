"""What happens to a run's stacks, as events its stages subscribe to.

In the style of pymmcore-plus's ``mda.events``: the daemon says a stack was written or
a prediction was written, and whoever acts on that (the viewers' display socket, the
workers' queue, check-frame scoring) is a handler connected to the event, so a new
stage is a new handler, not a new line in the daemon. Raw data is the exception: the
store writes a stack *before* the event, because nothing may see a stack that is not
safely on disk.

Handlers run on the daemon loop's thread, in the order they were connected. A handler's
exception reaches the daemon as itself (not wrapped in psygnal's ``EmitLoopError``), so
a `RunStopped` raised by one (a full disk while journaling a check score) stops the run
as any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psygnal import EmitLoopError, Signal, SignalGroup, SignalInstance

from livestain import wire

from .stacks import Stack


@dataclass(frozen=True)
class WrittenStack:
    """A stack now on disk and journaled (at least one plane acquired)."""

    seq: int
    stack: Stack
    header: wire.StackHeader
    ref: Path  # its store reference


@dataclass(frozen=True)
class WrittenPrediction:
    """A stack's prediction now on disk and journaled."""

    seq: int
    t: int
    p: int
    ref: Path
    structures: list[str]
    confidence: float | None


class RunEvents(SignalGroup):
    """The run's events (connect handlers with ``events.stack_written.connect(fn)``)."""

    stack_written = Signal(WrittenStack)
    prediction_written = Signal(WrittenPrediction)


def emit(signal: SignalInstance, event: Any) -> None:
    """Emit ``event``; a handler's exception is raised as itself."""
    try:
        signal.emit(event)
    except EmitLoopError as e:
        if isinstance(e.__cause__, BaseException):
            raise e.__cause__ from None
        raise

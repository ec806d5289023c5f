"""Where each acquired stack stands between the disk and its prediction: a typed state.

A stack is on disk (and in the journal) before it has any state here; from then on::

    QUEUED --sent to a worker--> SENT --prediction written--> PREDICTED
      |  ^                         |
      |  +------- caught up -------+---- worker died / hung: sent again (QUEUED)
      v                            v
     LATE <------- left the live queue (newest first), or a resume found it unpredicted

What each state means for the same-host shared memory (`livestain.shm`), which is what
makes the transitions matter: a QUEUED stack's pixels sit in a pooled segment offered
to workers; a SENT stack's segment (and the result segment lent with it) belongs to
the worker holding it until its prediction or failure comes back; a LATE stack holds no
segment (it is read back from disk when workers have time); a PREDICTED stack's
segments are released and the record is dropped. `StackRecord.move` checks each move
against `TRANSITIONS` and logs one that is not in it, so a new code path that skips a
step is visible in the log rather than a leaked or reused segment found days later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from livestain import wire

log = logging.getLogger(__name__)


class StackState(StrEnum):
    """A stack's place between the disk and its prediction (a str, so it prints and
    compares as its name)."""

    QUEUED = "queued"
    SENT = "sent"
    LATE = "late"
    PREDICTED = "predicted"


#: Moves a stack may make (anything else is logged by `StackRecord.move`).
TRANSITIONS: dict[StackState, frozenset[StackState]] = {
    StackState.QUEUED: frozenset({StackState.SENT, StackState.LATE}),
    StackState.SENT: frozenset({StackState.PREDICTED, StackState.QUEUED, StackState.LATE}),
    StackState.LATE: frozenset({StackState.QUEUED}),
    StackState.PREDICTED: frozenset(),
}


@dataclass
class StackRecord:
    """What the daemon knows of each stack it acquired and has not seen predicted."""

    seq: int
    t: int
    p: int
    raw_path: Path  # its store reference (`livestain.store`)
    completed_at: float
    header: wire.StackHeader | None = None
    state: StackState = StackState.QUEUED
    sent_at: float = 0.0
    predicted_path: Path | None = None
    latency_s: float | None = None
    caught_up: bool = False
    holder: str = ""  # the worker that has it, while SENT

    def move(self, to: StackState) -> None:
        """Change state, logging a move `TRANSITIONS` does not allow (never raising: a
        run of days must not stop on bookkeeping)."""
        if to != self.state and to not in TRANSITIONS[self.state]:
            log.warning("stack seq %d moved %s -> %s, which the stack states do not allow",
                        self.seq, self.state, to)
        self.state = to

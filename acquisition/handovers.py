"""Who may answer for a stack: the daemon's memory of which worker got what, and the
token a loopback worker must present.

A prediction (or failure report) is taken only from a worker its stack was handed to,
and only with this run's token: another local process posing as a worker is refused
and counted. Every memory here is bounded, since a run of days hands out hundreds of
thousands of stacks and restarts some workers many times.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from livestain import wire
from livestain.security import TOKEN_ENV, DaemonToken

log = logging.getLogger(__name__)


class HandOvers:
    """Stacks handed to workers (in flight, and recently done), and when each worker
    last asked for work."""

    #: Hand-overs of released stacks remembered, so a late answer from a worker the
    #: stack was handed to is a duplicate, not a stranger's (bounded: runs last days).
    FINISHED_MEMORY = 1024
    #: Workers (identities, names) remembered for hand-over counts and heartbeats; past
    #: it the longest unseen are forgotten (a worker restarted hundreds of times).
    WORKERS_REMEMBERED = 64

    def __init__(self) -> None:
        # stacks handed to each worker identity, most recent last (every restart of a
        # worker is a new identity)
        self.sent_to: OrderedDict[bytes, int] = OrderedDict()
        # worker names each stack in flight was handed to; released ones, briefly
        self.handed: dict[int, set[str]] = {}
        self._finished: OrderedDict[int, frozenset[str]] = OrderedDict()
        self.workers_seen: OrderedDict[str, float] = OrderedDict()

    def asked(self, identity: bytes, name: str, received: int) -> bool:
        """A worker asked for work; True when it is free (it has received every stack
        sent to it: a ready message queued before its last stack left is a heartbeat)."""
        _touch(self.workers_seen, name, time.monotonic(), self.WORKERS_REMEMBERED)
        return received >= self.sent_to.get(identity, 0)

    def hand(self, seq: int, identity: bytes, name: str) -> None:
        """Stack ``seq`` went to this worker."""
        self.handed.setdefault(seq, set()).add(name)
        _touch(self.sent_to, identity, self.sent_to.get(identity, 0) + 1, self.WORKERS_REMEMBERED)

    def forget(self, seq: int) -> None:
        """Stack ``seq`` is done: its hand-overs move to the short memory of finished
        stacks, so the record of stacks in flight never grows over a run of days."""
        names = self.handed.pop(seq, None)
        if names is None:
            return
        self._finished[seq] = self._finished.pop(seq, frozenset()) | names
        while len(self._finished) > self.FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def was_handed(self, seq: int | None, worker: str) -> bool:
        """True when stack ``seq`` was handed to ``worker`` (in flight, or recently done:
        a late duplicate is then the daemon's to drop, not a stranger's answer)."""
        return worker in self.handed.get(seq, ()) or worker in self._finished.get(seq, ())  # type: ignore[arg-type]

    def heartbeats(self) -> dict[str, float]:
        """Seconds since each worker last asked for work (absent: never seen)."""
        now = time.monotonic()
        return {name: round(now - at, 1) for name, at in self.workers_seen.items()}


class TokenGate:
    """Accepts messages that carry the run's worker token (everything, with CURVE keys:
    the key has authenticated the peer already); counts and logs the rest, at most one
    line every `LOG_EVERY_S` (a stale worker repeats its ready message every second)."""

    LOG_EVERY_S = 10.0

    def __init__(self, token: DaemonToken | None, counts: object) -> None:
        self.token = token
        self.counts = counts  # `streaming.StreamCounts`
        self._last_log = 0.0
        self._unlogged = 0

    def accepts(self, message: dict | wire.StackHeader | wire.FailureHeader) -> bool:
        """True when a ready body, prediction header or failure report carries the token
        (which is taken out of a header: a secret goes into no file)."""
        if isinstance(message, wire.StackHeader):
            presented = wire.pop_token(message)
        elif isinstance(message, wire.FailureHeader):
            presented = wire.pop_failure_token(message)
        else:
            presented = message.get(wire.TOKEN_FIELD)
        return self.token is None or self.token.accepts(presented)

    def refuse(self, reason: str) -> None:
        """Count a message from a peer without the token, and say so now and then."""
        self.counts.malformed_results += 1  # type: ignore[attr-defined]
        self.counts.unauthenticated += 1  # type: ignore[attr-defined]
        now = time.monotonic()
        if now - self._last_log < self.LOG_EVERY_S:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more since the last such line)" if self._unlogged else ""
        log.warning("dropped %s%s; a worker needs the token file %s or $%s", reason, more,
                    self.token.path if self.token else "-", TOKEN_ENV)
        self._last_log, self._unlogged = now, 0


def _touch(memory: OrderedDict, key: object, value: object, limit: int) -> None:
    """Set ``memory[key]`` as the most recent entry; forget the oldest past ``limit``."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)

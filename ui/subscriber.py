"""Non-blocking subscriber to the daemon's ``display`` PUB socket.

The viewer redraws at a few Hz while the daemon may publish faster, so each poll
drains everything queued and keeps only the newest stack and newest prediction of each
stage position. A small receive high-water mark bounds what queues up (past it ZeroMQ drops the
newest arrivals until the viewer drains the queue), so a slow viewer never holds much
memory or lags far behind the microscope.

The socket only connects, and ZeroMQ keeps retrying the connection in the background
(every `RECONNECT_MS`), so a daemon that restarts on the same port is picked up again
without the viewer doing anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import numpy as np
import zmq

from livestain.security import apply_client
from livestain.wire import StackHeader, WireError, decode

log = logging.getLogger(__name__)

#: Messages queued per subscriber before ZeroMQ drops new ones (the publisher never blocks).
RCVHWM = 4
#: Reconnection interval after the daemon went away (ZeroMQ retries by itself).
RECONNECT_MS = 200
RECONNECT_MAX_MS = 2000


class Message(NamedTuple):
    """One decoded display message (the array is a copy from `poll_latest`, a read-only
    view of the frame from `poll`)."""

    header: StackHeader
    array: np.ndarray


class DisplaySubscriber:
    """SUB socket connected to a daemon's ``display`` endpoint (subscribed to everything)."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, keys: str | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        apply_client(self._sock, keys)
        self._sock.setsockopt(zmq.RCVHWM, RCVHWM)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        self._sock.connect(endpoint)
        #: Malformed messages dropped since the subscriber was created.
        self.n_malformed = 0
        #: Valid messages received per kind, including those superseded within a poll.
        self.received: dict[str, int] = {"stack": 0, "prediction": 0}

    def poll(self) -> tuple[list[Message], int]:
        """Drain the queue without blocking.

        Returns the newest stack and newest prediction of every position that sent
        any since the last poll (in arrival order of those kept) and how many malformed
        messages this poll dropped.

        The arrays are read-only views of the received ZeroMQ frames, not copies: a
        view keeps its frame alive, and copying a 2048x2048 x 16-plane x 3-structure
        prediction (0.8 GB) would stall the window for over a second. Superseded
        messages are released at once.
        """
        latest: dict[tuple[str, int], tuple[StackHeader, np.ndarray]] = {}
        dropped = self._drain(latest, key=lambda h: (h.kind, h.p))
        return [Message(h, a) for h, a in latest.values()], dropped

    def poll_latest(self) -> tuple[Message | None, Message | None, int]:
        """Drain the queue without blocking.

        Returns the newest stack, the newest prediction (either None if none arrived
        since the last poll) and how many malformed messages this poll dropped.
        """
        latest: dict[str, tuple[StackHeader, np.ndarray]] = {}
        dropped = self._drain(latest, key=lambda h: h.kind)
        # Copies that own their memory, for callers that keep or modify them.
        out = {k: Message(h, np.array(a, copy=True)) for k, (h, a) in latest.items()}
        return out.get("stack"), out.get("prediction"), dropped

    def _drain(
        self,
        latest: dict[Any, tuple[StackHeader, np.ndarray]],
        key: Callable[[StackHeader], Hashable],
    ) -> int:
        """Receive everything queued into ``latest[key(header)]`` (views); count drops."""
        dropped = 0
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                header, view = decode(frames)
            except WireError as e:
                dropped += 1
                log.warning("dropped malformed display message from %s: %s", self.endpoint, e)
                continue
            # Only keep a view: the caller copies just the newest of each key, once.
            k = key(header)
            latest.pop(k, None)  # re-insert: dict order = arrival order of the kept ones
            latest[k] = (header, view)
            self.received[header.kind] += 1
        self.n_malformed += dropped
        return dropped

    def fileno(self) -> int:
        """ZeroMQ's notification descriptor of the socket: readable when messages *may*
        have arrived (edge-triggered: drain with `poll` every time it fires)."""
        return int(self._sock.getsockopt(zmq.FD))

    def close(self) -> None:
        """Close the socket (the shared context stays usable)."""
        self._sock.close(linger=0)

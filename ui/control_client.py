"""Non-blocking client of the daemon's control socket (status / pause / resume / stop).

It runs on the GUI thread as a small state machine driven by a timer: send a request,
then check for the reply with ``poll(0)`` on every tick, so nothing ever waits on the
network and the window stays responsive when the daemon is slow, gone, or on a dead
network link. A REQ socket whose request got no reply in time is stuck (REQ insists
on send/recv alternation), so it is closed and a fresh one is connected: that is also
how the viewer re-attaches by itself when a daemon comes back on the same port.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any

import zmq
from pydantic import ValidationError
from PySide6 import QtCore

from livestain import wire
from livestain.security import apply_client

log = logging.getLogger(__name__)

#: Status poll period and reply deadline (ms). 1 Hz is plenty for a panel read by eye.
STATUS_INTERVAL_MS = 1000
REPLY_TIMEOUT_MS = 2000
#: How often the state machine looks for a reply.
TICK_MS = 50


class ControlClient(QtCore.QObject):
    """Polls ``status`` at ``interval_ms`` and sends user commands, never blocking.

    Signals carry the reply body (`wire.decode_reply`); every reply of the daemon,
    including those to pause/resume/stop, is a full status, so ``status`` fires for
    all of them.
    """

    #: A status body (dict) from the daemon.
    status = QtCore.Signal(dict)
    #: The daemon did not answer in time (reason); emitted on each failed attempt.
    not_answering = QtCore.Signal(str)
    #: A user command got a reply: (command, ok, error text or "").
    command_done = QtCore.Signal(str, bool, str)

    def __init__(
        self,
        endpoint: str,
        keys: str | Path | None = None,
        interval_ms: int = STATUS_INTERVAL_MS,
        timeout_ms: int = REPLY_TIMEOUT_MS,
        ctx: zmq.Context | None = None,
        parent: QtCore.QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.endpoint = endpoint
        self.keys = keys
        self.interval_s = interval_ms / 1000
        self.timeout_s = timeout_ms / 1000
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._pending: str | None = None  # command awaiting its reply
        self._deadline = 0.0
        self._queue: collections.deque[str] = collections.deque()
        self._next_status = 0.0
        #: True after a reply, False after a missed deadline, None before either.
        self.answering: bool | None = None
        #: Socket re-creations after missed deadlines.
        self.reconnects = 0
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self.tick)

    # -- public ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect and start polling (the first status request goes out at once)."""
        if self._sock is None:
            self._open()
        self._next_status = 0.0
        self._timer.start()
        self.tick()

    def stop(self) -> None:
        """Stop polling and close the socket (queued commands are dropped)."""
        self._timer.stop()
        self._queue.clear()
        self._pending = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def send(self, command: str) -> None:
        """Queue a user command; it goes out as soon as the socket is free."""
        if command not in wire.COMMANDS:
            raise ValueError(f"unknown command {command!r}; known: {', '.join(wire.COMMANDS)}")
        self._queue.append(command)
        self.tick()

    # -- state machine --------------------------------------------------------------

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        apply_client(sock, self.keys)
        sock.connect(self.endpoint)
        self._sock = sock

    def _reset(self) -> None:
        """Replace a REQ socket whose request went unanswered (it cannot send again)."""
        if self._sock is not None:
            self._sock.close(linger=0)
        self._open()
        self.reconnects += 1

    def tick(self) -> None:
        """One step: collect a reply or give up on it, then send what is due."""
        if self._sock is None:
            return
        now = time.monotonic()
        if self._pending is not None:
            if self._sock.poll(0, zmq.POLLIN):
                self._on_reply(self._pending, self._sock.recv_multipart(zmq.NOBLOCK))
                self._pending = None
            elif now >= self._deadline:
                self._fail(self._pending, f"no reply within {self.timeout_s:.1f} s")
            else:
                return
        if self._queue:
            self._request(self._queue.popleft(), now)
        elif now >= self._next_status:
            self._next_status = now + self.interval_s
            self._request("status", now)

    def _request(self, command: str, now: float) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(wire.encode_command(command), zmq.NOBLOCK)
        except zmq.ZMQError as e:  # Again (nothing to queue into) or a dead socket
            self._pending = command
            self._fail(command, f"could not send: {e}")
            return
        self._pending, self._deadline = command, now + self.timeout_s

    def _fail(self, command: str, reason: str) -> None:
        self._pending = None
        self._reset()
        if self.answering is not False:  # log the change, not every retry
            log.info("daemon on %s not answering %s: %s; retrying", self.endpoint, command, reason)
        self.answering = False
        self.not_answering.emit(f"daemon not answering on {self.endpoint} ({reason})")
        if command != "status":
            self.command_done.emit(command, False, f"daemon not answering ({reason})")

    def _on_reply(self, command: str, frames: list[bytes]) -> None:
        try:
            body: dict[str, Any] = wire.decode_reply(frames)
        except wire.WireError as e:
            log.warning("malformed control reply from %s: %s", self.endpoint, e)
            if command != "status":
                self.command_done.emit(command, False, f"malformed reply: {e}")
            return
        if self.answering is False:
            log.info("daemon on %s answering again", self.endpoint)
        self.answering = True
        ok = bool(body.get("ok", False))
        if command != "status":
            self.command_done.emit(command, ok, "" if ok else str(body.get("error", "refused")))
        if ok and "run_id" in body:
            try:  # the typed status: every field the panel reads is declared and of its type
                status = wire.RunStatus.from_reply(body)
            except ValidationError as e:
                log.warning("status from %s does not fit livestain's status model: %s", self.endpoint, e)
                return
            self.status.emit(status.model_dump(mode="json"))

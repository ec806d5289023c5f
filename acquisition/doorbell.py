"""Wake the daemon loop the moment a frame arrives, from the camera's thread.

The daemon loop sleeps in a ZeroMQ poll on its sockets; frames arrive on the MDA
runner's thread through a `queue.Queue`, which a poll cannot watch. Without a wake-up,
a stack's last plane waits out the rest of the poll timeout (up to 20 ms, ~10 ms on
average) before the stack is written and streamed: latency for nothing. A connected
socket pair is pollable by ZeroMQ on every platform (Windows included, unlike a pipe),
and writing one byte to it is safe from any thread.
"""

from __future__ import annotations

import socket


class Doorbell:
    """``ring()`` from any thread; register `fileno()` in a poller; ``clear()`` after waking."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def ring(self) -> None:
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the buffer is full of rings already (or closed at shutdown): it will wake

    def clear(self) -> None:
        """Swallow every ring so far (one wake-up serves them all)."""
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def fileno(self) -> int:
        return self._reader.fileno()

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

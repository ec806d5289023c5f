"""The run's control socket: pause, resume, stop and status, answered by the daemon loop.

Every reply carries the run's status (`livestain.run_status.RunStatus`), so a client
learns what its command did. A malformed command is counted and answered with the
error; a command that fails never takes the run down. `send_command` is the client
side (``livestain status|pause|resume|stop``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from livestain import wire
from livestain.security import apply_client

log = logging.getLogger(__name__)


class RunControl:
    """What the control socket can change about a run, and its answers.

    Parameters
    ----------
    mda : pymmcore-plus MDARunner
        The runner paused, resumed and cancelled.
    status : callable
        The run's status, sent with every reply.
    note, report : callable
        Journal and console lines (who asked for what is logged).
    on_stop : callable
        The owner's stop (it records that the user stopped the run, then calls `stop`).
    """

    def __init__(self, mda: Any, status: Callable[[], dict[str, Any]], note: Callable[[str], None],
                 report: Callable[[str], None], on_stop: Callable[[], None] | None = None) -> None:
        self.mda, self.status, self.note, self.report = mda, status, note, report
        self.on_stop = on_stop or self.stop
        self.paused = False
        self.stop_requested = False
        self.malformed_commands = 0

    def answer(self, socket: zmq.Socket) -> None:
        """Read one command from the (REP) socket and reply to it."""
        frames = socket.recv_multipart()
        try:
            command, _ = wire.decode_command(frames)
        except wire.WireError as e:
            self.malformed_commands += 1
            socket.send_multipart(wire.encode_reply(False, error=str(e)))
            return
        try:
            if command in ("pause", "resume"):
                self.mda.set_paused(command == "pause")
                self.paused = command == "pause"
                self.note(f"{command}d by the control socket")
                self.report(f"{'paused' if command == 'pause' else 'resumed'} by `livestain {command}`")
            elif command == "stop":
                self.report("stop requested by `livestain stop`: finishing the current frame")
                self.on_stop()
            reply = wire.encode_reply(True, **self.status())
        except Exception as e:  # a command must never take the run down
            log.exception("control command %r failed", command)
            reply = wire.encode_reply(False, error=f"{command} failed: {e}")
        socket.send_multipart(reply)

    def stop(self) -> None:
        """Stop after the current frame (the stop command and signal handlers)."""
        if not self.stop_requested:
            self.note("stop requested")
        self.stop_requested = True
        self.mda.cancel()

    def hold_pause(self) -> None:
        """Keep the runner paused while the user wants it paused.

        pymmcore-plus 0.18 can lose a pause: a ``set_paused(True)`` that lands between
        the end of its wait for an event and the start of that event is overwritten by
        the runner. Asking again while it is not paused is harmless (a pause already
        pending is left as it is) and makes the pause stick.
        """
        mda = self.mda
        if self.paused and not mda.is_paused() and mda.is_running() and not self.stop_requested:
            mda.set_paused(True)


def send_command(
    endpoint: str, command: str, timeout_s: float = 3.0, keys: str | Path | None = None
) -> dict[str, Any]:
    """Send one control command to a daemon and return its reply body."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    apply_client(sock, keys)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.connect(endpoint)
    try:
        sock.send_multipart(wire.encode_command(command))
        return wire.decode_reply(sock.recv_multipart())
    except zmq.Again:
        raise TimeoutError(
            f"No livestain daemon answered on {endpoint} within {timeout_s:.0f} s. "
            f"Is a run going (`livestain demo` / `livestain run`)? Check --connect/--port."
        ) from None
    finally:
        sock.close()

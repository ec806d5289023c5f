"""The daemon's sockets: stacks out to workers, predictions back, everything to viewers.

Acquisition must never wait for a peer. Workers ask for work; a stack goes to a worker
only when one is idle, the newest first, so none waits in a worker's queue while a
newer one exists. Sends are non-blocking; a stack no worker can take right now waits
in a short newest-first backlog (its pixels are on disk already); when that backlog overflows the
oldest leave it, counted, and the daemon predicts them later from disk. The display socket is PUB: viewers that are
absent or slow simply miss messages.

Who may be a worker: a loopback daemon without CURVE keys makes a per-run worker token
(`livestain.security.DaemonToken`) and hands stacks only to peers whose ``ready``
carries it; a prediction counts only with the token and from a worker the stack was
handed to. Anything else is dropped and counted (``malformed_results``).

A flood of raw TCP connections must not lock out ``livestain status``: each one holds
a file descriptor until its ZeroMQ handshake times out, and with the descriptors gone
the daemon accepts nothing (libzmq retries ``accept`` until one is free). So the
handshake timeout is short, the listen backlog long, and the daemon raises its soft
open-file limit to the hard one.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

try:
    import resource
except ImportError:  # Windows (where most Micro-Manager scopes run): no rlimits to raise
    resource = None  # type: ignore[assignment]

from livestain import wire
from livestain.security import DaemonToken, ServerSecurity, split_endpoint

from .handovers import HandOvers, TokenGate
from livestain.shm import MIN_SHM_BYTES, ShmPool

log = logging.getLogger(__name__)

#: A connection that has not finished its ZeroMQ handshake by then is closed (each
#: stalled one holds a descriptor). On loopback a real handshake takes microseconds to
#: milliseconds (libzmq's I/O thread does it, never waiting for Python), and a peer
#: whose handshake did time out just reconnects 100 ms later. libzmq's default: 30 s.
HANDSHAKE_IVL_LOOPBACK_MS = 1000
#: The same beyond loopback (CURVE over a slow link needs three round trips and ZAP).
HANDSHAKE_IVL_NETWORK_MS = 5000
#: Pending connections the kernel queues for each socket (capped by net.core.somaxconn).
LISTEN_BACKLOG = 1024
#: The daemon's soft open-file limit is raised towards this (never beyond the hard one).
WANT_OPEN_FILES = 65536
#: Largest message accepted on the stacks (ready) and control sockets: those are small.
MAX_SMALL_MESSAGE_BYTES = wire.MAX_HEADER_BYTES


@dataclass
class StreamCounts:
    """What happened to every stack offered to the workers.

    ``unauthenticated`` counts the messages without the worker token (also counted in
    ``malformed_results``): a non-zero value means a stale worker or a stranger.
    """

    sent: int = 0
    dropped: int = 0
    malformed_results: int = 0
    unauthenticated: int = 0


def raise_open_file_limit(want: int = WANT_OPEN_FILES) -> int:
    """Raise this process's soft open-file limit towards ``want``; returns the new limit.

    Desktop sessions start at 1024. Every peer connection, stalled or not, takes a
    descriptor; when they run out libzmq can accept no one, not even ``livestain
    status``, until stalled handshakes time out. The hard limit is usually far higher.
    """
    if resource is None:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError) as e:
            log.info("could not raise the open-file limit from %d: %s", soft, e)
    return soft


class DaemonSockets:
    """Binds the four daemon sockets of `livestain.wire` and moves messages on them.

    All methods must be called from one thread (ZeroMQ sockets are not thread-safe):
    the daemon's main loop.
    """

    #: A worker's ready message counts this long; idle workers repeat it every second.
    READY_EXPIRES_S = 5.0

    def __init__(
        self,
        eps: dict[str, str],
        backlog: int = 8,
        ctx: zmq.Context | None = None,
        keys: str | Path | None = None,
        shm: bool = True,
    ) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.endpoints = eps
        self.token: DaemonToken | None = None
        host, base_port = split_endpoint(eps["stacks"])
        self.security = ServerSecurity(self.ctx, host, keys)
        raise_open_file_limit()
        self._handshake_ms = HANDSHAKE_IVL_NETWORK_MS if keys else HANDSHAKE_IVL_LOOPBACK_MS
        self.stacks = self._bind(zmq.ROUTER, eps["stacks"], sndhwm=4, router_mandatory=True,
                                 maxmsgsize=MAX_SMALL_MESSAGE_BYTES)
        self.handovers = HandOvers()  # which worker got which stack: who may answer
        self.counts = StreamCounts()
        self.hostname = socket.gethostname()
        self.pool: ShmPool | None = ShmPool() if shm else None
        # workers waiting for a stack, by ZeroMQ identity -> (name, last ready time,
        # structures it predicts if it is on this host and offers shared memory, else 0)
        self.idle: OrderedDict[bytes, tuple[str, float, int]] = OrderedDict()
        self.results = self._bind(zmq.PULL, eps["results"], rcvhwm=16)
        self.display = self._bind(zmq.PUB, eps["display"], sndhwm=4)
        self.control = self._bind(zmq.REP, eps["control"], maxmsgsize=MAX_SMALL_MESSAGE_BYTES)
        if keys is None:  # loopback: CURVE does not say who a peer is, the token does
            self.token = DaemonToken(host, base_port)  # after the binds: never a busy port's
        self.gate = TokenGate(self.token, self.counts)
        self.backlog: deque[tuple[wire.StackHeader, np.ndarray]] = deque()
        self.backlog_limit = backlog
        self.poller = zmq.Poller()
        self.poller.register(self.results, zmq.POLLIN)
        self.poller.register(self.stacks, zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)

    def _bind(self, kind: int, endpoint: str, sndhwm: int = 0, rcvhwm: int = 0,
              router_mandatory: bool = False, maxmsgsize: int = 0) -> zmq.Socket:
        """Bind one socket; stalled handshakes time out quickly and a connection burst
        queues in a long listen backlog instead of being refused (see the module doc)."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HANDSHAKE_IVL, self._handshake_ms)
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        if maxmsgsize:
            sock.setsockopt(zmq.MAXMSGSIZE, maxmsgsize)
        if router_mandatory:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.security.apply(sock)
        if sndhwm:
            sock.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm:
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
        try:
            _bind_when_free(sock, endpoint)
        except zmq.ZMQError as e:
            sock.close()
            self.close()
            raise OSError(
                f"Cannot listen on {endpoint}: {e.strerror}. Another livestain daemon may be "
                f"running there: stop it (`livestain stop`) or choose another --port."
            ) from None
        return sock

    # -- to workers -------------------------------------------------------------------
    def offer(self, header: wire.StackHeader, array: np.ndarray) -> list[int]:
        """Queue a stack for the workers; never blocks. Returns seqs dropped from the backlog."""
        self.backlog.append((header, array))
        dropped = []
        while len(self.backlog) > self.backlog_limit:
            old, _ = self.backlog.popleft()
            self.counts.dropped += 1
            dropped.append(old.seq)
        return dropped

    def receive_ready(self) -> None:
        """Note every worker that asked for work (a ready message is also a heartbeat).

        A ready message that was already queued when this worker's last stack left
        (its ``received`` count is behind what was sent to it) is only a heartbeat: a
        busy worker must not be handed a second stack.
        """
        while True:
            try:
                frames = self.stacks.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, rest = frames[0], frames[1:]
            try:
                body = wire.decode_ready(rest)
                received = int(body.get("received", 0))
            except (wire.WireError, TypeError, ValueError) as e:
                self.counts.malformed_results += 1
                log.warning("dropped malformed message on stacks socket: %s", e)
                continue
            name = str(body.get("worker", "?"))[:200]
            if not self.gate.accepts(body):
                self.gate.refuse(f"ready from {name!r} without the worker token: no stack for it")
                continue
            now = time.monotonic()
            if self.handovers.asked(identity, name, received):
                same_host = bool(self.pool) and body.get("shm_host") == self.hostname
                try:
                    out_channels = min(max(int(body.get("out_channels", 1) or 1), 1), 64)
                except (TypeError, ValueError):
                    out_channels = 1
                self.idle[identity] = (name, now, out_channels if same_host else 0)

    def pump(self) -> list[tuple[int, str]]:
        """Give each idle worker one stack, the newest first.

        Returns ``(seq, worker name)`` of each stack handed over. A worker that has
        gone since it asked is skipped (ROUTER_MANDATORY reports it) and the stack
        stays for the next one.
        """
        now = time.monotonic()
        for identity in [i for i, (_, at, _) in self.idle.items() if now - at > self.READY_EXPIRES_S]:
            del self.idle[identity]  # it stopped asking: gone or busy elsewhere
        sent = []
        while self.backlog and self.idle:
            identity, (name, _, shm_channels) = self.idle.popitem(last=False)
            header, array = self.backlog[-1]
            frames, lent = self._frames_for(header, array, shm_channels)
            try:
                self.stacks.send_multipart([identity, b"", *frames], copy=False, flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if self.pool is not None and lent:
                    self.pool.unlend(header.seq, lent)  # no worker saw them
                if e.errno == zmq.EAGAIN:
                    break
                if e.errno == zmq.EHOSTUNREACH:
                    continue  # that worker is gone; try the next one
                raise
            self.backlog.pop()
            self.handovers.hand(header.seq, identity, name)
            self.counts.sent += 1
            sent.append((header.seq, name))
        return sent

    def _frames_for(self, header: wire.StackHeader, array: np.ndarray,
                    shm_channels: int) -> tuple[list, list[str]]:
        """Frames for one stack, and the segments lent for them.

        The pixels go through shared memory for a big stack and a worker on this host
        (``shm_channels``: the structures it predicts, 0 for a worker elsewhere), with a
        segment lent for the float32 prediction too when that is big.
        """
        if not shm_channels or self.pool is None:
            return wire.encode(header, array), []
        update = {}
        if array.nbytes >= MIN_SHM_BYTES and (name := self.pool.lend(header.seq, np.ascontiguousarray(array))):
            update["shm"] = name
        room_bytes = shm_channels * (array.nbytes // array.itemsize) * 4
        if room_bytes >= MIN_SHM_BYTES and (room := self.pool.reserve(header.seq, room_bytes)):
            update["result_shm"] = room
        lent = list(update.values())
        header = header.model_copy(update=update) if update else header
        if not header.shm:
            return wire.encode(header, array), lent
        header.sent_at = time.time()  # as wire.encode stamps it on the ZeroMQ path
        return [header.to_json(), b""], lent

    def release(self, seq: int, reuse: bool = True) -> None:
        """Stack ``seq`` came back predicted (or was given up): its segments are free.

        ``reuse=False`` when its worker may still write into them (presumed hung).
        """
        self.handovers.forget(seq)
        if self.pool is not None:
            self.pool.give_back(seq, reuse)

    def taint(self, seq: int) -> None:
        """Stack ``seq``'s worker is presumed hung: never reuse what it was lent."""
        if self.pool is not None:
            self.pool.taint(seq)

    def discard(self, seq: int) -> None:
        """Drop a stack from the backlog (it was predicted meanwhile, e.g. by its first worker)."""
        self.backlog = deque(item for item in self.backlog if item[0].seq != seq)
        self.handovers.forget(seq)

    def worker_heartbeats(self) -> dict[str, float]:
        """Seconds since each worker last asked for work (absent: never seen)."""
        return self.handovers.heartbeats()

    def status(self) -> dict[str, Any]:
        """The sockets' share of the run's status (`livestain.run_status.RunStatus`)."""
        return {"stacks_sent": self.counts.sent, "stacks_dropped": self.counts.dropped,
                "backlog": len(self.backlog), "workers_idle": len(self.idle),
                "worker_heartbeats_s": self.worker_heartbeats(),
                "malformed_results": self.counts.malformed_results,
                "unauthenticated_messages": self.counts.unauthenticated}

    # -- to viewers -------------------------------------------------------------------
    def publish(self, header: wire.StackHeader, array: np.ndarray) -> None:
        try:
            self.display.send_multipart(wire.encode(header, array), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # a slow viewer misses a frame; the run does not wait for it

    # -- from workers -----------------------------------------------------------------
    def receive_result(
        self,
    ) -> tuple[wire.StackHeader, np.ndarray] | tuple[wire.FailureHeader, None] | None:
        """One prediction (or a worker's failure report) if a valid one is waiting;
        malformed ones are logged and dropped.

        A prediction that came through shared memory is a read-only view of the daemon's
        own segment (``header.shm`` names it), valid until `release` of its stack.
        """
        try:
            frames = self.results.recv_multipart(copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        try:
            header, array = wire.decode_result(frames)
            if isinstance(header, wire.FailureHeader):
                return self._checked_failure(header)
            if header.kind != "prediction":
                raise wire.WireError(f"expected a prediction on the results socket, got {header.kind}")
            if not self.gate.accepts(header):  # also strips the token from the header
                self.gate.refuse(f"prediction of stack seq {header.source_seq} from "
                             f"{header.worker[:200]!r} without the worker token")
                return None
            if not self.handovers.was_handed(header.source_seq, header.worker[:200]):  # as receive_ready keeps it
                raise wire.WireError(f"stack seq {header.source_seq} was never handed to "
                                     f"worker {header.worker[:200]!r}")
            if header.shm:  # written into the segment lent with its stack
                if self.pool is None or header.source_seq is None:
                    raise wire.WireError("a shared-memory prediction, but no segment was lent")
                if not self.pool.holds(header.source_seq):
                    # its stack is done (predicted by another worker) or given up: a late
                    # duplicate from a worker that was presumed hung, not a malformed message
                    log.info("dropped a late prediction of stack seq %d from %s",
                             header.source_seq, header.worker)
                    return None
                try:
                    array = self.pool.view(header.source_seq, header.shm, header.shape, header.dtype)
                except ValueError as e:
                    raise wire.WireError(str(e)) from None
        except wire.WireError as e:
            self.counts.malformed_results += 1
            log.warning("dropped malformed message on results socket: %s", e)
            return None
        return header, array

    def _checked_failure(self, header: wire.FailureHeader) -> tuple[wire.FailureHeader, None] | None:
        """A failure counts under the same rules as a prediction: the token, and only
        from a worker the stack was handed to."""
        if not self.gate.accepts(header):
            self.gate.refuse(f"failure report for stack seq {header.source_seq} from "
                         f"{header.worker[:200]!r} without the worker token")
            return None
        if not self.handovers.was_handed(header.source_seq, header.worker[:200]):
            raise wire.WireError(f"stack seq {header.source_seq} was never handed to "
                                 f"worker {header.worker[:200]!r}")
        return header, None

    def close(self) -> None:
        for name in ("stacks", "results", "display", "control"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if getattr(self, "security", None) is not None:
            self.security.close()
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        if getattr(self, "token", None) is not None:
            self.token.close()
            self.token = None


def _bind_when_free(sock: zmq.Socket, endpoint: str, wait_s: float = 1.0) -> None:
    """Bind, waiting briefly while the port is still being let go.

    ZeroMQ closes sockets on its I/O thread: a daemon closed and started again at once
    in one process (a test, a restart after an error) can find its own port still
    held for some milliseconds. A port another process holds stays busy, and the bind
    fails after ``wait_s`` as before.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)

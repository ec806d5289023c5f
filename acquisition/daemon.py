"""The acquisition daemon: plan in, stacks to disk, stacks to workers, predictions back.

Threads and their jobs (the loop apart from the work):

* the MDA thread (pymmcore-plus's runner) drives the hardware; our ``frameReady``
  handler only puts ``(event, image, time)`` on a queue, so acquisition never waits
  for disk, network or inference;
* the daemon loop (the caller's thread) owns every socket and file: it assembles
  frames into stacks, writes each finished stack to disk *before* streaming it,
  writes each prediction next to its raw stack, and answers control commands.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import useq
import zmq

from livestain import __version__, wire
from livestain.stackio import write_stack

from .stacks import Stack, StackAssembler
from .streaming import DaemonSockets

log = logging.getLogger(__name__)


@dataclass
class StackRecord:
    """What the daemon remembers of each stack it acquired, until it is predicted."""

    seq: int
    t: int
    p: int
    raw_path: Path
    completed_at: float
    predicted_path: Path | None = None
    latency_s: float | None = None


@dataclass
class RunSummary:
    """End-of-run figures, printed by ``livestain demo`` and returned to scripts."""

    run_id: str
    out_dir: Path
    acquired: int = 0
    predicted: int = 0
    dropped: int = 0
    incomplete: int = 0
    latencies_s: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def mean_latency_s(self) -> float:
        return float(np.mean(self.latencies_s)) if self.latencies_s else float("nan")

    def lines(self) -> list[str]:
        return [
            f"run {self.run_id}: {self.acquired} stacks acquired, {self.predicted} predicted, "
            f"{self.dropped} not predicted live"
            + (f", {self.incomplete} incomplete" if self.incomplete else "")
            + (" (stopped early)" if self.stopped_early else ""),
            f"mean latency, stack complete -> prediction written: {self.mean_latency_s:.2f} s",
            f"data: {self.out_dir}",
        ]


def stack_paths(out_dir: Path, t: int, p: int, channel: str) -> tuple[Path, Path]:
    """Where a raw stack and its prediction live: ``p000/t0000_<channel>.ome.tif``."""
    folder = out_dir / f"p{p:03d}"
    return (
        folder / f"t{t:04d}_{channel.lower() or 'raw'}.ome.tif",
        folder / f"t{t:04d}_prediction.ome.tif",
    )


class Daemon:
    """Runs one useq plan on a core, streaming stacks to workers and viewers.

    Parameters
    ----------
    core : CMMCorePlus
        A configured core (simulated or real hardware).
    sequence : useq.MDASequence
        The plan. Stacks are keyed by ``(t, p, channel)``; z makes up the stack.
    out_dir : Path
        Dataset folder; created, and refused if it already holds a run.
    endpoints : dict[str, str]
        The four daemon endpoints of `livestain.wire`.
    stream_channels : tuple[str, ...]
        Channels sent for prediction (brightfield); others are only written.
    report : callable
        Receives one human-readable line per stack event (headless console output).
    drain_timeout_s : float
        After the plan ends, how long to wait for outstanding predictions.
    """

    def __init__(
        self,
        core: Any,
        sequence: useq.MDASequence,
        out_dir: Path,
        endpoints: dict[str, str],
        stream_channels: tuple[str, ...] = ("Brightfield",),
        report: Callable[[str], None] = print,
        drain_timeout_s: float = 120.0,
    ) -> None:
        self.core = core
        self.sequence = sequence
        self.out_dir = Path(out_dir)
        self.stream_channels = stream_channels
        self.report = report
        self.drain_timeout_s = drain_timeout_s
        self.run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        self._prepare_out_dir()
        self.sockets = DaemonSockets(endpoints)
        self.assembler = StackAssembler.for_sequence(sequence)
        self.frames: queue.Queue[tuple[useq.MDAEvent, np.ndarray, float]] = queue.Queue()
        self.records: dict[int, StackRecord] = {}
        self.summary = RunSummary(self.run_id, self.out_dir)
        self._n_t = sequence.sizes.get("t", 1) or 1
        self._n_p = sequence.sizes.get("p", 1) or 1
        self._seq = 0
        self._mda_done = threading.Event()
        self._stop_requested = False
        self._paused = False
        self.started_at = time.time()

    def _prepare_out_dir(self) -> None:
        marker = self.out_dir / "run.json"
        if marker.exists():
            raise FileExistsError(
                f"{self.out_dir} already holds a livestain run ({marker}); nothing was "
                f"overwritten. Choose another --out folder."
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        import json

        marker.write_text(
            json.dumps(
                {
                    "run_id": self.run_id,
                    "livestain": __version__,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "sequence": self.sequence.model_dump(mode="json", exclude_unset=True),
                },
                indent=2,
            )
        )

    # -- MDA thread: enqueue only ---------------------------------------------------
    def _on_frame(self, image: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        self.frames.put((event, image, time.time()))

    def _on_finished(self, *_: Any) -> None:
        self._mda_done.set()

    # -- daemon loop --------------------------------------------------------------
    def run(self) -> RunSummary:
        """Acquire the whole plan, then wait for outstanding predictions; returns figures."""
        mda = self.core.mda
        mda.events.frameReady.connect(self._on_frame)
        mda.events.sequenceFinished.connect(self._on_finished)
        try:
            self.core.run_mda(self.sequence)
            while not (self._mda_done.is_set() and self.frames.empty()):
                self._step(timeout_ms=20)
            for stack in self.assembler.flush():
                self.summary.incomplete += 1
                self._finish_stack(stack)
            self._drain_predictions()
        finally:
            mda.events.frameReady.disconnect(self._on_frame)
            mda.events.sequenceFinished.disconnect(self._on_finished)
            if not self._mda_done.is_set():
                mda.cancel()
            self.sockets.close()
        self.summary.dropped = self.summary.acquired - self.summary.predicted
        return self.summary

    def _step(self, timeout_ms: int) -> None:
        """One turn of the loop: frames -> stacks, predictions in, control answered."""
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            try:
                event, image, arrived = self.frames.get_nowait()
            except queue.Empty:
                break
            stack = self.assembler.add(event, image, arrived)
            if stack is not None:
                self._finish_stack(stack)
        self.sockets.pump()
        ready = dict(self.sockets.poller.poll(timeout_ms))
        if self.sockets.results in ready:
            while (result := self.sockets.receive_result()) is not None:
                self._on_prediction(*result)
        if self.sockets.control in ready:
            self._on_control()

    def _finish_stack(self, stack: Stack) -> None:
        """Write a finished stack to disk, then stream it (raw data is safe first)."""
        seq = self._seq
        self._seq += 1
        raw_path, _ = stack_paths(self.out_dir, stack.t, stack.p, stack.channel)
        px = float(self.core.getPixelSizeUm() or 1.0)
        dz = float(np.nanmean(np.diff(stack.positions_um[:, 2]))) if stack.planes.shape[0] > 1 else 1.0
        voxel = [abs(dz) if np.isfinite(dz) and dz else 1.0, px, px]
        header = wire.StackHeader(
            kind="stack",
            run_id=self.run_id,
            seq=seq,
            t=stack.t,
            p=stack.p,
            channel=stack.channel,
            shape=list(stack.planes.shape),
            dtype=str(stack.planes.dtype),
            voxel_size_um=voxel,
            position_um=[float(v) for v in np.nan_to_num(stack.positions_um[0])],
            acquired_start=float(np.nanmin(stack.times)),
            acquired_end=float(np.nanmax(stack.times)),
            path=str(raw_path),
        )
        info = header.model_dump(by_alias=True) | {"gaps": stack.gaps, "exposure_ms": stack.exposure_ms}
        write_stack(
            raw_path,
            stack.planes,
            voxel_size_um=voxel,
            info=info,
            channel_names=[stack.channel],
            plane_positions_um=np.nan_to_num(stack.positions_um),
        )
        self.summary.acquired += 1
        self.records[seq] = StackRecord(seq, stack.t, stack.p, raw_path, time.time())
        gaps = f", {len(stack.gaps)} missing planes" if stack.gaps else ""
        self.report(
            f"[t {stack.t + 1}/{self._n_t} p {stack.p + 1}/{self._n_p}] acquired "
            f"{stack.channel} {'x'.join(map(str, stack.planes.shape))}{gaps} -> "
            f"{raw_path.relative_to(self.out_dir)}"
        )
        if stack.channel in self.stream_channels:
            self.sockets.offer(header, stack.planes)

    def _on_prediction(self, header: wire.StackHeader, array: np.ndarray) -> None:
        record = self.records.get(header.source_seq if header.source_seq is not None else -1)
        if header.run_id != self.run_id or record is None:
            self.sockets.counts.malformed_results += 1
            log.warning("dropped a prediction for an unknown stack (run %s seq %s)", header.run_id, header.source_seq)
            return
        if record.predicted_path is not None:
            return  # a duplicate from a second worker: the first one stands
        _, pred_path = stack_paths(self.out_dir, record.t, record.p, "")
        info = header.model_dump(by_alias=True) | {"source_path": str(record.raw_path)}
        write_stack(
            pred_path,
            array,
            voxel_size_um=header.voxel_size_um,
            info=info,
            channel_names=header.structures,
        )
        record.predicted_path = pred_path
        record.latency_s = time.time() - record.completed_at
        self.summary.predicted += 1
        self.summary.latencies_s.append(record.latency_s)
        header.path = str(pred_path)
        self.sockets.publish(header, array)
        self.report(
            f"[t {record.t + 1}/{self._n_t} p {record.p + 1}/{self._n_p}] predicted "
            f"{','.join(header.structures)} in {header.inference_s:.2f} s, "
            f"latency {record.latency_s:.2f} s -> {pred_path.relative_to(self.out_dir)}"
        )

    def _drain_predictions(self) -> None:
        """After the plan: wait (bounded) for predictions of every stack sent."""
        # a user's stop still collects predictions already under way, but briefly
        timeout = min(self.drain_timeout_s, 15.0) if self._stop_requested else self.drain_timeout_s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = self.sockets.counts.sent + len(self.sockets.backlog) - self.summary.predicted
            if waiting <= 0:
                return
            self._step(timeout_ms=100)
        outstanding = [r for r in self.records.values() if r.predicted_path is None]
        if outstanding:
            self.report(f"{len(outstanding)} stacks not predicted; their raw data is on disk")

    # -- control --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        counts = self.sockets.counts
        return {
            "run_id": self.run_id,
            "state": "paused" if self._paused else ("finishing" if self._mda_done.is_set() else "acquiring"),
            "out_dir": str(self.out_dir),
            "stacks_acquired": self.summary.acquired,
            "stacks_predicted": self.summary.predicted,
            "stacks_sent": counts.sent,
            "stacks_dropped": counts.dropped,
            "backlog": len(self.sockets.backlog),
            "malformed_results": counts.malformed_results,
            "timepoints": self._n_t,
            "positions": self._n_p,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def _on_control(self) -> None:
        frames = self.sockets.control.recv_multipart()
        try:
            command, _ = wire.decode_command(frames)
        except wire.WireError as e:
            self.sockets.control.send_multipart(wire.encode_reply(False, error=str(e)))
            return
        if command == "pause":
            self._paused = True
            self.core.mda.toggle_pause(True)
        elif command == "resume":
            self._paused = False
            self.core.mda.toggle_pause(False)
        elif command == "stop":
            self._stop_requested = True
            self.summary.stopped_early = True
            self.core.mda.cancel()
        self.sockets.control.send_multipart(wire.encode_reply(True, **self.status()))

    def request_stop(self) -> None:
        """Stop after the current frame (signal handlers call this)."""
        self._stop_requested = True
        self.summary.stopped_early = True
        self.core.mda.cancel()


def send_command(endpoint: str, command: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """Send one control command to a daemon and return its reply body."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
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

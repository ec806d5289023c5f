"""The acquisition daemon: plan in, stacks to disk, stacks to workers, predictions back.

Threads and their jobs (the loop apart from the work):

* the MDA thread (pymmcore-plus's runner) drives the hardware; our ``frameReady``
  handler only puts ``(event, image, time)`` on a queue, so acquisition never waits
  for disk, network or inference;
* the daemon loop (the caller's thread) owns every socket and file: it assembles
  frames into stacks, writes each finished stack to disk *before* streaming it,
  journals it, writes each prediction next to its raw stack, catches up on stacks the
  workers could not take live, and answers control commands.

A stack's life: ``queued`` (waiting for a worker) -> ``sent`` -> ``predicted``; or
``queued`` -> ``late`` (left the live backlog, or its worker died) -> re-read from disk
and queued again when the workers have nothing newer to do.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import useq
import zmq

from livestain import __version__, wire
from livestain.security import apply_client
from livestain.store import RunStore, open_store, read_ref, ref_exists

from .closed_loop import ClosedLoop, LoopHost
from .run_folder import RunFolder
from .stack_state import StackRecord, StackState
from .checks import CheckScore, with_check_channels
from .doorbell import Doorbell
from .journal import Journal
from .policies import Policies
from .audit import planned_keys
from .preflight import check_plan, check_plan_against_core
from .retry import install_snap_retries
from .run_report import write_summary
from .stacks import LostStackTracker, Stack, StackAssembler
from .trust import TrustLedger
from .streaming import DaemonSockets

log = logging.getLogger(__name__)

class RunStopped(RuntimeError):
    """The run cannot go on (disk full, write error); the message says why and what to do."""


@dataclass
class RunSummary:
    """End-of-run figures, printed by ``livestain demo``/``run`` and returned to scripts."""

    run_id: str
    out_dir: Path
    acquired: int = 0
    predicted: int = 0
    predicted_late: int = 0
    incomplete: int = 0
    #: the most recent live latencies (a run of days keeps the last ``LATENCIES_KEPT``;
    #: the mean covers every one, through ``latency_count`` and ``latency_total_s``)
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=RunSummary.LATENCIES_KEPT))
    latency_count: int = 0
    latency_total_s: float = 0.0
    stopped_early: bool = False
    error: str | None = None
    not_predicted: int = 0
    unreadable: int = 0
    failed: int = 0  # stacks the workers could not predict (after retrying)

    LATENCIES_KEPT = 1000

    def add_latency(self, seconds: float) -> None:
        """One live prediction's latency: in the running mean, and among the recent ones."""
        self.latencies_s.append(seconds)
        self.latency_count += 1
        self.latency_total_s += seconds

    @property
    def mean_latency_s(self) -> float:
        """Mean over every live prediction of the run (not only the recent ones kept)."""
        return self.latency_total_s / self.latency_count if self.latency_count else float("nan")

    def lines(self) -> list[str]:
        lines = [
            f"run {self.run_id}: {self.acquired} stacks acquired, {self.predicted} predicted "
            f"({self.predicted_late} caught up from disk), {self.not_predicted} not predicted"
            + (f", {self.incomplete} incomplete" if self.incomplete else "")
            + (f", {self.failed} could not be predicted" if self.failed else "")
            + (" (stopped early)" if self.stopped_early else ""),
            f"mean latency, stack complete -> prediction written: {self.mean_latency_s:.2f} s",
            f"data: {self.out_dir}",
        ]
        if self.error:
            lines.append(f"STOPPED: {self.error}")
        return lines


def _interval_s(sequence: useq.MDASequence) -> float:
    """The plan's time step in seconds (0 for none), the t scale of a Zarr run."""
    interval = getattr(sequence.time_plan, "interval", None)
    return float(interval.total_seconds()) if interval is not None else 0.0


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class Daemon:
    """Runs one useq plan on a core, streaming stacks to workers and viewers.

    Parameters
    ----------
    core : CMMCorePlus
        A configured core (simulated or real hardware).
    sequence : useq.MDASequence
        The plan. Stacks are keyed by ``(t, p, channel)``; z makes up the stack, so z
        must be an inner axis relative to t and p.
    out_dir : Path
        Dataset folder. A new run refuses a folder that holds one; ``resume=True``
        continues it at the next incomplete time point.
    endpoints : dict[str, str]
        The four daemon endpoints of `livestain.wire`.
    policies : Policies
        Disk margin, live backlog, resend and drain timeouts, streamed channels.
    report : callable
        Receives one human-readable line per stack event (headless console output).
    free_space : callable
        Free-space probe (injectable for tests).
    on_tick : callable
        Called every turn of the loop (worker supervision).
    on_hung_worker : callable
        Called with the names of the workers holding stacks that got no prediction
        within ``policies.resend_after_s``.
    extra_status : callable
        More fields for the status reply (worker health).
    keys : path
        CURVE key folder (`livestain.security`); required to listen beyond loopback.
    provenance : dict
        What made the predictions (``{"model": {...}}``), recorded in ``run.json``; a
        resumed run that changes it appends the change there.
    """

    def __init__(
        self,
        core: Any,
        sequence: useq.MDASequence,
        out_dir: Path,
        endpoints: dict[str, str],
        policies: Policies | None = None,
        report: Callable[[str], None] = print,
        resume: bool = False,
        free_space: Callable[[Path], int] = disk_free_bytes,
        on_tick: Callable[[], None] = lambda: None,
        on_hung_worker: Callable[[list[str]], None] = lambda holders: None,
        extra_status: Callable[[], dict[str, Any]] = dict,
        keys: str | Path | None = None,
        provenance: dict[str, Any] | None = None,
        swap_model: Callable[[str | None], None] | None = None,
    ) -> None:
        _check_axis_order(sequence)
        policies = policies or Policies()
        self.provenance = provenance or {}
        # check frames are channels of the plan (acquire_every): counted, audited, budgeted
        if policies.track_focus and _autofocus_device(core) and sequence.autofocus_plan is None:
            sequence = sequence.model_copy(update={"autofocus_plan": useq.AxesBasedAF(
                autofocus_device_name=_autofocus_device(core), axes=("t", "p"))})
        self._n_predicted = len((self.provenance.get("model") or {}).get("structures") or ()) or 3
        sequence = with_check_channels(sequence, policies.checks, _channel_presets(core, sequence),
                                       self._n_predicted, policies.equivalent_fluorescence_exposure_ms)
        # a bad plan fails here, in seconds, before any folder or socket exists
        check_plan(sequence, policies.stream_channels)
        check_plan_against_core(sequence, core)
        self._mda_error: BaseException | None = None
        self.core = core
        self.sequence = sequence
        self.out_dir = Path(out_dir)
        self.policies = policies = policies or Policies()
        self.stream_channels = policies.stream_channels
        self.report = report
        self.free_space = free_space
        self.on_tick = on_tick
        self.on_hung_worker = on_hung_worker
        self.extra_status = extra_status
        # stacks not yet predicted; predicted ones leave, so the loop's scans stay short
        # on a run of days
        self.records: dict[int, StackRecord] = {}
        self._late_on_disk = 0  # late stacks not held in `records` (see `LATE_KEPT`)
        self._streamed_acquired = 0  # this session's stacks of streamed channels
        # seqs predicted lately, so a duplicate answer is dropped quietly; bounded (a run
        # of days predicts hundreds of thousands): the journal holds the full record, and
        # an answer older than this memory is refused by the sockets anyway (was_handed)
        self._predicted: OrderedDict[int, None] = OrderedDict()
        self._done: set[tuple[int, int, str]] = set()
        self._snap_counts = install_snap_retries(core, policies.snap_retries, report)
        # sockets first: a refused bind (busy port, no keys) must leave no dataset behind
        self.sockets = DaemonSockets(endpoints, backlog=policies.live_backlog, keys=keys)
        control_port = int(self.sockets.endpoints["control"].rsplit(":", 1)[-1])
        self.folder = RunFolder(self.out_dir, control_port - wire.PORT_OFFSETS["control"])
        try:
            self.run_id, self._first_t = self._open_dataset(resume)
            self.journal = Journal(self.out_dir)
            self.store: RunStore = open_store(self.out_dir, self._storage, timepoints=sequence.sizes.get("t", 1) or 1,
                                              interval_s=_interval_s(sequence),
                                              compression=policies.storage_compression)
            self._seq = self.journal.next_seq()
            self.summary = RunSummary(self.run_id, self.out_dir)
            self._load_previous_records()
            self.journal.note("resume" if resume else "start")
        except BaseException:
            self.sockets.close()
            self._release_lock()
            raise
        self.assembler = StackAssembler.for_sequence(sequence)
        self._lost = LostStackTracker(self._pending_keys())
        self._last_frame: np.ndarray | None = None
        self.frames: queue.Queue[tuple[useq.MDAEvent, np.ndarray, float]] = queue.Queue()
        self._doorbell = Doorbell()  # rung per frame: the loop wakes from its poll at once
        self.sockets.poller.register(self._doorbell, zmq.POLLIN)
        self._n_t = sequence.sizes.get("t", 1) or 1
        self._n_p = sequence.sizes.get("p", 1) or 1
        self._injected: set[tuple[int, int, str]] = set()  # check stacks added on doubt, not in the plan
        # a hardware autofocus device does the tracking itself (useq's autofocus_plan, run by
        # pymmcore-plus); the brightfield estimate is then only recorded
        focus_mode = "brightfield" if policies.track_focus else "off"
        if policies.track_focus and _autofocus_device(core):
            focus_mode = f"hardware autofocus ({_autofocus_device(core)})"
        host = LoopHost(self.out_dir, report, self._note, self._journal_check, lambda: self._seq,
                        lambda t, p: f"[t {t + 1}/{self._n_t} p {p + 1}/{self._n_p}]", self._stack_added)
        self.loop = ClosedLoop(host, sequence, policies, focus_mode=focus_mode,
                               channel_presets=_channel_presets(core, sequence) if policies.checks else [],
                               n_t=self._n_t, n_p=self._n_p, n_predicted=self._n_predicted,
                               model=self.provenance.get("model"), swap_model=swap_model)
        self.focus, self.checks, self.adaptation = self.loop.focus, self.loop.checks, self.loop.adaptation
        # every stack of the plan, all channels (paired mode: 4 per time point and position)
        self._stacks_total = sum(1 for _ in planned_keys(sequence))
        self._mda_done = threading.Event()
        self._stop_requested = False
        self._paused = False
        self._malformed_commands = 0
        self._last_tp: tuple[int | None, int | None] = (None, None)
        self._pixel_size_um = float(core.getPixelSizeUm() or 1.0)  # before the MDA starts
        self._ledgers: dict[tuple[int, int, str], dict | None] = {}
        self._last_ledger: dict | None = None
        self._n_structures = 3  # until a prediction says otherwise
        self._resend_after_s = policies.resend_after_s  # shortened while draining
        self._failures: dict[int, int] = {}  # failed prediction attempts of stacks in flight
        self.trust = TrustLedger()  # per-stack confidence and input flags, for status and window
        self.started_at = time.time()

    # -- dataset ----------------------------------------------------------------------
    def _open_dataset(self, resume: bool) -> tuple[str, int]:
        """Create (or, resuming, reopen) the run folder (`RunFolder`); returns run id and
        first time point."""
        if resume:
            run_id, self._storage, self._done = self.folder.reopen(self.provenance)
            return run_id, self._first_incomplete_t()
        self._storage = self.policies.storage
        return self.folder.create(self.sequence, self.policies, self.provenance), 0

    def _release_lock(self) -> None:
        self.folder.release_lock()

    @staticmethod
    def _key(event: useq.MDAEvent) -> tuple[int, int, str]:
        return (event.index.get("t", 0), event.index.get("p", 0),
                event.channel.config if event.channel else "")

    def _first_incomplete_t(self) -> int:
        """First time point with a stack not yet on disk (for the console line)."""
        pending = (self._key(e)[0] for e in self.sequence.iter_events() if self._key(e) not in self._done)
        return min(pending, default=self.sequence.sizes.get("t", 1) or 1)  # no list: plans are long

    def _load_previous_records(self) -> None:
        """Resuming: stacks acquired before the crash but never predicted are caught up.

        Only the oldest `LATE_KEPT` come into memory; the journal holds the rest, and
        `_catch_up` reads them in as those are done (a run of days resumed after a long
        worker outage may have tens of thousands waiting).
        """
        self._late_on_disk = self.journal.count_waiting(tuple(self.stream_channels))
        self._reload_late()

    def _events(self) -> Iterable[useq.MDAEvent]:
        """The plan less every stack already on disk, its clock shifted to now.

        Skipping by (t, p, channel) rather than by time point means a resumed run never
        acquires a stack twice, so nothing on disk is ever replaced.

        Lazy: a three-day plan is millions of events (96 positions x 16 planes x 4,320
        time points), and a list of them (~2.7 KB each) took gigabytes at ``--resume``.
        One pass finds the clock offset without keeping anything; the events themselves
        are made as the runner asks for them. No pending event: an empty list.
        """
        if not self._done:
            return self.sequence
        pending = (e for e in self.sequence.iter_events() if self._key(e) not in self._done)
        offset = min(((e.min_start_time or 0.0) for e in pending), default=None)
        if offset is None:
            return []
        return _PendingEvents(self.sequence, frozenset(self._done), offset, self._key)

    def _pending_keys(self) -> Iterator[tuple[int, int, str]]:
        """The plan's stacks not yet on disk, in acquisition order, made on demand."""
        previous = None
        for event in self.sequence.model_copy(update={"z_plan": None}).iter_events():
            if event.action is not None and type(event.action).__name__ != "AcquireImage":
                continue  # an autofocus event takes no image
            key = self._key(event)
            if key != previous and key not in self._done:
                yield key
            previous = key

    def _lost_stack(self, key: tuple[int, int, str], like: np.ndarray) -> Stack:
        """A stack whose every plane failed: written as a recorded gap (zeros, every plane
        listed missing), never sent for prediction, so the audit finds it with its reason."""
        n_z = self.assembler.n_z
        return Stack(key=key, planes=np.zeros((n_z, *like.shape), like.dtype),
                     received=np.zeros(n_z, bool), positions_um=np.full((n_z, 3), np.nan),
                     times=np.full(n_z, time.time()))

    # -- MDA thread: enqueue only ---------------------------------------------------
    def _on_frame(self, image: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        arrived = time.time()
        # what the core knew when the frame was taken, read here on the MDA thread so the
        # daemon loop never talks to the hardware while the runner does; before the frame
        # is queued, so the stack it completes finds them
        px = meta.get("pixel_size_um") if isinstance(meta, dict) else None
        if px:
            self._pixel_size_um = float(px)
        if event.index.get("z", 0) == self.assembler.n_z - 1:
            self._ledgers[self._key(event)] = self._read_dose_ledger()
        self.frames.put((event, image, arrived))
        self._doorbell.ring()

    def _on_finished(self, *_: Any) -> None:
        self._mda_done.set()

    # -- daemon loop --------------------------------------------------------------
    def run(self) -> RunSummary:
        """Acquire the plan, then wait for outstanding predictions; returns figures."""
        mda = self.core.mda
        mda.events.frameReady.connect(self._on_frame)
        mda.events.sequenceFinished.connect(self._on_finished)
        if self._first_t >= self._n_t:
            self.report(f"run {self.run_id} already has all {self._n_t} time points; "
                        f"only predictions still missing are made")
        elif self._first_t:
            self.report(f"resuming run {self.run_id} at time point {self._first_t + 1}/{self._n_t}")
        try:
            events = self._events()
            if isinstance(events, list) and not events:
                self._mda_done.set()
            else:
                events = self.loop.events(events, self.core.mda)
                threading.Thread(target=self._run_mda, args=(events,), name="livestain-mda",
                                 daemon=True).start()
            while not (self._mda_done.is_set() and self.frames.empty()):
                self._step(timeout_ms=20)
            for stack in self.assembler.flush():
                self._finish_stack(stack)
            if not self._stop_requested and self._mda_error is None and self._last_frame is not None:
                for key in self._lost.remaining():  # the plan's last stacks got no frame
                    self._finish_stack(self._lost_stack(key, self._last_frame))
            self._drain_predictions()
            if self._mda_error is not None:
                raise RunStopped(
                    f"the microscope failed during the plan ({type(self._mda_error).__name__}: "
                    f"{self._mda_error}). Every stack acquired before is saved (and predicted); "
                    f"fix the hardware or the plan, then continue with --resume."
                )
        except RunStopped as e:
            self.summary.error = str(e)
            self._note(f"stopped: {e}")
            self.report(f"STOPPED: {e}")
            self._halt_acquisition()
        finally:
            mda.events.frameReady.disconnect(self._on_frame)
            mda.events.sequenceFinished.disconnect(self._on_finished)
            self._halt_acquisition()
            self.sockets.close()
            self._doorbell.close()
            self.loop.stop()
            self._note("end")
            self._write_summary()
            self.journal.close()
            self._release_lock()
        self.summary.not_predicted = self._outstanding() + self.summary.unreadable + self.summary.failed
        return self.summary

    def _write_summary(self) -> None:
        """``summary.json`` (`acquisition.run_report`); a failure to write it is logged,
        never allowed to hide how the run ended."""
        self.summary.not_predicted = self._outstanding() + self.summary.unreadable + self.summary.failed
        session = {"acquired": self.summary.acquired, "predicted": self.summary.predicted,
                   "predicted_late": self.summary.predicted_late, "not_predicted": self.summary.not_predicted,
                   "failed": self.summary.failed, "unreadable": self.summary.unreadable,
                   "mean_latency_s": round(self.summary.mean_latency_s, 3) if self.summary.latency_count else None,
                   "error": self.summary.error}
        try:
            write_summary(self.out_dir, self.journal, session, self.status(), tuple(self.stream_channels))
        except (OSError, ValueError) as e:
            log.warning("could not write %s/summary.json: %s", self.out_dir, e)

    def _journal_check(self, score: CheckScore) -> None:
        try:
            self.journal.check_scored(score)
        except OSError as e:
            raise RunStopped(f"{e}. Raw stacks and predictions so far are intact; free some "
                             f"space and continue with --resume.") from None

    def _stack_added(self, key: tuple[int, int, str]) -> None:
        """A check stack on doubt joined the plan (on the MDA thread, before its first frame)."""
        self._injected.add(key)
        self._stacks_total += 1

    def _note(self, what: str) -> None:
        """Journal a run event; on a full disk the event is logged instead of ending the run
        a second time (and hiding why it stopped)."""
        try:
            self.journal.note(what)
        except OSError as e:
            log.warning("%s (event not journaled: %s)", what, e)

    def _run_mda(self, events: Iterable[useq.MDAEvent]) -> None:
        """The MDA thread: pymmcore-plus's runner, with its failure kept for the summary.

        ``core.run_mda`` would let an exception (a preset the scope lacks, a stage
        error) end the thread with a traceback and the run "complete"; a failing MDA
        must never look like a success.
        """
        try:
            self.core.mda.run(events)
        except Exception as e:  # any hardware or plan error ends the plan; the loop reports it
            self._mda_error = e
            log.error("the MDA stopped with an error: %s", e, exc_info=True)
        finally:
            self._mda_done.set()

    def _halt_acquisition(self) -> None:
        if not self._mda_done.is_set():
            self.core.mda.cancel()
            self._mda_done.wait(10)

    def _step(self, timeout_ms: int) -> None:
        """One turn of the loop: frames -> stacks, predictions in, control answered."""
        self._take_frames()
        self.on_tick()
        self.loop.poll()
        self._hold_pause()
        self._catch_up()
        self._mark_sent(self.sockets.pump())
        ready = dict(self.sockets.poller.poll(timeout_ms))
        if self._doorbell in ready or self._doorbell.fileno() in ready:
            self._doorbell.clear()
            self._take_frames()
            self._mark_sent(self.sockets.pump())
        if self.sockets.stacks in ready:
            self.sockets.receive_ready()
            self._mark_sent(self.sockets.pump())
        if self.sockets.results in ready:
            while (result := self.sockets.receive_result()) is not None:
                if isinstance(result[0], wire.FailureHeader):
                    self._on_failure(result[0])
                else:
                    self._on_prediction(*result)
        if self.sockets.control in ready:
            self._on_control()

    def _take_frames(self) -> None:
        """Frames waiting from the MDA thread -> stacks; finished stacks written and offered."""
        deadline = time.monotonic() + 0.05  # bounded, so sockets are served during a burst
        while time.monotonic() < deadline:
            try:
                event, image, arrived = self.frames.get_nowait()
            except queue.Empty:
                break
            if self._key(event) not in self._injected:  # an added check stack is not in the plan
                for key in self._lost.seen(self._key(event)):
                    self._finish_stack(self._lost_stack(key, image))
            self._last_frame = image
            for stack in self.assembler.add(event, image, arrived):
                self._finish_stack(stack)

    def _finish_stack(self, stack: Stack) -> None:
        """Write a finished stack to disk and journal it, then stream it (raw data first)."""
        seq = self._seq
        self._seq += 1
        raw_path = Path(self.store.raw_ref(stack.t, stack.p, stack.channel))
        header = self._stack_header(seq, stack, raw_path)
        info = header.model_dump(by_alias=True) | {"gaps": stack.gaps, "exposure_ms": stack.exposure_ms}
        focus = self.loop.track_focus(stack, header.voxel_size_um[0])
        if focus is not None:
            info["focus"] = focus
        if (ledger := self._ledgers.pop(stack.key, None)) is not None:
            info["dose_ledger"] = self._last_ledger = ledger
        self._check_disk(stack.planes.nbytes + self._prediction_bytes(stack.planes.shape))
        try:
            self.store.write_raw(stack.t, stack.p, stack.channel, stack.planes, voxel_size_um=header.voxel_size_um,
                                 info=info,
                                 # planes of a gap, or axes the plan leaves alone, have no
                                 # position: better none in the file than a made-up 0
                                 plane_positions_um=None if np.isnan(stack.positions_um).any()
                                 else stack.positions_um)
        except OSError as e:
            raise RunStopped(
                f"could not write {raw_path}: {e.strerror or e}. Earlier stacks are intact; "
                f"{_write_fix(e)} and continue with --resume."
            ) from None
        try:
            self.journal.stack_written(seq, stack.t, stack.p, stack.channel, raw_path, len(stack.gaps),
                                       *((focus["focus_offset_um"], focus["z_correction_um"]) if focus else (None, None)),
                                       info=info)
        except OSError as e:
            raise RunStopped(f"{e}. {raw_path.name} and earlier stacks are intact; free some "
                             f"space and continue with --resume.") from None
        self.summary.acquired += 1
        self._injected.discard(stack.key)
        self._streamed_acquired += stack.channel in self.stream_channels
        self._last_tp = (stack.t, stack.p)
        if stack.received.any():
            self.loop.stack_written(stack.t, stack.p, stack.channel, raw_path)
        if stack.gaps:
            self.summary.incomplete += 1
        gaps = f", missing planes {stack.gaps}" if stack.gaps else ""
        self.report(
            f"[t {stack.t + 1}/{self._n_t} p {stack.p + 1}/{self._n_p}] acquired "
            f"{stack.channel} {'x'.join(map(str, stack.planes.shape))}{gaps} -> "
            f"{raw_path.relative_to(self.out_dir)}"
        )
        if not stack.received.any():
            self.report(f"[t {stack.t + 1}/{self._n_t} p {stack.p + 1}/{self._n_p}] every plane of "
                        f"{stack.channel} failed: recorded as a gap, nothing to predict")
            return
        self.sockets.publish(header, stack.planes)
        if stack.channel in self.stream_channels:
            self.records[seq] = StackRecord(seq, stack.t, stack.p, raw_path, time.time(), header)
            self._mark_late(self.sockets.offer(header, stack.planes))

    def _stack_header(self, seq: int, stack: Stack, raw_path: Path) -> wire.StackHeader:
        px = self._pixel_size_um
        z = stack.positions_um[:, 2]
        dz = float(np.nanmean(np.diff(z))) if len(z) > 1 and np.isfinite(z).sum() > 1 else 1.0
        return wire.StackHeader(
            kind="stack",
            run_id=self.run_id,
            seq=seq,
            t=stack.t,
            p=stack.p,
            channel=stack.channel,
            shape=list(stack.planes.shape),
            dtype=str(stack.planes.dtype),
            voxel_size_um=[abs(dz) if np.isfinite(dz) and dz else 1.0, px, px],
            position_um=[float(v) for v in np.nan_to_num(stack.positions_um[0])],
            acquired_start=float(np.nanmin(stack.times)),
            acquired_end=float(np.nanmax(stack.times)),
            path=str(raw_path),
        )

    def _read_dose_ledger(self) -> dict | None:
        """The camera's light-dose ledger (the simulated scope has one), else None."""
        cam = self.core.getCameraDevice()
        try:
            if cam and self.core.hasProperty(cam, "DoseLedger"):
                return json.loads(self.core.getProperty(cam, "DoseLedger"))
        except (RuntimeError, ValueError):
            log.warning("could not read the camera's dose ledger")
        return None

    def _light_dose(self) -> dict[str, Any]:
        """Fluorescence light used so far, and what the same run with fluorescence would use."""
        planes = self.assembler.n_z
        structures = self._n_structures
        # per brightfield (streamed) stack: paired and check-frame fluorescence stacks are
        # the light being counted, not stacks a fluorescence run would also take
        avoided = self._streamed_acquired * planes * structures * self.policies.equivalent_fluorescence_exposure_ms
        ledger = self._last_ledger
        used = None
        if ledger is not None:
            used = sum(p.get("fluorescence_dose", 0.0) for p in ledger.get("positions", {}).values())
        return {
            "fluorescence_dose_ms": used,
            "equivalent_fluorescence_run_dose_ms": avoided,
            "dose_note": (f"a fluorescence run would expose {structures} channels x {planes} planes x "
                          f"{self.policies.equivalent_fluorescence_exposure_ms:g} ms per stack"),
        }

    def _prediction_bytes(self, shape: tuple[int, ...]) -> int:
        """Disk a stack's prediction will take: float32, one channel per structure."""
        return int(np.prod(shape)) * 4 * self._n_structures if self.stream_channels else 0

    #: Room kept for the journal, log and file headers beyond the stack and its prediction.
    RESERVE_BYTES = 16 * 1024**2

    def _check_disk(self, needed_bytes: int = 0) -> None:
        """Stop cleanly unless this stack, its prediction and the safety margin all fit.

        With ``min_free_gb: 0`` the check still reserves the stack and its (float32,
        several structures: ~6x larger) prediction, so a full disk stops the run here
        rather than in the middle of a write.
        """
        free = self.free_space(self.out_dir)
        needed = self.policies.min_free_bytes + needed_bytes + self.RESERVE_BYTES
        if free < needed:
            raise RunStopped(
                f"only {free / 1e6:.0f} MB free on the disk of {self.out_dir}: the next stack and "
                f"its prediction need {(needed_bytes + self.RESERVE_BYTES) / 1e6:.0f} MB beyond the "
                f"{self.policies.min_free_bytes / 1e6:.0f} MB safety margin (policies.min_free_gb). "
                f"Every stack so far is saved; free some space and continue with --resume."
            )

    # -- stack states -----------------------------------------------------------------
    def _mark_sent(self, handed: list[tuple[int, str]]) -> None:
        now = time.time()
        for seq, worker in handed:
            rec = self.records.get(seq)
            if rec is not None:  # None: predicted meanwhile by the worker it went to first
                rec.move(StackState.SENT)
                rec.sent_at, rec.holder = now, worker

    #: Late stacks (waiting to be predicted from disk) held in memory; the rest are only in
    #: the journal and are read back in batches. Before this bound a run whose workers fell
    #: behind for days kept a record of every such stack (found by the soak: the daemon
    #: grew ~0.5 KB per stack after a resume, and `_catch_up` scanned them all each step).
    LATE_KEPT = 256

    def _mark_late(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.records[seq].move(StackState.LATE)
            log.info("workers behind: stack seq %d will be predicted from disk later", seq)
        late = sorted(seq for seq, r in self.records.items() if r.state == StackState.LATE)
        for seq in late[self.LATE_KEPT:]:  # the newest: caught up last, read back by then
            del self.records[seq]
            self._failures.pop(seq, None)
            self._late_on_disk += 1

    def _reload_late(self) -> None:
        """Read the oldest late stacks the journal holds back into memory (up to the bound)."""
        channels = tuple(self.stream_channels)
        while channels and self._late_on_disk:
            room = self.LATE_KEPT - sum(r.state == StackState.LATE for r in self.records.values())
            rows = self.journal.waiting(channels, room, skip=set(self.records)) if room > 0 else []
            skipped = 0
            for row in rows:
                raw = row.raw_in(self.out_dir)
                if not ref_exists(raw):  # cut short by a crash (its .partial removed): re-acquired
                    self._journal_not_predictable(row.seq, "raw stack not on disk")
                    skipped += 1
                    continue
                rec = StackRecord(row.seq, row.t, row.p, raw, time.time())
                rec.state = StackState.LATE  # read back from the journal: it starts late
                self.records[row.seq] = rec
            self._late_on_disk = max(0, self.journal.count_waiting(channels) - len(self.records))
            if not rows or not skipped:  # nothing more to read, or the room is filled
                return

    def requeue_in_flight(self, worker: str | None = None) -> None:
        """A worker died: what it held is lost in transit; predict it again from disk.

        ``worker`` is its name (``host:pid``); None re-queues every stack in flight.
        """
        lost = [r.seq for r in self.records.values()
                if r.state == StackState.SENT and (worker is None or r.holder == worker)]
        for seq in lost:
            self.sockets.release(seq)  # its reader is dead: the segment may be reused
        self._mark_late(lost)

    def _catch_up(self) -> None:
        """When workers have nothing newer to do, feed them the oldest late stack from disk."""
        now = time.time()
        stale = [r for r in self.records.values()
                 if r.state == StackState.SENT and now - r.sent_at > self._resend_after_s]
        if stale:
            holders = sorted({r.holder for r in stale})
            self.report(f"no prediction for {len(stale)} stack(s) after "
                        f"{self._resend_after_s:.0f} s from {', '.join(holders)}: "
                        f"presumed hung, re-sending")
            for r in stale:
                self.sockets.taint(r.seq)  # the hung worker may still write into its segments
            self._mark_late([r.seq for r in stale])
            self.on_hung_worker(holders)
        if self.sockets.backlog or any(r.state == StackState.SENT for r in self.records.values()):
            return
        late = [r for r in self.records.values() if r.state == StackState.LATE]
        if not late and self._late_on_disk:
            self._reload_late()
            late = [r for r in self.records.values() if r.state == StackState.LATE]
        if not late:
            return
        rec = min(late, key=lambda r: r.seq)
        try:
            array, info = read_ref(rec.raw_path)
            info = self.journal.info(rec.seq) or info  # a Zarr chunk carries no header of its own
            header = rec.header or wire.StackHeader.model_validate(
                {k: v for k, v in info.items() if k not in ("gaps", "exposure_ms")}
            )
        except (OSError, ValueError) as e:
            self.report(f"cannot re-read {rec.raw_path} to predict it ({e}); it stays unpredicted")
            self.sockets.release(rec.seq, reuse=False)  # a hung worker may still hold its segments
            del self.records[rec.seq]
            self.summary.unreadable += 1
            self._journal_not_predictable(rec.seq, f"raw stack unreadable: {e}")
            return
        rec.move(StackState.QUEUED)
        rec.caught_up = True
        rec.header = header
        self._mark_late(self.sockets.offer(header, array))

    def _on_prediction(self, header: wire.StackHeader, array: np.ndarray) -> None:
        received_at = time.time()
        # through shared memory: a view of a segment reused once this stack is released
        in_segment, header.shm = bool(header.shm), ""
        seq = header.source_seq if header.source_seq is not None else -1
        if header.run_id == self.run_id and seq in self._predicted:
            return  # a duplicate (a re-sent stack, or a second worker): the first stands
        record = self.records.get(seq)
        if header.run_id == self.run_id and record is None and 0 <= seq < self._seq:
            # late, and set aside to the journal meanwhile (`LATE_KEPT`): predicted again
            log.info("prediction of seq %d came after it was left to catch-up; dropped", seq)
            return
        if header.run_id != self.run_id or record is None:
            self.sockets.counts.malformed_results += 1
            log.warning("dropped a prediction for an unknown stack (run %s seq %s)", header.run_id, seq)
            return
        late = record.caught_up or record.state == StackState.LATE  # re-read from disk, not live
        pred_path = Path(self.store.prediction_ref(record.t, record.p))
        info = header.model_dump(by_alias=True) | {
            "source_path": str(record.raw_path),
            "latency_s": round(time.time() - record.completed_at, 3),  # complete -> received
            "caught_up_from_disk": late,
            "stack_completed_at": record.completed_at,
            "prediction_received_at": received_at,
            "versions": {"livestain": __version__, "torch_worker": header.model_extra.get("torch", "")
                         if header.model_extra else ""},
        }
        # viewers first: a prediction can be made again, so unlike raw data it need not
        # wait for the disk (saves the ~30 ms write + fsync from the drawn latency)
        header.path = str(pred_path)
        # a viewer may receive it after the segment is reused: give the display a copy
        self.sockets.publish(header, np.array(array) if in_segment else array)
        try:
            self.store.write_prediction(record.t, record.p, array, structures=header.structures,
                                        voxel_size_um=header.voxel_size_um, info=info)
        except OSError as e:
            raise RunStopped(f"could not write prediction {pred_path}: {e.strerror or e}. Raw "
                             f"stacks are intact; {_write_fix(e)} and continue with --resume "
                             f"(it predicts what is missing).") from None
        self._n_structures = len(header.structures)
        record.move(StackState.PREDICTED)
        record.predicted_path = pred_path
        record.latency_s = time.time() - record.completed_at
        self._remember_predicted(record.seq)
        del self.records[record.seq]
        self._failures.pop(record.seq, None)
        self.sockets.discard(record.seq)
        self.sockets.release(record.seq)
        trust = self.trust.add(record.t, record.p, header.model_extra or {})
        try:
            self.journal.prediction_written(record.seq, pred_path, record.latency_s,
                                            trust.confidence, ",".join(trust.flags), header.model,
                                            info=info)
        except OSError as e:
            raise RunStopped(f"{e}. Raw stacks and predictions so far are intact; free some "
                             f"space and continue with --resume.") from None
        self.summary.predicted += 1
        self.loop.prediction_written(record.t, record.p, pred_path, header.structures, trust.confidence)
        if late:
            self.summary.predicted_late += 1
        else:
            self.summary.add_latency(record.latency_s)
        self.report(
            f"[t {record.t + 1}/{self._n_t} p {record.p + 1}/{self._n_p}] predicted "
            f"{','.join(header.structures)} in {header.inference_s:.2f} s, "
            f"latency {record.latency_s:.2f} s{' (caught up)' if late else ''} -> "
            f"{pred_path.relative_to(self.out_dir)}{trust.line()}"
        )

    #: Attempts at predicting one stack before it is recorded as not predictable.
    PREDICTION_ATTEMPTS = 2

    def _on_failure(self, failure: wire.FailureHeader) -> None:
        """A worker could not predict a stack: try once more (from disk, any worker), then
        record it as not predictable with the worker's reason, and go on.

        The worker is healthy: it answered. Before this message existed the daemon took
        it for hung after ``resend_after_s``, killed it and re-sent the stack forever.
        """
        seq = failure.source_seq
        record = self.records.get(seq)
        if failure.run_id != self.run_id or record is None:
            return  # predicted meanwhile by another worker, or not ours
        self.sockets.release(seq)  # the worker answered: it writes into no segment any more
        attempts = self._failures[seq] = self._failures.get(seq, 0) + 1
        where = f"[t {record.t + 1}/{self._n_t} p {record.p + 1}/{self._n_p}]"
        if attempts < self.PREDICTION_ATTEMPTS:
            self.report(f"{where} {failure.worker} could not predict it ({failure.error}); trying again")
            self._mark_late([seq])
            return
        del self.records[seq]
        self._failures.pop(seq, None)
        self.sockets.discard(seq)
        self.summary.failed += 1
        self._journal_not_predictable(seq, failure.error)
        self._note(f"prediction failed: seq {seq} t {record.t} p {record.p}: {failure.error}")
        self.report(f"{where} NOT PREDICTED after {attempts} attempts ({failure.error}); the raw "
                    f"stack is on disk: fix the cause and re-predict with `livestain predict-run`")

    #: Predicted seqs remembered for dropping duplicates (as many as the sockets' memory
    #: of finished hand-overs, with room: older answers never reach `_on_prediction`).
    PREDICTED_MEMORY = 4096

    def _remember_predicted(self, seq: int) -> None:
        self._predicted[seq] = None
        while len(self._predicted) > self.PREDICTED_MEMORY:
            self._predicted.popitem(last=False)

    def _journal_not_predictable(self, seq: int, reason: str) -> None:
        try:
            self.journal.not_predictable(seq, reason)
        except OSError as e:
            raise RunStopped(f"{e}. Raw stacks and predictions so far are intact; free some "
                             f"space and continue with --resume.") from None

    def _outstanding(self) -> int:
        return len(self.records) + self._late_on_disk

    def _drain_predictions(self) -> None:
        """After the plan: wait (bounded) for predictions of every streamed stack."""
        # a user's stop still collects predictions already under way, but briefly
        drain = self.policies.drain_timeout_s
        timeout = min(drain, 15.0) if self._stop_requested else drain
        deadline = time.monotonic() + timeout
        # a stack held by a worker that never answers is re-sent within the drain, not
        # after it: resend_after_s (300 s) is longer than the drain (120 s)
        self._resend_after_s = min(self.policies.resend_after_s, timeout / 2)
        while time.monotonic() < deadline and self._outstanding():
            self._step(timeout_ms=100)
        if n := self._outstanding():
            self.report(f"{n} stacks not predicted; their raw data is on disk")

    # -- control --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The run's status (`livestain.run_status.RunStatus`, as JSON-ready dict): what
        ``livestain status`` prints, every control reply carries and the window shows.
        Built through the model, so an undeclared or mistyped field fails here."""
        return wire.RunStatus.model_validate(self._status_fields()).model_dump(mode="json")

    def _status_fields(self) -> dict[str, Any]:
        counts = self.sockets.counts
        states = [r.state for r in self.records.values()]
        if self.summary.error:
            state = "stopped"
        elif self._paused:
            state = "paused"
        else:
            state = "finishing" if self._mda_done.is_set() else "acquiring"
        return {
            "run_id": self.run_id,
            "state": state,
            "current_t": self._last_tp[0],
            "current_p": self._last_tp[1],
            "error": self.summary.error,
            "out_dir": str(self.out_dir),
            "stacks_acquired": self.summary.acquired,
            "stacks_predicted": self.summary.predicted,
            "stacks_predicted_late": self.summary.predicted_late,
            "stacks_late": states.count(StackState.LATE) + self._late_on_disk,
            "stacks_in_flight": states.count(StackState.SENT),
            "stacks_sent": counts.sent,
            "stacks_dropped": counts.dropped,
            "backlog": len(self.sockets.backlog),
            "workers_idle": len(self.sockets.idle),
            "worker_heartbeats_s": self.sockets.worker_heartbeats(),
            "malformed_results": counts.malformed_results,
            "stacks_failed": self.summary.failed,
            "malformed_commands": self._malformed_commands,
            "unauthenticated_messages": counts.unauthenticated,
            "timepoints": self._n_t,
            "stacks_total": self._stacks_total,
            "stacks_done_before": len(self._done),  # on disk before a --resume
            "positions": self._n_p,
            "disk_free_bytes": self.free_space(self.out_dir),
            "uptime_s": round(time.time() - self.started_at, 1),
        } | self.trust.status() | self.loop.status() | self._light_dose() | self._snap_counts() | self.extra_status()

    def _on_control(self) -> None:
        frames = self.sockets.control.recv_multipart()
        try:
            command, _ = wire.decode_command(frames)
        except wire.WireError as e:
            self._malformed_commands += 1
            self.sockets.control.send_multipart(wire.encode_reply(False, error=str(e)))
            return
        try:
            if command in ("pause", "resume"):
                self.core.mda.set_paused(command == "pause")
                self._paused = command == "pause"
                self._note(f"{command}d by the control socket")
                self.report(f"{'paused' if command == 'pause' else 'resumed'} by `livestain {command}`")
            elif command == "stop":
                self.report("stop requested by `livestain stop`: finishing the current frame")
                self.request_stop()
            reply = wire.encode_reply(True, **self.status())
        except Exception as e:  # a command must never take the run down
            log.exception("control command %r failed", command)
            reply = wire.encode_reply(False, error=f"{command} failed: {e}")
        self.sockets.control.send_multipart(reply)

    def _hold_pause(self) -> None:
        """Keep the runner paused while the user wants it paused.

        pymmcore-plus 0.18 can lose a pause: a ``set_paused(True)`` that lands between
        the end of its wait for an event and the start of that event is overwritten by
        the runner. Asking again while it is not paused is harmless (a pause already
        pending is left as it is) and makes the pause stick.
        """
        mda = self.core.mda
        if self._paused and not mda.is_paused() and mda.is_running() and not self._stop_requested:
            mda.set_paused(True)

    def request_stop(self) -> None:
        """Stop after the current frame (control socket and signal handlers call this)."""
        if not self._stop_requested:
            self._note("stop requested")
        self._stop_requested = True
        self.summary.stopped_early = True
        self.core.mda.cancel()


class _PendingEvents:
    """The plan's events not yet on disk, shifted by ``offset`` s, made on demand.

    An iterable, not an iterator: pymmcore-plus runs an iterator as given, but passes
    other iterables through its engine's ``event_iterator`` (which merges z-stacks into
    hardware sequences), as it did the list this replaces.
    """

    def __init__(self, sequence: useq.MDASequence, done: frozenset[tuple[int, int, str]],
                 offset: float, key: Callable[[useq.MDAEvent], tuple[int, int, str]]) -> None:
        self.sequence, self.done, self.offset, self.key = sequence, done, offset, key

    def __iter__(self) -> Iterator[useq.MDAEvent]:
        for e in self.sequence.iter_events():
            if self.key(e) in self.done:
                continue
            if e.min_start_time is not None:
                e = e.model_copy(update={"min_start_time": e.min_start_time - self.offset})
            yield e


def _write_fix(error: OSError) -> str:
    """What the user should do about a failed write, by its cause."""
    import errno

    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space"
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return "raise the open-file limit (`ulimit -n`) or stop other programs holding many files"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the data folder writable"
    return "fix the disk"


def _autofocus_device(core: Any) -> str:
    """The scope's hardware autofocus device, "" when it has none."""
    try:
        return str(core.getAutoFocusDevice() or "")
    except (RuntimeError, AttributeError):
        return ""


def _channel_presets(core: Any, sequence: useq.MDASequence) -> list[str]:
    """The presets of the plan's channel group on this scope (where check channels come from)."""
    group = sequence.channels[0].group if sequence.channels else "Channel"
    try:
        return list(core.getAvailableConfigs(group))
    except (RuntimeError, ValueError):
        return []


def _check_axis_order(sequence: useq.MDASequence) -> None:
    order = "".join(sequence.axis_order)
    if "z" in order:
        z = order.index("z")
        outer = [a for a in "tp" if a in order and order.index(a) > z]
        if outer:
            raise ValueError(
                f"axis_order {order!r} puts z outside {''.join(outer)}: livestain needs whole "
                f"z-stacks, so z must come after t and p (e.g. 'tpcz' or 'tpzc')"
            )


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

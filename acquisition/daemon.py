"""The acquisition daemon: plan in, stacks to disk, stacks to workers, predictions back.

The orchestration only; each job is a module of its own. The MDA thread only queues
frames (`MdaFrames`); the daemon loop (the caller's thread) owns every socket and file:
it assembles frames into stacks, writes each to disk first (`StackWriter`), then emits
`RunEvents.stack_written` to the stages (check frames, viewers, workers); it follows each
streamed stack to its prediction (`PredictionTracker`, which emits
`prediction_written`), and answers the control socket (`RunControl`) with the run's
status (`livestain.run_status.RunStatus`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import useq
import zmq

from livestain import wire
from livestain.plate import PlateLayout
from livestain.store import RunStore, open_store

from .audit import planned_keys
from .checks import CheckScore
from .closed_loop import ClosedLoop, LoopHost
from .control import RunControl
from .daemon_hooks import DaemonHooks
from .journal import Journal
from .light_dose import LightDose
from .mda_frames import MdaFrames
from .plan_events import (channel_presets, check_axis_order, focus_mode, interval_s, pending_events,
                          pending_keys, plan_for_scope, scan_pending, stack_key)
from .policies import Policies
from .predictions import PredictionTracker
from .preflight import check_plan, check_plan_against_core
from .retry import install_snap_retries
from .run_events import RunEvents, WrittenStack, emit
from .run_folder import RunFolder
from .run_report import write_summary
from .run_summary import RunStopped, RunSummary, stop_on_journal_error
from .stack_state import StackRecord
from .stack_writer import StackWriter
from .stacks import LostStackTracker, Stack, StackAssembler
from .streaming import DaemonSockets
from .trust import TrustLedger

__all__ = ["Daemon", "DaemonHooks", "RunStopped", "RunSummary"]

log = logging.getLogger(__name__)


class Daemon:
    """Runs one useq plan on a core, streaming stacks to workers and viewers.

    ``core`` is a configured CMMCorePlus (simulated or real); ``sequence`` the plan, whose
    stacks are keyed by ``(t, p, channel)`` (z inner to t and p); ``out_dir`` the dataset
    folder (a new run refuses one that holds a run; ``resume=True`` continues it, taking
    only the stacks not yet on disk); ``endpoints`` the four of `livestain.wire`;
    ``report`` gets one line per stack event (console and log); ``keys`` is a CURVE key
    folder (needed beyond loopback); ``provenance`` (``{"model": {...}}``) goes to
    ``run.json``, a resume that changes it appends the change; ``hooks`` reach the
    worker supervisor.
    """

    def __init__(self, core: Any, sequence: useq.MDASequence, out_dir: Path, endpoints: dict[str, str],
                 policies: Policies | None = None, *, report: Callable[[str], None] = print,
                 resume: bool = False, keys: str | Path | None = None,
                 provenance: dict[str, Any] | None = None, hooks: DaemonHooks | None = None) -> None:
        check_axis_order(sequence)
        self.policies = policies = policies or Policies()
        self.hooks = hooks = hooks or DaemonHooks()
        self.provenance = provenance or {}
        n_predicted = len((self.provenance.get("model") or {}).get("structures") or ()) or 3
        sequence = plan_for_scope(sequence, policies, core, n_predicted)
        # a bad plan fails here, in seconds, before any folder or socket exists
        check_plan(sequence, policies.stream_channels)
        check_plan_against_core(sequence, core)
        self.core, self.sequence, self.out_dir, self.report = core, sequence, Path(out_dir), report
        self.stream_channels = policies.stream_channels
        self._n_t = sequence.sizes.get("t", 1) or 1
        self._n_p = sequence.sizes.get("p", 1) or 1
        self._snap_counts = install_snap_retries(core, policies.snap_retries, report)
        # sockets first: a refused bind (busy port, no keys) must leave no dataset behind
        self.sockets = DaemonSockets(endpoints, backlog=policies.live_backlog, keys=keys)
        control_port = int(self.sockets.endpoints["control"].rsplit(":", 1)[-1])
        self.folder = RunFolder(self.out_dir, control_port - wire.PORT_OFFSETS["control"])
        try:
            self._open_dataset(resume)
            self.journal = Journal(self.out_dir)
            self.store: RunStore = open_store(self.out_dir, self._storage, timepoints=self._n_t,
                                              interval_s=interval_s(sequence),
                                              compression=policies.storage_compression,
                                              plate=PlateLayout.from_sequence(sequence))
            self._seq = self.journal.next_seq()
            self.summary = RunSummary(self.run_id, self.out_dir)
            self.trust = TrustLedger()  # per-stack confidence and input flags, for status and window
            self.loop = self._closed_loop(core, n_predicted)
            self.events = RunEvents()
            self.predictions = PredictionTracker(
                run_id=self.run_id, out_dir=self.out_dir, sockets=self.sockets, journal=self.journal,
                store=self.store, summary=self.summary, trust=self.trust, events=self.events,
                stream_channels=self.stream_channels, where=self._where, report=report, note=self._note,
                next_seq=lambda: self._seq, resend_after_s=policies.resend_after_s,
                on_hung_worker=hooks.on_hung_worker)
            self.predictions.resume()
            self.journal.note("resume" if resume else "start")
        except BaseException:
            self.sockets.close()
            self.folder.release_lock()
            raise
        self.dose = LightDose(policies.equivalent_fluorescence_exposure_ms)
        self.writer = StackWriter(run_id=self.run_id, out_dir=self.out_dir, store=self.store,
                                  journal=self.journal, policies=policies, dose=self.dose, loop=self.loop,
                                  structures=lambda: self.predictions.n_structures, free_space=hooks.free_space)
        self.assembler = StackAssembler.for_sequence(sequence)
        self.mda = MdaFrames(core, self.assembler.n_z, self.dose)
        self.sockets.poller.register(self.mda.doorbell, zmq.POLLIN)
        self.control = RunControl(core.mda, self.status, self._note, report, on_stop=self.request_stop)
        # the stages after the disk, in order: check frames, viewers, workers
        self.events.stack_written.connect(self.loop.on_stack_written)
        self.events.stack_written.connect(self._display)
        self.events.stack_written.connect(self._to_workers)
        self.events.prediction_written.connect(self.loop.on_prediction_written)
        self._lost = LostStackTracker(pending_keys(sequence, self._done))
        self._last_frame: np.ndarray | None = None
        self._injected: set[tuple[int, int, str]] = set()  # check stacks added on doubt, not in the plan
        # every stack of the plan, all channels (paired mode: 4 per time point and position)
        self._stacks_total = sum(1 for _ in planned_keys(sequence))
        self._last_tp: tuple[int | None, int | None] = (None, None)
        self.started_at = time.time()

    # -- set-up ---------------------------------------------------------------------
    def _open_dataset(self, resume: bool) -> None:
        """Create (or, resuming, reopen) the run folder (`RunFolder`): run id, storage,
        the stacks already on disk and the first time point still to take."""
        if resume:
            self.run_id, self._storage, self._done = self.folder.reopen(self.provenance)
            self._first_t, self._offset = scan_pending(self.sequence, self._done)
            return
        self._storage, self._done, self._first_t, self._offset = self.policies.storage, set(), 0, 0.0
        self.run_id = self.folder.create(self.sequence, self.policies, self.provenance)

    def _closed_loop(self, core: Any, n_predicted: int) -> ClosedLoop:
        host = LoopHost(self.out_dir, self.report, self._note, self._journal_check, lambda: self._seq,
                        self._where, self._stack_added)
        return ClosedLoop(host, self.sequence, self.policies, focus_mode=focus_mode(self.policies.track_focus, core),
                          channel_presets=channel_presets(core, self.sequence) if self.policies.checks else [],
                          n_t=self._n_t, n_p=self._n_p, n_predicted=n_predicted,
                          model=self.provenance.get("model"), swap_model=self.hooks.swap_model)

    def _where(self, t: int, p: int) -> str:
        return f"[t {t + 1}/{self._n_t} p {p + 1}/{self._n_p}]"

    # -- daemon loop ----------------------------------------------------------------
    def run(self) -> RunSummary:
        """Acquire the plan, then wait for outstanding predictions; returns figures."""
        if self._first_t >= self._n_t:
            self.report(f"run {self.run_id} already has all {self._n_t} time points; "
                        f"only predictions still missing are made")
        elif self._first_t:
            self.report(f"resuming run {self.run_id} at time point {self._first_t + 1}/{self._n_t}")
        try:
            self._acquire(pending_events(self.sequence, self._done, self._offset))
            self._drain_predictions()
            if (error := self.mda.error) is not None:
                raise RunStopped(
                    f"the microscope failed during the plan ({type(error).__name__}: "
                    f"{error}). Every stack acquired before is saved (and predicted); "
                    f"fix the hardware or the plan, then continue with --resume."
                )
        except RunStopped as e:
            self.summary.error = str(e)
            self._note(f"stopped: {e}")
            self.report(f"STOPPED: {e}")
            self.mda.halt()
        finally:
            self._close()
        return self.summary

    def _acquire(self, events: Iterable[useq.MDAEvent]) -> None:
        """Run the remaining plan on the MDA thread, taking its frames until it ends."""
        self.mda.start(events if isinstance(events, list) and not events else self.loop.events(events, self.core.mda))
        while not self.mda.finished:
            self._step(timeout_ms=20)
        for stack in self.assembler.flush():
            self._finish_stack(stack)
        if not self.control.stop_requested and self.mda.error is None and self._last_frame is not None:
            for key in self._lost.remaining():  # the plan's last stacks got no frame
                self._finish_stack(Stack.all_missing(key, self.assembler.n_z, self._last_frame))

    def _close(self) -> None:
        """The end of a run, however it ended: hardware stopped, sockets closed, summary
        written, journal closed, the folder's lock released."""
        self.mda.close()
        self.sockets.close()
        self.loop.stop()
        self._note("end")
        self.summary.not_predicted = self.predictions.outstanding() + self.summary.unreadable + self.summary.failed
        try:  # a failure to write it is logged, never allowed to hide how the run ended
            write_summary(self.out_dir, self.journal, self.summary.session_figures(), self.status(),
                          tuple(self.stream_channels))
        except (OSError, ValueError) as e:
            log.warning("could not write %s/summary.json: %s", self.out_dir, e)
        self.journal.close()
        self.folder.release_lock()

    def _step(self, timeout_ms: int) -> None:
        """One turn of the loop: frames -> stacks, predictions in, control answered."""
        predictions = self.predictions
        self._take_frames()
        self.hooks.on_tick()
        self.loop.poll()
        self.control.hold_pause()
        predictions.catch_up()
        predictions.mark_sent(self.sockets.pump())
        ready = dict(self.sockets.poller.poll(timeout_ms))
        doorbell = self.mda.doorbell
        if doorbell in ready or doorbell.fileno() in ready:
            doorbell.clear()
            self._take_frames()
            predictions.mark_sent(self.sockets.pump())
        if self.sockets.stacks in ready:
            self.sockets.receive_ready()
            predictions.mark_sent(self.sockets.pump())
        if self.sockets.results in ready:
            while (result := self.sockets.receive_result()) is not None:
                if isinstance(result[0], wire.FailureHeader):
                    predictions.on_failure(result[0])
                else:
                    predictions.on_prediction(*result)
        if self.sockets.control in ready:
            self.control.answer(self.sockets.control)

    def _take_frames(self) -> None:
        """Frames waiting from the MDA thread -> stacks; finished stacks written and offered."""
        for event, image, arrived in self.mda.take():
            if stack_key(event) not in self._injected:  # an added check stack is not in the plan
                for key in self._lost.seen(stack_key(event)):
                    self._finish_stack(Stack.all_missing(key, self.assembler.n_z, image))
            self._last_frame = image
            for stack in self.assembler.add(event, image, arrived):
                self._finish_stack(stack)

    def _finish_stack(self, stack: Stack) -> None:
        """Write a finished stack (raw data first), then tell the loop, viewers and workers."""
        seq = self._seq
        self._seq += 1
        header, raw_path = self.writer.write(seq, stack, self.mda.pixel_size_um)
        self.summary.acquired += 1
        self.summary.incomplete += bool(stack.gaps)
        self._injected.discard(stack.key)
        self.dose.streamed_stacks += stack.channel in self.stream_channels
        self._last_tp = (stack.t, stack.p)
        gaps = f", missing planes {stack.gaps}" if stack.gaps else ""
        self.report(f"{self._where(stack.t, stack.p)} acquired {stack.channel} "
                    f"{'x'.join(map(str, stack.planes.shape))}{gaps} -> {raw_path.relative_to(self.out_dir)}")
        if not stack.received.any():
            self.report(f"{self._where(stack.t, stack.p)} every plane of {stack.channel} failed: "
                        f"recorded as a gap, nothing to predict")
            return
        emit(self.events.stack_written, WrittenStack(seq, stack, header, raw_path))

    def _display(self, written: WrittenStack) -> None:
        """Viewers get every stack (brightfield and fluorescence alike)."""
        self.sockets.publish(written.header, written.stack.planes)

    def _to_workers(self, written: WrittenStack) -> None:
        """Workers get the streamed channels, followed to their prediction."""
        stack = written.stack
        if stack.channel in self.stream_channels:
            self.predictions.add(StackRecord(written.seq, stack.t, stack.p, written.ref, time.time(),
                                             written.header), stack.planes)

    def _drain_predictions(self) -> None:
        """After the plan: wait (bounded) for predictions of every streamed stack."""
        # a user's stop still collects predictions already under way, but briefly
        drain = self.policies.drain_timeout_s
        timeout = min(drain, 15.0) if self.control.stop_requested else drain
        deadline = time.monotonic() + timeout
        # a stack held by a worker that never answers is re-sent within the drain, not
        # after it: resend_after_s (300 s) is longer than the drain (120 s)
        self.predictions.resend_after_s = min(self.policies.resend_after_s, timeout / 2)
        while time.monotonic() < deadline and self.predictions.outstanding():
            self._step(timeout_ms=100)
        if n := self.predictions.outstanding():
            self.report(f"{n} stacks not predicted; their raw data is on disk")

    # -- the closed loop's and the journal's small needs -------------------------------
    def _journal_check(self, score: CheckScore) -> None:
        with stop_on_journal_error():
            self.journal.check_scored(score)

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

    # -- control --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The run's status (`livestain.run_status.RunStatus`, as JSON-ready dict): what
        ``livestain status`` prints, every control reply carries and the window shows.
        Built through the model, so an undeclared or mistyped field fails here."""
        return wire.RunStatus.model_validate(self._status_fields()).model_dump(mode="json")

    def _status_fields(self) -> dict[str, Any]:
        if self.summary.error:
            state = "stopped"
        elif self.control.paused:
            state = "paused"
        else:
            state = "finishing" if self.mda.done.is_set() else "acquiring"
        return {
            "run_id": self.run_id, "state": state, "current_t": self._last_tp[0], "current_p": self._last_tp[1],
            "malformed_commands": self.control.malformed_commands,
            "timepoints": self._n_t, "positions": self._n_p, "stacks_total": self._stacks_total,
            "stacks_done_before": len(self._done),  # on disk before a --resume
            "disk_free_bytes": self.hooks.free_space(self.out_dir),
            "uptime_s": round(time.time() - self.started_at, 1),
            "model_name": (self.provenance.get("model") or {}).get("name"),
            "model_validation_r": (self.provenance.get("model") or {}).get("validation_pearson"),
        } | self.summary.status() | self.sockets.status() | self.predictions.counts() | self.trust.status() \
          | self.loop.status() | self.dose.status(self.assembler.n_z, self.predictions.n_structures) \
          | self._snap_counts() | self.hooks.extra_status()

    def request_stop(self) -> None:
        """Stop after the current frame (control socket and signal handlers call this)."""
        self.summary.stopped_early = True
        self.control.stop()

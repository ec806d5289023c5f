"""From a stack on disk to its prediction on disk: the daemon's prediction bookkeeping.

Every streamed stack gets a `StackRecord` when it is written, and loses it when its
prediction is written (or it is recorded as not predictable). In between the tracker
moves it through the `StackState`s: handed to a worker, set aside as late when the
workers fall behind (the newest is predicted first, the rest later from disk), re-sent
when its worker dies or hangs, tried once more when a worker says it failed.

Memory stays bounded on a run of days: at most `LATE_KEPT` late records are held (the
journal holds the rest and they are read back oldest first), and only the last
`PREDICTED_MEMORY` predicted seqs are remembered to drop duplicate answers.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from livestain import __version__, wire
from livestain.store import RunStore, read_ref, ref_exists

from .journal import Journal
from .run_events import RunEvents, WrittenPrediction, emit
from .run_summary import RunStopped, RunSummary, stop_on_journal_error, write_fix
from .stack_state import StackRecord, StackState
from .streaming import DaemonSockets
from .trust import TrustLedger

log = logging.getLogger(__name__)


class PredictionTracker:
    """The streamed stacks not yet predicted, and what happens to each answer.

    Parameters
    ----------
    run_id, out_dir : str, Path
        The run's id (answers for another run are refused) and folder (for short paths
        in the console lines).
    sockets, journal, store, summary, trust, events
        The daemon's parts this bookkeeping writes to: stacks go out through the
        sockets, predictions to the store and the journal, figures to the summary, the
        worker's confidence to the trust ledger; each prediction written is an event
        (`RunEvents.prediction_written`: check-frame scoring, fluorescence on doubt).
    stream_channels : sequence of str
        Channels that are predicted (the journal's waiting stacks are of these).
    where : callable
        ``(t, p) -> "[t 3/10 p 1/2]"``, the console's prefix.
    report : callable
        One line per event, for the console and the run's log.
    note : callable
        Journals a run event (never raising).
    next_seq : callable
        The daemon's next stack number: an answer for a lower seq without a record was
        set aside to the journal meanwhile (late), not unknown.
    resend_after_s : float
        A stack handed to a worker this long ago without an answer is re-sent and
        ``on_hung_worker`` is told who held it.
    """

    #: Late stacks (waiting to be predicted from disk) held in memory; the rest are only in
    #: the journal and are read back in batches. Before this bound a run whose workers fell
    #: behind for days kept a record of every such stack (found by the soak: the daemon
    #: grew ~0.5 KB per stack after a resume, and `catch_up` scanned them all each step).
    LATE_KEPT = 256
    #: Predicted seqs remembered for dropping duplicates (as many as the sockets' memory
    #: of finished hand-overs, with room: older answers never reach `on_prediction`).
    PREDICTED_MEMORY = 4096
    #: Attempts at predicting one stack before it is recorded as not predictable.
    PREDICTION_ATTEMPTS = 2

    def __init__(self, *, run_id: str, out_dir: Path, sockets: DaemonSockets, journal: Journal,
                 store: RunStore, summary: RunSummary, trust: TrustLedger, events: RunEvents,
                 stream_channels: Sequence[str], where: Callable[[int, int], str],
                 report: Callable[[str], None], note: Callable[[str], None], next_seq: Callable[[], int],
                 resend_after_s: float, on_hung_worker: Callable[[list[str]], None] = lambda holders: None) -> None:
        self.run_id, self.out_dir = run_id, out_dir
        self.sockets, self.journal, self.store = sockets, journal, store
        self.summary, self.trust, self.events = summary, trust, events
        self.stream_channels = list(stream_channels)
        self.where, self.report, self.note, self.next_seq = where, report, note, next_seq
        self.resend_after_s = resend_after_s  # shortened while draining
        self.on_hung_worker = on_hung_worker
        # stacks not yet predicted; predicted ones leave, so the loop's scans stay short
        self.records: dict[int, StackRecord] = {}
        self.late_on_disk = 0  # late stacks not held in `records` (see `LATE_KEPT`)
        # seqs predicted lately, so a duplicate answer is dropped quietly; bounded: the
        # journal holds the full record, and an answer older than this memory is refused
        # by the sockets anyway (was_handed)
        self._predicted: OrderedDict[int, None] = OrderedDict()
        self._failures: dict[int, int] = {}  # failed prediction attempts of stacks in flight
        self.n_structures = 3  # until a prediction says otherwise

    # -- stacks in ----------------------------------------------------------------------
    def add(self, record: StackRecord, planes: np.ndarray) -> None:
        """A streamed stack was written: offer it to the workers (late if none has room)."""
        self.records[record.seq] = record
        self.mark_late(self.sockets.offer(record.header, planes))

    def resume(self) -> None:
        """Resuming: stacks acquired before the crash but never predicted are caught up
        (the oldest `LATE_KEPT` in memory, the rest read in as those are done)."""
        self.late_on_disk = self.journal.count_waiting(tuple(self.stream_channels))
        self._reload_late()

    def outstanding(self) -> int:
        """Streamed stacks without a prediction (in memory or waiting in the journal)."""
        return len(self.records) + self.late_on_disk

    def counts(self) -> dict[str, int]:
        """The status reply's share: stacks late and in flight."""
        states = [r.state for r in self.records.values()]
        return {"stacks_late": states.count(StackState.LATE) + self.late_on_disk,
                "stacks_in_flight": states.count(StackState.SENT)}

    # -- states -------------------------------------------------------------------------
    def mark_sent(self, handed: list[tuple[int, str]]) -> None:
        """The sockets handed these stacks to these workers."""
        now = time.time()
        for seq, worker in handed:
            rec = self.records.get(seq)
            if rec is not None:  # None: predicted meanwhile by the worker it went to first
                rec.move(StackState.SENT)
                rec.sent_at, rec.holder = now, worker

    def mark_late(self, seqs: list[int]) -> None:
        """These stacks wait to be predicted from disk; beyond `LATE_KEPT`, in the journal."""
        for seq in seqs:
            self.records[seq].move(StackState.LATE)
            log.info("workers behind: stack seq %d will be predicted from disk later", seq)
        late = sorted(seq for seq, r in self.records.items() if r.state == StackState.LATE)
        for seq in late[self.LATE_KEPT:]:  # the newest: caught up last, read back by then
            del self.records[seq]
            self._failures.pop(seq, None)
            self.late_on_disk += 1

    def _reload_late(self) -> None:
        """Read the oldest late stacks the journal holds back into memory (up to the bound)."""
        channels = tuple(self.stream_channels)
        while channels and self.late_on_disk:
            room = self.LATE_KEPT - sum(r.state == StackState.LATE for r in self.records.values())
            rows = self.journal.waiting(channels, room, skip=set(self.records)) if room > 0 else []
            skipped = 0
            for row in rows:
                raw = row.raw_in(self.out_dir)
                if not ref_exists(raw):  # cut short by a crash (its .partial removed): re-acquired
                    self._not_predictable(row.seq, "raw stack not on disk")
                    skipped += 1
                    continue
                rec = StackRecord(row.seq, row.t, row.p, raw, time.time())
                rec.state = StackState.LATE  # read back from the journal: it starts late
                self.records[row.seq] = rec
            self.late_on_disk = max(0, self.journal.count_waiting(channels) - len(self.records))
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
        self.mark_late(lost)

    def catch_up(self) -> None:
        """Re-send stacks a hung worker holds; when workers have nothing newer to do, feed
        them the oldest late stack from disk."""
        now = time.time()
        stale = [r for r in self.records.values()
                 if r.state == StackState.SENT and now - r.sent_at > self.resend_after_s]
        if stale:
            holders = sorted({r.holder for r in stale})
            self.report(f"no prediction for {len(stale)} stack(s) after "
                        f"{self.resend_after_s:.0f} s from {', '.join(holders)}: "
                        f"presumed hung, re-sending")
            for r in stale:
                self.sockets.taint(r.seq)  # the hung worker may still write into its segments
            self.mark_late([r.seq for r in stale])
            self.on_hung_worker(holders)
        if self.sockets.backlog or any(r.state == StackState.SENT for r in self.records.values()):
            return
        late = [r for r in self.records.values() if r.state == StackState.LATE]
        if not late and self.late_on_disk:
            self._reload_late()
            late = [r for r in self.records.values() if r.state == StackState.LATE]
        if late:
            self._send_from_disk(min(late, key=lambda r: r.seq))

    def _send_from_disk(self, rec: StackRecord) -> None:
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
            self._not_predictable(rec.seq, f"raw stack unreadable: {e}")
            return
        rec.move(StackState.QUEUED)
        rec.caught_up = True
        rec.header = header
        self.mark_late(self.sockets.offer(header, array))

    # -- answers ------------------------------------------------------------------------
    def on_prediction(self, header: wire.StackHeader, array: np.ndarray) -> None:
        """A worker's prediction: to the viewers, then the store and the journal."""
        received_at = time.time()
        # through shared memory: a view of a segment reused once this stack is released
        in_segment, header.shm = bool(header.shm), ""
        seq = header.source_seq if header.source_seq is not None else -1
        if header.run_id == self.run_id and seq in self._predicted:
            return  # a duplicate (a re-sent stack, or a second worker): the first stands
        record = self.records.get(seq)
        if header.run_id == self.run_id and record is None and 0 <= seq < self.next_seq():
            # late, and set aside to the journal meanwhile (`LATE_KEPT`): predicted again
            log.info("prediction of seq %d came after it was left to catch-up; dropped", seq)
            return
        if header.run_id != self.run_id or record is None:
            self.sockets.counts.malformed_results += 1
            log.warning("dropped a prediction for an unknown stack (run %s seq %s)", header.run_id, seq)
            return
        late = record.caught_up or record.state == StackState.LATE  # re-read from disk, not live
        pred_path = Path(self.store.prediction_ref(record.t, record.p))
        info = _prediction_info(header, record, late, received_at)
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
                             f"stacks are intact; {write_fix(e)} and continue with --resume "
                             f"(it predicts what is missing).") from None
        self.n_structures = len(header.structures)
        record.move(StackState.PREDICTED)
        record.predicted_path = pred_path
        record.latency_s = time.time() - record.completed_at
        self._forget(record.seq)
        self._remember_predicted(record.seq)
        self.sockets.release(record.seq)
        trust = self.trust.add(record.t, record.p, header.model_extra or {})
        with stop_on_journal_error():
            self.journal.prediction_written(record.seq, pred_path, record.latency_s,
                                            trust.confidence, ",".join(trust.flags), header.model,
                                            info=info)
        self.summary.predicted += 1
        emit(self.events.prediction_written, WrittenPrediction(record.seq, record.t, record.p, pred_path,
                                                               list(header.structures), trust.confidence))
        if late:
            self.summary.predicted_late += 1
        else:
            self.summary.add_latency(record.latency_s)
        self.report(
            f"{self.where(record.t, record.p)} predicted "
            f"{','.join(header.structures)} in {header.inference_s:.2f} s, "
            f"latency {record.latency_s:.2f} s{' (caught up)' if late else ''} -> "
            f"{pred_path.relative_to(self.out_dir)}{trust.line()}"
        )

    def on_failure(self, failure: wire.FailureHeader) -> None:
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
        where = self.where(record.t, record.p)
        if attempts < self.PREDICTION_ATTEMPTS:
            self.report(f"{where} {failure.worker} could not predict it ({failure.error}); trying again")
            self.mark_late([seq])
            return
        self._forget(seq)
        self.summary.failed += 1
        self._not_predictable(seq, failure.error)
        self.note(f"prediction failed: seq {seq} t {record.t} p {record.p}: {failure.error}")
        self.report(f"{where} NOT PREDICTED after {attempts} attempts ({failure.error}); the raw "
                    f"stack is on disk: fix the cause and re-predict with `livestain predict-run`")

    def _forget(self, seq: int) -> None:
        del self.records[seq]
        self._failures.pop(seq, None)
        self.sockets.discard(seq)

    def _remember_predicted(self, seq: int) -> None:
        self._predicted[seq] = None
        while len(self._predicted) > self.PREDICTED_MEMORY:
            self._predicted.popitem(last=False)

    def _not_predictable(self, seq: int, reason: str) -> None:
        with stop_on_journal_error():
            self.journal.not_predictable(seq, reason)


def _prediction_info(header: wire.StackHeader, record: StackRecord, late: bool,
                     received_at: float) -> dict[str, Any]:
    """Provenance kept with a prediction: its stack, latency, catch-up, versions."""
    return header.model_dump(by_alias=True) | {
        "source_path": str(record.raw_path),
        "latency_s": round(time.time() - record.completed_at, 3),  # complete -> received
        "caught_up_from_disk": late,
        "stack_completed_at": record.completed_at,
        "prediction_received_at": received_at,
        "versions": {"livestain": __version__, "torch_worker": header.model_extra.get("torch", "")
                     if header.model_extra else ""},
    }

"""Nothing the daemon keeps in memory may grow with the stacks of a run of days.

Each test drives one structure through many more stacks than it may remember and
asserts its size stays under its stated bound (issue 16; the soak, bench/days.py,
measures the processes as a whole).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import useq

from livestain import wire
from livestain.acquisition.journal import Journal
from livestain.acquisition.plan_events import first_incomplete_t, pending_events
from livestain.acquisition.predictions import PredictionTracker
from livestain.acquisition.run_summary import RunSummary
from livestain.acquisition.stack_state import StackRecord
from livestain.acquisition.stacks import StackAssembler
from livestain.acquisition.handovers import HandOvers
from livestain.acquisition.streaming import DaemonSockets
from livestain.shm import ShmPool

N = 10_000


def test_run_summary_keeps_recent_latencies_and_an_exact_mean() -> None:
    summary = RunSummary("run", Path("."))
    for i in range(N):
        summary.add_latency(float(i % 10))
    assert len(summary.latencies_s) <= RunSummary.LATENCIES_KEPT
    assert summary.latency_count == N
    assert summary.mean_latency_s == 4.5  # over every stack, not only the kept ones


def _tracker(tmp_path: Path) -> PredictionTracker:
    """A daemon's prediction bookkeeping over its own journal, with no sockets or store
    (the structures under test touch neither)."""
    return PredictionTracker(run_id="run", out_dir=tmp_path, sockets=None, journal=Journal(tmp_path),  # type: ignore[arg-type]
                             store=None, summary=RunSummary("run", tmp_path), trust=None, events=None,  # type: ignore[arg-type]
                             stream_channels=["BF"], where=lambda t, p: "", report=lambda line: None,
                             note=lambda what: None, next_seq=lambda: 0, resend_after_s=300.0)


def test_daemon_remembers_a_bounded_number_of_predicted_stacks(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path)
    for seq in range(N):
        tracker._remember_predicted(seq)
    assert len(tracker._predicted) <= PredictionTracker.PREDICTED_MEMORY
    assert N - 1 in tracker._predicted and 0 not in tracker._predicted  # the recent ones


def test_sockets_forget_handed_stacks_and_old_workers(base_port: int) -> None:
    sockets = DaemonSockets(wire.endpoints(base_port=base_port), shm=True)
    handovers = sockets.handovers
    try:
        for seq in range(N):
            handovers.hand(seq, b"id", f"host:{seq % 3}")
            sockets.release(seq)
        assert not handovers.handed
        assert len(handovers._finished) <= HandOvers.FINISHED_MEMORY
        assert handovers.was_handed(N - 1, f"host:{(N - 1) % 3}")  # a late duplicate is still known
        for i in range(N):  # a worker restarted N times: a new identity and name each time
            handovers.asked(f"id{i}".encode(), f"host:{i}", 0)
            handovers.hand(N + i, f"id{i}".encode(), f"host:{i}")
        assert len(handovers.sent_to) <= HandOvers.WORKERS_REMEMBERED
        assert len(handovers.workers_seen) <= HandOvers.WORKERS_REMEMBERED
        assert f"host:{N - 1}" in sockets.worker_heartbeats()
    finally:
        sockets.close()


def test_assembler_holds_at_most_the_stack_being_filled() -> None:
    assembler = StackAssembler(n_z=2)
    image = np.zeros((4, 4), np.uint16)
    finished = 0
    for i in range(N):
        for z in range(2):
            event = useq.MDAEvent(index={"t": i // 96, "p": i % 96, "z": z})
            finished += len(assembler.add(event, image))
        assert assembler.n_open <= 1
    assert finished == N


def test_shm_pool_reuses_its_segments() -> None:
    pool = ShmPool(max_segments=4)
    try:
        stack = np.ones((4, 32, 32), np.uint16)
        for seq in range(2000):
            assert pool.lend(seq, stack) is not None
            assert pool.reserve(seq, 3 * stack.size * 4) is not None
            pool.give_back(seq, reuse=seq % 7 != 0)  # some given up as hung: destroyed
        assert pool.lent == 0 and not pool._tainted and not pool._roles
        assert len(pool._free) <= pool.max_segments
    finally:
        pool.close()


def test_resume_makes_pending_events_on_demand() -> None:
    """A resumed run's remaining plan is not a list: a three-day plan has millions of
    events (~2.7 KB each), which took gigabytes at ``--resume``."""
    import sys
    import tracemalloc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _small_run import days_sequence

    sequence = days_sequence(96 * 20, interval_s=5.0)  # 7,680 events
    done = {(0, p, "Brightfield") for p in range(96)}
    tracemalloc.start()
    try:
        events = pending_events(sequence, done)
        n = sum(1 for _ in events)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 96 * 19 * 4
    assert not isinstance(events, list) and iter(events) is not events  # the engine's iterable path
    assert peak < 3e6, f"{peak / 1e6:.1f} MB held while iterating the remaining plan"
    first = next(iter(events))
    assert first.index["t"] == 1 and first.min_start_time == 0.0  # its clock shifted to now
    assert first_incomplete_t(sequence, done) == 1


def _late_daemon(tmp_path: Path, n: int) -> PredictionTracker:
    """A daemon's late-stack bookkeeping over a journal of ``n`` unpredicted stacks."""
    daemon = _tracker(tmp_path)
    (tmp_path / "p000").mkdir()
    for seq in range(n):
        raw = tmp_path / "p000" / f"t{seq:05d}.ome.tif"
        raw.touch()
        daemon.journal.stack_written(seq, seq, 0, "BF", raw, 0)
        daemon.journal.stack_written(n + seq, seq, 0, "DNA", raw, 0)  # not streamed: never late
        daemon.records[seq] = StackRecord(seq, seq, 0, raw, 0.0)
    return daemon


def test_late_stacks_wait_in_the_journal_not_in_memory(tmp_path: Path) -> None:
    n = 2_000
    daemon = _late_daemon(tmp_path, n)
    daemon.mark_late(list(range(n)))  # the workers fell far behind
    assert len(daemon.records) == PredictionTracker.LATE_KEPT
    assert sorted(daemon.records) == list(range(PredictionTracker.LATE_KEPT))  # the oldest stay
    assert daemon.outstanding() == n  # none forgotten
    caught_up = []
    while daemon.outstanding():
        late = sorted(daemon.records)
        assert late, "stacks left on disk but none read back"
        for seq in late:  # what `catch_up` does with each, one by one
            daemon.journal.prediction_written(seq, tmp_path / "pred", 0.1)
            del daemon.records[seq]
            caught_up.append(seq)
        daemon._reload_late()
        assert len(daemon.records) <= PredictionTracker.LATE_KEPT
    assert caught_up == list(range(n))  # each once, oldest first


def test_a_resume_reads_back_only_a_bounded_batch_and_skips_the_unpredictable(tmp_path: Path) -> None:
    n = 1_000
    _late_daemon(tmp_path, n).journal.not_predictable(0, "worker: stack too small")
    (tmp_path / "p000" / "t00001.ome.tif").unlink()  # cut short by the crash
    resumed = _tracker(tmp_path)
    resumed.resume()
    assert len(resumed.records) == PredictionTracker.LATE_KEPT
    assert min(resumed.records) == 2  # 0: not predictable; 1: its raw file is gone
    assert resumed.outstanding() == n - 2
    assert resumed.journal.count_waiting(("BF",)) == n - 2


def test_a_stacks_record_of_the_light_ledger_does_not_grow_with_the_positions() -> None:
    """Each stack's journal row keeps the camera's light ledger; the ledger has an entry
    per position, so at 96 positions it took 12 KB per stack (the soak: 69 MB of journal
    at 5,000 stacks). The record keeps the run's totals per channel instead."""
    import json

    from livestain.acquisition.light_dose import run_totals

    def ledger(n_positions: int) -> dict:
        return {"unit": "ms", "positions": {
            f"0,{i}": {"channels": {"Brightfield": {"dose": 0.0, "exposures": 4 * (i + 1)},
                                    "Dna": {"dose": 10.0, "exposures": 4}},
                       "fluorescence_dose": 10.0, "harmed_at_s": 5.0 if i == 0 else None}
            for i in range(n_positions)}}

    few, many = run_totals(ledger(2)), run_totals(ledger(96))
    assert many.keys() == few.keys() and many["channels"].keys() == few["channels"].keys()
    assert len(json.dumps(many)) < 400 < len(json.dumps(ledger(96))) / 30  # bounded by channels, not positions
    assert many["channels"]["Dna"] == {"dose": 960.0, "exposures": 384}
    assert many["channels"]["Brightfield"]["exposures"] == 4 * 96 * 97 // 2
    assert many["fluorescence_dose"] == 960.0 and many["positions_harmed"] == 1


def test_the_journals_per_stack_queries_do_not_read_the_headers(tmp_path: Path) -> None:
    """Headers (a few KB per stack) live in their own table: the stacks table's rows stay
    small, so `rows`, `waiting` and `count_waiting` read a few pages however much each
    stack's header holds (at 15,000 stacks with headers inline, `rows` took 2.8 s)."""
    journal = Journal(tmp_path)
    big = {"pad": "x" * 8000}  # far beyond a page: inline, every stack row would overflow
    for seq in range(500):
        journal.stack_written(seq, seq, 0, "BF", tmp_path / "p000" / f"t{seq:05d}.ome.tif", 0, info=big)
        if seq % 2:
            journal.prediction_written(seq, tmp_path / "pred", 0.1, info=big)
    stacks_pages = journal.db.execute("SELECT COUNT(*) FROM dbstat WHERE name = 'stacks'").fetchone()[0] \
        if _has_dbstat(journal) else None
    assert journal.info(3) == big and journal.info(3, prediction=True) == big and journal.info(2, prediction=True) is None
    assert len(journal.rows()) == 500 and journal.count_waiting(("BF",)) == 250
    if stacks_pages is not None:
        assert stacks_pages < 50, stacks_pages  # 500 small rows: ~20 pages; with the headers inline: >1,000
    journal.close()


def _has_dbstat(journal: Journal) -> bool:
    try:
        journal.db.execute("SELECT 1 FROM dbstat LIMIT 1").fetchall()
        return True
    except Exception:
        return False

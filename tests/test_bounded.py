"""Nothing the daemon keeps in memory may grow with the stacks of a run of days.

Each test drives one structure through many more stacks than it may remember and
asserts its size stays under its stated bound (issue 16; the soak, bench/days.py,
measures the processes as a whole).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import useq

from livestain import wire
from livestain.acquisition.daemon import Daemon, RunSummary
from livestain.acquisition.stacks import StackAssembler
from livestain.acquisition.streaming import DaemonSockets, _touch
from livestain.shm import ShmPool

N = 10_000


def test_run_summary_keeps_recent_latencies_and_an_exact_mean() -> None:
    summary = RunSummary("run", Path("."))
    for i in range(N):
        summary.add_latency(float(i % 10))
    assert len(summary.latencies_s) <= RunSummary.LATENCIES_KEPT
    assert summary.latency_count == N
    assert summary.mean_latency_s == 4.5  # over every stack, not only the kept ones


def test_daemon_remembers_a_bounded_number_of_predicted_stacks() -> None:
    daemon = Daemon.__new__(Daemon)  # only the structure under test
    daemon._predicted = OrderedDict()
    for seq in range(N):
        daemon._remember_predicted(seq)
    assert len(daemon._predicted) <= Daemon.PREDICTED_MEMORY
    assert N - 1 in daemon._predicted and 0 not in daemon._predicted  # the recent ones


def test_sockets_forget_handed_stacks_and_old_workers(base_port: int) -> None:
    sockets = DaemonSockets(wire.endpoints(base_port=base_port), shm=True)
    try:
        for seq in range(N):
            sockets.handed.setdefault(seq, set()).add(f"host:{seq % 3}")
            sockets.release(seq)
        assert not sockets.handed
        assert len(sockets._finished) <= DaemonSockets.FINISHED_MEMORY
        for i in range(N):  # a worker restarted N times: a new identity and name each time
            _touch(sockets.sent_to, f"id{i}".encode(), 1, sockets.WORKERS_REMEMBERED)
            _touch(sockets.workers_seen, f"host:{i}", float(i), sockets.WORKERS_REMEMBERED)
        assert len(sockets.sent_to) <= DaemonSockets.WORKERS_REMEMBERED
        assert len(sockets.workers_seen) <= DaemonSockets.WORKERS_REMEMBERED
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
    daemon = Daemon.__new__(Daemon)
    daemon.sequence = sequence
    daemon._done = {(0, p, "Brightfield") for p in range(96)}
    tracemalloc.start()
    try:
        events = daemon._events()
        n = sum(1 for _ in events)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 96 * 19 * 4
    assert not isinstance(events, list) and iter(events) is not events  # the engine's iterable path
    assert peak < 3e6, f"{peak / 1e6:.1f} MB held while iterating the remaining plan"
    first = next(iter(events))
    assert first.index["t"] == 1 and first.min_start_time == 0.0  # its clock shifted to now
    assert daemon._first_incomplete_t() == 1


def _late_daemon(tmp_path: Path, n: int) -> Daemon:
    """A daemon's late-stack bookkeeping over a journal of ``n`` unpredicted stacks."""
    from livestain.acquisition.daemon import StackRecord
    from livestain.acquisition.journal import Journal

    daemon = Daemon.__new__(Daemon)  # only the structures under test
    daemon.out_dir, daemon.stream_channels = tmp_path, ["BF"]
    daemon.journal = Journal(tmp_path)
    daemon.records, daemon._failures, daemon._late_on_disk = {}, {}, 0
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
    daemon._mark_late(list(range(n)))  # the workers fell far behind
    assert len(daemon.records) == Daemon.LATE_KEPT
    assert sorted(daemon.records) == list(range(Daemon.LATE_KEPT))  # the oldest stay
    assert daemon._outstanding() == n  # none forgotten
    caught_up = []
    while daemon._outstanding():
        late = sorted(daemon.records)
        assert late, "stacks left on disk but none read back"
        for seq in late:  # what `_catch_up` does with each, one by one
            daemon.journal.prediction_written(seq, tmp_path / "pred", 0.1)
            del daemon.records[seq]
            caught_up.append(seq)
        daemon._reload_late()
        assert len(daemon.records) <= Daemon.LATE_KEPT
    assert caught_up == list(range(n))  # each once, oldest first


def test_a_resume_reads_back_only_a_bounded_batch_and_skips_the_unpredictable(tmp_path: Path) -> None:
    n = 1_000
    _late_daemon(tmp_path, n).journal.not_predictable(0, "worker: stack too small")
    (tmp_path / "p000" / "t00001.ome.tif").unlink()  # cut short by the crash
    from livestain.acquisition.journal import Journal

    resumed = Daemon.__new__(Daemon)
    resumed.out_dir, resumed.stream_channels = tmp_path, ["BF"]
    resumed.journal = Journal(tmp_path)
    resumed.records, resumed._failures, resumed._late_on_disk = {}, {}, 0
    resumed._load_previous_records()
    assert len(resumed.records) == Daemon.LATE_KEPT
    assert min(resumed.records) == 2  # 0: not predictable; 1: its raw file is gone
    assert resumed._outstanding() == n - 2
    assert resumed.journal.count_waiting(("BF",)) == n - 2

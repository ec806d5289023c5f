"""Where does the daemon's memory go, per stack? tracemalloc snapshot diffs, in-process.

Runs the daemon in this process (the worker as a supervised process, as in a real
run) on the soak's small stacks, snapshots Python allocations after a warm-up and at
the end, and prints the allocation sites that grew most, with bytes per stack::

    .venv/bin/python bench/growth.py --stacks 5000 [--warmup 1000] [--top 15]

A site whose growth scales with the stacks acquired is a leak over a run of days.
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import tracemalloc
from pathlib import Path

from _harness import simulated_run
from _small_run import days_sequence, small_scope

from livestain.acquisition.policies import Policies


def measure(stacks: int, warmup: int, top: int, port: int, yx: int = 32) -> list[str]:
    """Lines: the ``top`` sites that grew between ``warmup`` and ``stacks`` stacks."""
    daemon, supervisor = simulated_run(
        "growth", days_sequence(stacks, yx=yx), port,
        Policies(drain_timeout_s=30.0, min_free_gb=0.5), scope=small_scope(yx))
    tracemalloc.start(8)
    snaps: dict[str, tracemalloc.Snapshot] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            n = daemon.summary.acquired
            if "warm" not in snaps and n >= warmup:
                gc.collect()
                snaps["warm"] = tracemalloc.take_snapshot()
                snaps["warm_n"] = n  # type: ignore[assignment]

    threading.Thread(target=watch, daemon=True).start()
    try:
        summary = daemon.run()
    finally:
        done.set()
        supervisor.stop()
    gc.collect()
    end = tracemalloc.take_snapshot()
    n0 = snaps.get("warm_n", 0)
    per = max(1, summary.acquired - n0)  # type: ignore[operator]
    lines = [f"{summary.acquired} stacks, {summary.predicted} predicted; growth after stack {n0}:"]
    base = snaps.get("warm", end)
    for stat in end.compare_to(base, "traceback")[:top]:  # type: ignore[arg-type]
        frame = next((f for f in stat.traceback if "livestain" in f.filename or "/work/main" in f.filename),
                     stat.traceback[0])
        lines.append(f"{stat.size_diff / per:8.1f} B/stack {stat.count_diff:+7d} blocks  "
                     f"{Path(frame.filename).name}:{frame.lineno}  <- {stat.traceback[0].filename.rsplit('/', 1)[-1]}:{stat.traceback[0].lineno}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--port", type=int, default=5760)
    args = ap.parse_args()
    for line in measure(args.stacks, args.warmup, args.top, args.port):
        print(line, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()

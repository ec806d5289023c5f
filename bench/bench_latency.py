"""End to end, per stack: last plane acquired -> prediction written, stage by stage.

Runs the daemon on the simulated scope with its supervised worker (the live fast path)
and reads the stages back from what the run wrote (the prediction files' headers and
the journal), so the figures are those of the real path, not of a model of it:

    write raw   last plane acquired -> raw stack on disk
    queue       on disk -> handed to a worker
    transport   handed over -> received by the worker
    inference   the worker's prediction (normalisation and resampling included)
    return      prediction sent -> received by the daemon
    write pred  received -> prediction on disk (journal)

    .venv/bin/python bench/bench_latency.py [--timepoints 12] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
from pathlib import Path

from _harness import simulated_run

from livestain.acquisition.policies import Policies
from livestain.launch import demo_sequence
from livestain.stackio import read_stack

STAGES = ("write raw", "queue", "transport", "inference", "return", "write pred", "total")


def stages_of(info: dict, predicted_at: float) -> dict[str, float]:
    return {
        "write raw": info["stack_completed_at"] - info["acquired_end"],
        "queue": info["stack_sent_at"] - info["stack_completed_at"],
        "transport": info["received_at"] - info["stack_sent_at"],
        "inference": info["inference_s"],
        "return": info["prediction_received_at"] - info["sent_at"],
        "write pred": predicted_at - info["prediction_received_at"],
        "total": predicted_at - info["acquired_end"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timepoints", type=int, default=12)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=5720)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    daemon, supervisor = simulated_run(
        "latency", demo_sequence(args.timepoints, args.interval), args.port, Policies(drain_timeout_s=60)
    )
    out = daemon.out_dir
    try:
        summary = daemon.run()
    finally:
        supervisor.stop()
    db = sqlite3.connect(out / "journal.sqlite")
    predicted_at = dict(db.execute("SELECT seq, predicted_at FROM stacks WHERE predicted_at IS NOT NULL"))
    rows = []
    for path in sorted(out.glob("p*/t*_prediction.ome.tif")):
        _, info = read_stack(path)
        if info.get("caught_up_from_disk") or info["source_seq"] not in predicted_at:
            continue
        rows.append(stages_of(info, predicted_at[info["source_seq"]]))
    rows = rows[1:]  # the first stack also waits for the worker to start
    medians = {s: statistics.median(r[s] for r in rows) for s in STAGES}
    print(f"{summary.acquired} stacks 16x256x256, {len(rows)} predicted live after the first; "
          f"median seconds per stage:")
    for s in STAGES:
        print(f"  {s:<11}{medians[s] * 1e3:8.1f} ms")
    print(f"  overhead beyond inference: {(medians['total'] - medians['inference']) * 1e3:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"medians_s": medians, "per_stack": rows}, indent=2))


if __name__ == "__main__":
    main()

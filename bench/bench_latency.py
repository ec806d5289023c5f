"""End to end, per stack: last plane acquired -> prediction written and drawn, stage by stage.

Runs the daemon on the simulated scope with its supervised worker (the live fast path)
and, in another process, the real live viewer offscreen (``bench/_viewer_probe.py``:
`LiveWindow` subscribed to the daemon's display socket, noting when each live prediction
is first drawn). The stages are read back from what the run wrote (the prediction
files' headers, the journal, the viewer's notes), so the figures are those of the real
path, not of a model of it:

    write raw    last plane acquired -> raw stack on disk
    queue        on disk -> handed to a worker
    transport    handed over -> received by the worker
    preprocess   the worker's normalisation (and resampling) of the stack
    network      the network itself
    postprocess  resampling back, to a float32 numpy array
    inference    the worker's whole prediction (the three above plus a little)
    return       prediction sent -> received by the daemon
    write pred   received -> prediction on disk (journal)
    written      last plane acquired -> prediction on disk
    display      received by the daemon -> drawn by the viewer (the daemon publishes
                 before writing; the viewer wakes as messages arrive, draws at most at 10 Hz)
    drawn        last plane acquired -> prediction drawn

"Overhead beyond inference" is the median over stacks of (written - inference) and of
(drawn - inference). Stacks acquired before the worker's first prediction came back
(its start-up) and stacks predicted from disk rather than live are left out.

    .venv/bin/python bench/bench_latency.py [--timepoints 12] [--interval 1.0] [--no-viewer]

`measure` returns the figures as plain dicts (``bench/run_all.py`` calls it too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import simulated_run

from livestain import wire
from livestain.acquisition.policies import Policies
from livestain.launch import demo_sequence
from livestain.run_reader import RunReader

STAGES = ("write raw", "queue", "transport", "preprocess", "network", "postprocess", "inference",
          "return", "write pred", "written", "display", "drawn")
PROBE = Path(__file__).with_name("_viewer_probe.py")
#: How long the viewer may take to start (imports Qt, pyqtgraph; slow on a busy machine).
VIEWER_START_S = 60.0


def stages_of(info: dict, predicted_at: float, seen: dict | None) -> dict[str, float | None]:
    """One stack's stages (seconds) from its prediction file's ``info``, the journal's
    ``predicted_at`` and the viewer's note ``seen`` (None: not drawn)."""
    return {
        "write raw": info["stack_completed_at"] - info["acquired_end"],
        "queue": info["stack_sent_at"] - info["stack_completed_at"],
        "transport": info["received_at"] - info["stack_sent_at"],
        "preprocess": info.get("preprocess_s"),
        "network": info.get("network_s"),
        "postprocess": info.get("postprocess_s"),
        "inference": info["inference_s"],
        "return": info["prediction_received_at"] - info["sent_at"],
        "write pred": predicted_at - info["prediction_received_at"],
        "written": predicted_at - info["acquired_end"],
        "display": seen["drawn_at"] - info["prediction_received_at"] if seen else None,
        "drawn": seen["drawn_at"] - info["acquired_end"] if seen else None,
    }


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def start_viewer(display_endpoint: str, folder: Path) -> tuple[subprocess.Popen, Path]:
    """The offscreen viewer process and the JSON-lines file it writes; waits until it is up."""
    notes, ready, log = folder / "drawn.jsonl", folder / "viewer.ready", folder / "viewer.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, str(PROBE), display_endpoint, str(notes),
                                 "--ready", str(ready)], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + VIEWER_START_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the offscreen viewer did not start; its output:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, notes


def stop_viewer(proc: subprocess.Popen, notes: Path, expect: int, wait_s: float = 3.0) -> list[dict]:
    """Give the viewer ``wait_s`` to draw ``expect`` predictions, stop it, read its notes."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _count_lines(notes) < expect:
        time.sleep(0.1)
    time.sleep(0.3)  # a last redraw under way
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not notes.exists():
        return []
    return [json.loads(line) for line in notes.read_text().splitlines() if line.strip()]


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for _ in path.open())
    except OSError:
        return 0


def measure(timepoints: int = 12, interval: float = 1.0, port: int = 5720, viewer: bool = True,
            keep_data: bool = True) -> dict:
    """Run the loop for ``timepoints`` stacks ``interval`` s apart; per-stack stages.

    Returns ``{"stacks_acquired", "per_stack": [{"seq", "t", stage: seconds or None}],
    "medians_s", "overhead_beyond_inference_s": {"written", "drawn"}, "excluded",
    "viewer", "data"}`` (``data``: the run's folder, deleted unless ``keep_data``).
    """
    daemon, supervisor = simulated_run(
        "latency", demo_sequence(timepoints, interval), port, Policies(drain_timeout_s=60)
    )
    out = daemon.out_dir
    proc = notes = None
    seen_rows: list[dict] = []
    try:
        if viewer:
            proc, notes = start_viewer(wire.endpoints(base_port=port)["display"], out.parent)
        summary = daemon.run()
    finally:
        supervisor.stop()
        if proc is not None:
            seen_rows = stop_viewer(proc, notes, expect=daemon.summary.predicted)
    seen = {r["source_seq"]: r for r in seen_rows if r["run_id"] == daemon.run_id}
    db = sqlite3.connect(out / "journal.sqlite")
    predicted_at = dict(db.execute("SELECT seq, predicted_at FROM stacks WHERE predicted_at IS NOT NULL"))
    db.close()
    # the predictions' headers, wherever the run's store keeps them (OME-Zarr since the
    # store redesign: globbing for per-stack TIFFs found none, and every figure read "-")
    with RunReader(out) as reader:
        infos = [e.prediction_info for e in reader.stacks() if e.prediction_ref is not None]
    live = [i for i in infos if not i.get("caught_up_from_disk") and i["source_seq"] in predicted_at]
    # the worker's start-up: everything acquired before its first prediction came back
    first_back = min((i["prediction_received_at"] for i in live), default=0.0)
    rows, excluded = [], len(infos) - len(live)
    for info in sorted(live, key=lambda i: i["source_seq"]):
        if info["acquired_end"] <= first_back:
            excluded += 1
            continue
        seq = info["source_seq"]
        rows.append({"seq": seq, "t": info["t"], "p": info["p"],
                     **stages_of(info, predicted_at[seq], seen.get(seq))})
    medians = {s: _median([r[s] for r in rows]) for s in STAGES}
    overhead = {
        "written": _median([r["written"] - r["inference"] for r in rows]),
        "drawn": _median([r["drawn"] - r["inference"] for r in rows if r["drawn"] is not None]),
    }
    result = {
        "stack_shape": [16, 256, 256],
        "timepoints": timepoints,
        "interval_s": interval,
        "stacks_acquired": summary.acquired,
        "stacks_predicted": summary.predicted,
        "excluded": excluded,
        "viewer": viewer,
        "predictions_drawn": len(seen),
        "draw_s_median": _median([r.get("draw_s") for r in seen.values()]),
        "medians_s": medians,
        "overhead_beyond_inference_s": overhead,
        "per_stack": rows,
        "data": str(out),
    }
    if not keep_data:
        shutil.rmtree(out.parent, ignore_errors=True)
        result["data"] = None
    return result


def _ms(v: float | None, width: int) -> str:
    return f"{'—':>{width}}" if v is None else f"{v * 1e3:>{width}.1f}"


def print_table(result: dict) -> None:
    """Per-stack stages in ms, the medians, and the overhead beyond inference."""
    rows = result["per_stack"]
    drawn = (f"{result['predictions_drawn']} drawn by the offscreen viewer" if result["viewer"]
             else "no viewer")
    print(f"{result['stacks_acquired']} stacks {'x'.join(map(str, result['stack_shape']))}, "
          f"{result['interval_s']:g} s apart; {len(rows)} predicted live after the worker's start-up "
          f"({result['excluded']} left out); {drawn}")
    heads = {"write raw": "raw", "queue": "queue", "transport": "transp", "preprocess": "pre",
             "network": "network", "postprocess": "post", "inference": "=infer", "return": "return",
             "write pred": "wr pred", "written": "=WRITTEN", "display": "display", "drawn": "=DRAWN"}
    w = 9
    print("milliseconds per stage (=infer: the worker's whole prediction; display: daemon received "
          "-> drawn)")
    print(f"{'seq':>5}" + "".join(f"{heads[s]:>{w}}" for s in STAGES))
    for r in rows:
        print(f"{r['seq']:>5}" + "".join(_ms(r[s], w) for s in STAGES))
    print(f"{'med':>5}" + "".join(_ms(result["medians_s"][s], w) for s in STAGES))
    ov = result["overhead_beyond_inference_s"]
    print(f"overhead beyond inference (median over stacks): written {_ms(ov['written'], 0).strip()} ms, "
          f"drawn {_ms(ov['drawn'], 0).strip()} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timepoints", type=int, default=12)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=5720)
    ap.add_argument("--no-viewer", action="store_true", help="leave out the drawn stage")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = measure(args.timepoints, args.interval, args.port, viewer=not args.no_viewer)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

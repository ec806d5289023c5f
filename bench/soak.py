"""Soak: the simulated scope at full speed for a set time, with a real worker process.

Reports stacks per second acquired and predicted, how many could not be predicted live,
and the resident memory of the daemon and the worker over time: a run that lasts days
must not grow. Usage::

    .venv/bin/python bench/soak.py --seconds 120 [--json soak.json]

`measure` returns the figures as a plain dict (``bench/run_all.py`` calls it too).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from _harness import simulated_run

from livestain.acquisition.policies import Policies
from livestain.launch import demo_sequence


def rss_mb(pid: int | None) -> float:
    """Resident set size of a process in MB (Linux /proc), NaN when unavailable."""
    if pid is None:
        return float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rate(samples: list[dict], key: str) -> float | None:
    """Growth of ``key`` per second between the first and the last sample."""
    if len(samples) < 2 or samples[-1]["t_s"] <= samples[0]["t_s"]:
        return None
    return round((samples[-1][key] - samples[0][key]) / (samples[-1]["t_s"] - samples[0]["t_s"]), 2)


def measure(seconds: float = 60.0, sample_every: float = 5.0, port: int = 5700,
            verbose: bool = True) -> dict:
    """Run the loop at full speed for ``seconds``; throughput, latency and memory figures.

    ``data`` in the result is the run's folder (its parent is a fresh temporary folder).
    """
    daemon, supervisor = simulated_run(
        "soak", demo_sequence(timepoints=1_000_000, interval_s=0.0), port,
        Policies(drain_timeout_s=5.0, min_free_gb=0.5),
    )
    out = daemon.out_dir
    samples: list[dict] = []
    t0 = time.monotonic()

    def sample() -> None:
        while not stopped.wait(sample_every):
            st = daemon.summary
            samples.append({
                "t_s": round(time.monotonic() - t0, 1),
                "acquired": st.acquired,
                "predicted": st.predicted,
                "daemon_rss_mb": round(rss_mb(os.getpid()), 1),
                "worker_rss_mb": round(rss_mb(supervisor.pid), 1),
            })
            s = samples[-1]
            if verbose:
                print(f"{s['t_s']:7.1f} s  acquired {s['acquired']:5d}  predicted {s['predicted']:5d}  "
                      f"daemon {s['daemon_rss_mb']:7.1f} MB  worker {s['worker_rss_mb']:7.1f} MB",
                      flush=True)
            if time.monotonic() - t0 >= seconds:
                daemon.request_stop()
                return

    stopped = threading.Event()
    threading.Thread(target=sample, daemon=True).start()
    try:
        summary = daemon.run()
    finally:
        stopped.set()
        supervisor.stop()
    wall = time.monotonic() - t0
    half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] / 2] if samples else []
    growth = (half[-1]["daemon_rss_mb"] - half[0]["daemon_rss_mb"]) if len(half) > 1 else 0.0
    return {
        "seconds": round(wall, 1),
        "stack_shape": [16, 256, 256],
        "stacks_acquired": summary.acquired,
        "stacks_per_s": round(summary.acquired / wall, 2),
        "stacks_predicted": summary.predicted,
        "predicted_late": summary.predicted_late,
        "not_predicted": summary.not_predicted,
        "predicted_live_per_s": round((summary.predicted - summary.predicted_late) / wall, 2),
        # between the first and the last sample: without the worker's start and the drain
        "steady_stacks_per_s": _rate(samples, "acquired"),
        "steady_predicted_per_s": _rate(samples, "predicted"),
        "mean_latency_s": round(summary.mean_latency_s, 3),
        "daemon_rss_growth_second_half_mb": round(growth, 1),
        "samples": samples,
        "data": str(out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--port", type=int, default=5700)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = measure(args.seconds, args.sample_every, args.port)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

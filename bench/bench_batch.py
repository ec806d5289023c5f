"""Batch prediction throughput: Dask workers vs the live worker's path, same machine and stacks.

A simulated run of ``--stacks`` brightfield stacks (default 24 of 16x256x256 uint16, the
demo's stack size) is predicted completely, stack by stack (read, predict, write), by:

* ``live``: `Predictor(fast=True)` in this process, as ``inference/worker.py`` uses it,
  reading each stack and writing each prediction as the daemon would: the path to beat;
  with 1 thread and with every core;
* ``dask``: ``livestain predict-run``'s engine (`inference.batch.execute`) on a local
  cluster from `inference.cluster.start_local`: 1 worker x 1 thread, 1 worker x all
  cores, and one single-threaded worker per core (2 on 2 cores).

The Dask workers run with `inference.batch.tune_malloc` (the nanny's malloc setting
made their network ~30% slower than the same network in a plain process); the live path
runs as the live worker does today, without it.

Every path starts from a freshly loaded model and includes its first (slower) stack;
model loading itself is excluded (the live worker loads once per run; a Dask worker
once per call, reported as setup). Figures: stacks/s over the whole set and seconds
per stack; scaling efficiency = stacks/s of N single-threaded workers / (N x stacks/s of
one single-threaded worker), 1.0 being perfect.

    .venv/bin/python bench/bench_batch.py [--stacks 24] [--shape 16,256,256] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VOXEL = (1.0, 0.325, 0.325)


def make_run(out: Path, n_stacks: int, shape: tuple[int, int, int], n_p: int = 2) -> Path:
    """A run in the daemon's layout: ``n_stacks`` stacks over ``n_p`` positions."""
    from livestain.stackio import write_stack

    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"run_id": "bench", "policies": {"stream_channels": ["Brightfield"]}}))
    rng = np.random.default_rng(0)
    zz, yy, xx = np.indices(shape)
    for i in range(n_stacks):
        t, p = divmod(i, n_p)
        cells = np.sin(xx / 5.0 + p) * np.cos(yy / 7.0 + t) * np.exp(-((zz - shape[0] / 2) ** 2) / 8)
        stack = (1000 + 200 * cells + rng.normal(0, 20, shape)).astype(np.uint16)
        write_stack(out / f"p{p:03d}" / f"t{t:04d}_brightfield.ome.tif", stack, voxel_size_um=VOXEL,
                    info={"kind": "stack", "seq": i, "t": t, "p": p, "voxel_size_um": list(VOXEL)})
    return out


def live_path(run: Path, threads: int) -> dict[str, Any]:
    """The live worker's predictor, one stack after another, read and written as the daemon does."""
    import torch

    from livestain.inference.predict import Predictor
    from livestain.inference.runsets import run_stacks
    from livestain.stackio import read_stack, write_stack

    torch.set_num_threads(threads)
    predictor = Predictor(None, "cpu", fast=True)
    out = run / "live-bench"
    refs = run_stacks(run, "brightfield")
    predict_s = 0.0
    t0 = time.perf_counter()
    for ref in refs:
        stack, info = read_stack(ref.path)
        t1 = time.perf_counter()
        pred = predictor.predict(stack, info["voxel_size_um"])
        predict_s += time.perf_counter() - t1
        write_stack(out / ref.key.replace("/", "_"), pred, voxel_size_um=VOXEL, info={"t": ref.t},
                    channel_names=list(predictor.structures))
    wall = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"path": f"live, 1 process x {threads} thread(s)", "workers": 1, "threads": threads,
            "stacks": len(refs), "wall_s": wall, "stacks_per_s": len(refs) / wall,
            "s_per_stack": wall / len(refs), "predict_only_stacks_per_s": len(refs) / predict_s}


def dask_path(run: Path, workers: int, threads: int) -> dict[str, Any]:
    """``predict-run``'s engine on a fresh local cluster; a new set each time."""
    from distributed import Client

    from livestain.inference.batch import execute, plan_prediction
    from livestain.inference.checkpoint import load_checkpoint
    from livestain.inference.cluster import quiet_dask_logs, start_local

    quiet_dask_logs()
    model = load_checkpoint(None)
    name = f"bench-{workers}x{threads}"
    plan = plan_prediction([run], model, set_name=name)
    t_start = time.perf_counter()
    cluster, info = start_local(workers, "cpu", None)
    try:
        with Client(cluster) as client:
            t_up = time.perf_counter()
            report = execute(client, plan, torch_threads=threads)
    finally:
        cluster.close()
    shutil.rmtree(run / "predictions" / name)
    assert report.written == plan.todo and report.failed == 0, report
    return {"path": f"dask, {workers} worker(s) x {threads} thread(s)", "workers": workers, "threads": threads,
            "stacks": report.written, "wall_s": report.wall_s, "stacks_per_s": report.stacks_per_s,
            "s_per_stack": report.wall_s / report.written, "worker_s_per_stack": report.s_per_stack,
            "cluster_start_s": t_up - t_start, "model_load_s": report.setup_s}


def measure(stacks: int = 24, shape: tuple[int, int, int] = (16, 256, 256), repeats: int = 2) -> dict[str, Any]:
    """Every path ``repeats`` times, interleaved (a busy neighbour slows all paths alike
    rather than one), keeping each path's best run."""
    from livestain.inference.cluster import cpu_count

    cores = cpu_count()
    paths: list[tuple[Any, int, int]] = [(live_path, 0, 1), (live_path, 0, cores), (dask_path, 1, 1),
                                         (dask_path, 1, cores)]
    if cores > 1:
        paths.append((dask_path, cores, 1))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    best: dict[int, dict[str, Any]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="livestain-bench-batch-"))
    try:
        run = make_run(tmp / "run", stacks, shape)
        for rep in range(repeats):
            for i, (fn, workers, threads) in enumerate(paths):
                row = fn(run, threads) if fn is live_path else fn(run, workers, threads)
                row["runs"] = best.get(i, {}).get("runs", []) + [round(row["stacks_per_s"], 3)]
                if i not in best or row["stacks_per_s"] > best[i]["stacks_per_s"]:
                    best[i] = row
                else:
                    best[i]["runs"] = row["runs"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [best[i] for i in range(len(paths))]
    one = next(r for r in rows if r["path"].startswith("dask, 1 worker") and r["threads"] == 1)
    many = rows[-1] if cores > 1 else one
    return {
        "machine": {"cpu": _cpu_name(), "cores": cores, "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    # other processes' load: on a shared 2-core machine it moves every figure
                    "load_1min_before_after": [load_before,
                                               os.getloadavg()[0] if hasattr(os, "getloadavg") else None]},
        "stack": list(shape), "stacks": stacks, "repeats": repeats, "rows": rows,
        "scaling_efficiency": many["stacks_per_s"] / (many["workers"] * one["stacks_per_s"]),
        "scaling_workers": many["workers"],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"{m['cpu']}, {m['cores']} cores (1-min load average before/after: "
          f"{'/'.join(f'{v:.1f}' for v in m['load_1min_before_after'] if v is not None)}); "
          f"{result['stacks']} stacks of {'x'.join(map(str, result['stack']))}")
    print(f"{'path':<36}{'stacks/s':>10}{'s/stack':>10}   notes (best of {result['repeats']}: all runs' stacks/s)")
    for r in result["rows"]:
        if "predict_only_stacks_per_s" in r:
            extra = f"predict only {r['predict_only_stacks_per_s']:.2f} stacks/s"
        else:
            extra = (f"start {r['cluster_start_s']:.1f} s + load {r['model_load_s']:.1f} s, "
                     f"{r['worker_s_per_stack']:.2f} s/stack/worker")
        print(f"{r['path']:<36}{r['stacks_per_s']:>10.2f}{r['s_per_stack']:>10.3f}   {extra}; {r['runs']}")
    print(f"scaling efficiency, {result['scaling_workers']} single-threaded workers vs 1: "
          f"{result['scaling_efficiency']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", type=int, default=24)
    ap.add_argument("--shape", default="16,256,256", help="Z,Y,X of each stack (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each path, best kept (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    result = measure(args.stacks, shape, args.repeats)  # type: ignore[arg-type]
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())

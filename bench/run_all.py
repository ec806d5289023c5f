"""All of the performance benchmarks in one run: one table per part, the targets, JSON.

Parts (each also runnable on its own, see its script):

* ``inference``  -- `bench_inference`: voxels/s and FLOP/s over the measured matmul peak,
  fnet-style reference vs the fast fp32 / bf16 paths, bundled and fnet-size networks
  (and the same on CUDA when there is a GPU, against the GPU's own matmul peak);
* ``transport``  -- `bench_transport`: one stack daemon -> worker process over ipc, tcp
  loopback and the same-host shared-memory path, vs memcpy of the same buffer;
* ``latency``    -- `bench_latency`: last plane acquired -> prediction written and drawn
  (by the real viewer, offscreen), stage by stage, per stack;
* ``throughput`` -- `soak`: the simulated scope at full speed with one worker.

Then the issue's targets, each with its measured value and pass/fail, and everything
(with a description of the machine) as JSON::

    .venv/bin/python bench/run_all.py [--quick] [--json results.json]
                                      [--only inference,transport,latency,throughput]

``--quick`` (about 1-3 minutes on 2 cores) uses a 16x128x128 stack and two repeats for
inference (one for the fnet-size network), 16 and 128 MiB for transport, 6 stacks for
latency and 20 s of throughput; the full run (about 10 minutes on 2 cores) 32x256x256,
16 and 512 MiB, 12 stacks and 60 s.
Without ``--json`` the JSON goes to a file in the temporary folder (its path is printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import bench_inference
import bench_latency
import bench_transport
import soak
from livestain.inference.fast import bf16_supported

PARTS = ("inference", "transport", "latency", "throughput")

SETTINGS = {
    "quick": {
        "inference": {"shape": [16, 128, 128], "repeats": 2, "fnet_repeats": 1},
        "transport": {"sizes_mib": [16, 128], "repeats": 3},
        "latency": {"timepoints": 6, "interval": 1.0},
        "throughput": {"seconds": 20.0, "sample_every": 2.0},
    },
    "full": {
        "inference": {"shape": [32, 256, 256], "repeats": 3, "fnet_repeats": 2},
        "transport": {"sizes_mib": [16, 512], "repeats": 5},
        "latency": {"timepoints": 12, "interval": 1.0},
        "throughput": {"seconds": 60.0, "sample_every": 5.0},
    },
}

#: The issue's targets.
SPEEDUP_MIN = 10.0  # fast path vs the reference, same network, this CPU
CPU_PEAK_FRACTION_MIN = 0.6  # of the measured bf16 matmul peak
SHM_FRACTION_MIN = 0.5  # of memcpy, at 512 MiB
TARGET_SIZE_MIB = 512
OVERHEAD_MAX_S = 0.050  # end to end <= inference + 50 ms
GPU_PEAK_FRACTION_MIN = 0.4  # of the GPU's bf16 matmul peak
GPU_BUNDLED_VOXELS_MIN = 419e6  # voxels/s, bundled model


# -- machine ---------------------------------------------------------------------------

def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu_bf16": bf16_supported("cpu"),
        "memory_gib": memory_gib,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": _git(),
    }


def _git() -> dict | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "uncommitted_changes": bool(dirty)}


# -- parts -----------------------------------------------------------------------------

def run_inference(s: dict, keep_data: bool) -> dict:
    result = bench_inference.measure(tuple(s["shape"]), s["repeats"], s["fnet_repeats"])
    bench_inference.print_table(result)
    return result


def run_transport(s: dict, keep_data: bool) -> dict:
    rows = bench_transport.measure(s["sizes_mib"], s["repeats"])
    bench_transport.print_table(rows)
    return {"rows": rows}


def run_latency(s: dict, keep_data: bool) -> dict:
    result = bench_latency.measure(s["timepoints"], s["interval"], keep_data=keep_data)
    bench_latency.print_table(result)
    return result


def run_throughput(s: dict, keep_data: bool) -> dict:
    result = soak.measure(s["seconds"], s["sample_every"], verbose=False)
    if not keep_data:
        shutil.rmtree(Path(result["data"]).parent, ignore_errors=True)
        result["data"] = None
    samples = result["samples"]
    rss = [x["daemon_rss_mb"] for x in samples if not math.isnan(x["daemon_rss_mb"])]
    wrss = [x["worker_rss_mb"] for x in samples if not math.isnan(x["worker_rss_mb"])]
    shape = "x".join(map(str, result["stack_shape"]))
    print(f"simulated scope at full speed, one worker, {result['seconds']:.0f} s, stacks {shape}")
    rows = [
        ("stacks acquired", f"{result['stacks_acquired']}"),
        ("  per second (whole run)", f"{result['stacks_per_s']:.2f}"),
        ("  per second (steady, between samples)", _fmt(result["steady_stacks_per_s"], "{:.2f}")),
        ("predicted live per second", f"{result['predicted_live_per_s']:.2f}"),
        ("  predicted per second (steady)", _fmt(result["steady_predicted_per_s"], "{:.2f}")),
        ("predicted late (caught up from disk)", f"{result['predicted_late']}"),
        ("not predicted", f"{result['not_predicted']}"),
        ("mean live latency (complete -> received)", _fmt(result["mean_latency_s"], "{:.3f} s")),
        ("daemon memory (MB, first -> last sample)*",
         f"{rss[0]:.0f} -> {rss[-1]:.0f}" if rss else "—"),
        ("daemon memory growth, second half (MB)", f"{result['daemon_rss_growth_second_half_mb']:+.1f}"),
        ("worker memory (MB, min - max)", f"{min(wrss):.0f} - {max(wrss):.0f}" if wrss else "—"),
    ]
    for name, value in rows:
        print(f"  {name:<44}{value:>14}")
    print("  * the daemon runs in this process: its memory includes what earlier parts left")
    return result


RUNNERS = {"inference": run_inference, "transport": run_transport, "latency": run_latency,
           "throughput": run_throughput}


# -- targets ---------------------------------------------------------------------------

def _target(name: str, measured: float | None, threshold: float, higher_is_better: bool,
            shown: str, note: str = "") -> dict:
    if measured is None:
        ok = None
    else:
        ok = measured >= threshold if higher_is_better else measured <= threshold
    return {"target": name, "measured": measured, "threshold": threshold, "shown": shown,
            "pass": ok, "note": note}


def _row(rows: list[dict], **match: object) -> dict | None:
    return next((r for r in rows if all(r.get(k, "cpu" if k == "device" else None) == v
                                        for k, v in match.items())), None)


def targets(results: dict) -> list[dict]:
    """The issue's targets, from whichever parts ran."""
    out: list[dict] = []
    inf = results.get("inference")
    if inf and "rows" in inf:
        rows = inf["rows"]
        for net in ("bundled", "fnet-size"):
            fast = _row(rows, network=net, device="cpu", path="bf16")
            if fast is not None:
                out.append(_target(f"CPU: fast bf16 vs reference, {net}", fast["speedup_vs_reference"],
                                   SPEEDUP_MIN, True, f"{fast['speedup_vs_reference']:.1f}x  (>= 10x)"))
        for net in ("bundled", "fnet-size"):
            fast = _row(rows, network=net, device="cpu", path="bf16")
            if fast is not None:
                out.append(_target(f"CPU: fast bf16 of bf16 matmul peak, {net}", fast["fraction_of_peak"],
                                   CPU_PEAK_FRACTION_MIN, True,
                                   f"{fast['fraction_of_peak']:.2f}  (>= {CPU_PEAK_FRACTION_MIN})"))
    tr = results.get("transport")
    if tr and "rows" in tr:
        shm = [r for r in tr["rows"] if r["path"] == "shared memory"]
        if shm:
            at = next((r for r in shm if r["size_mib"] == TARGET_SIZE_MIB), max(shm, key=lambda r: r["size_mib"]))
            note = "" if at["size_mib"] == TARGET_SIZE_MIB else \
                f"measured at {at['size_mib']} MiB; the target is at {TARGET_SIZE_MIB} MiB (full run)"
            out.append(_target(f"transport: shared memory vs memcpy at {at['size_mib']} MiB",
                               at["fraction_of_memcpy"], SHM_FRACTION_MIN, True,
                               f"{at['fraction_of_memcpy']:.2f}x  (>= {SHM_FRACTION_MIN}x)", note))
    lat = results.get("latency")
    if lat and "overhead_beyond_inference_s" in lat:
        med = lat["medians_s"]
        for stage in ("written", "drawn"):
            ov = lat["overhead_beyond_inference_s"][stage]
            shown = "—" if ov is None else (f"{med['inference'] * 1e3:.0f} + {ov * 1e3:.0f} ms  "
                                            f"(<= inference + {OVERHEAD_MAX_S * 1e3:.0f} ms)")
            out.append(_target(f"end to end: last plane -> prediction {stage}", ov, OVERHEAD_MAX_S, False,
                               shown, "" if ov is not None else "no viewer"))
    if inf and "rows" in inf:
        if "cuda_peaks" in inf:
            rows = inf["rows"]
            for net in ("bundled", "fnet-size"):
                fast = _row(rows, network=net, device="cuda", path="bf16")
                if fast is not None:
                    out.append(_target(f"CUDA: fast bf16 of GPU bf16 matmul peak, {net}",
                                       fast["fraction_of_peak"], GPU_PEAK_FRACTION_MIN, True,
                                       f"{fast['fraction_of_peak']:.2f}  (>= {GPU_PEAK_FRACTION_MIN})"))
            fast = _row(rows, network="bundled", device="cuda", path="bf16")
            if fast is not None:
                out.append(_target("CUDA: bundled model, voxels/s", fast["voxels_per_s"],
                                   GPU_BUNDLED_VOXELS_MIN, True,
                                   f"{fast['voxels_per_s'] / 1e6:.0f} Mvox/s  (>= 419)"))
        else:
            out.append({"target": "CUDA targets (GPU matmul peak, 419 Mvoxel/s)", "measured": None,
                        "threshold": None, "shown": "no GPU", "pass": None, "note": "torch.cuda unavailable"})
    return out


def print_targets(rows: list[dict], results: dict) -> None:
    print()
    print("== targets ==")
    for t in rows:
        verdict = {True: "PASS", False: "FAIL", None: "—"}[t["pass"]]
        print(f"  {t['target']:<52}{t['shown']:<40}{verdict}")
        if t["note"] and t["shown"] != "no GPU":
            print(f"  {'':<52}({t['note']})")
    thr = results.get("throughput")
    if thr and "stacks_per_s" in thr:
        print(f"  {'throughput (no target)':<52}{thr['stacks_per_s']:.2f} stacks/s acquired, "
              f"{thr['predicted_live_per_s']:.2f}/s predicted live")


# -- main ------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def _clean(obj: object) -> object:
    """JSON-safe: NaN/inf -> None, tuples and paths -> lists and strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings: about 2-3 minutes on 2 cores")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the latency and throughput runs' files (deleted by default)")
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    mode = "quick" if args.quick else "full"
    settings = {p: SETTINGS[mode][p] for p in parts}
    desc = machine()
    print(f"livestain benchmarks ({mode}), {desc['date']}")
    print(f"  {desc['cpu']}, {desc['cores_usable']} of {desc['cores']} cores usable, bf16 "
          f"{'native' if desc['cpu_bf16'] else 'not native'}, load average {desc['load_average_at_start']}")
    print(f"  torch {desc['torch']} ({desc['torch_threads']} threads), GPU: {desc['gpu'] or 'none'}")
    results: dict = {}
    seconds: dict = {}
    errors = 0
    for part in parts:
        print(f"\n== {part} ==  {json.dumps(settings[part])}", flush=True)
        t0 = time.monotonic()
        try:
            results[part] = RUNNERS[part](settings[part], args.keep_data)
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the others
            errors += 1
            results[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"{part} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        seconds[part] = round(time.monotonic() - t0, 1)
        print(f"({part}: {seconds[part]:.0f} s)", flush=True)
    goals = targets(results)
    print_targets(goals, results)
    doc = {"machine": desc, "mode": mode, "settings": settings, "seconds": seconds,
           "targets": goals, **results}
    path = args.json or Path(tempfile.gettempdir()) / \
        f"livestain-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(_clean(doc), indent=2))
    print(f"\nJSON: {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""torch.compile on the worker's fast path: what it costs the first time, the next time
(kernels cached on disk), and per stack, next to eager, in one run.

Each case runs in a fresh interpreter, as a restarted worker would: first with an empty
cache folder (cold: the compile is paid in full), then again with the same folder (warm:
what `livestain worker --compile` pays after the first run on this machine).

    .venv/bin/python bench/bench_compile.py [--shape 32,256,256] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(shape: tuple[int, ...], device: str, compiled: bool) -> dict:
    """Times in this process: model ready -> first stack done, then per stack."""
    import torch

    from livestain.inference.checkpoint import bundled_model_path, load_checkpoint
    from livestain.inference.fast import FastNet

    net = load_checkpoint(bundled_model_path()).net
    x = torch.randn(1, 1, *shape)
    fast = FastNet(net, device, compile=compiled)

    def once() -> None:
        fast(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        runs.append(time.perf_counter() - t0)
    return {"first_s": first, "per_stack_s": statistics.median(runs)}


def run_case(shape: str, device: str, compiled: bool, cache: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--shape", shape, "--device", device]
        + (["--compiled"] if compiled else []),
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(shape: str = "32,256,256", device: str = "cpu") -> list[dict]:
    cache = Path(tempfile.mkdtemp(prefix="livestain-compile-cache-"))
    rows = [{"case": "eager", **run_case(shape, device, False, cache)}]
    rows.append({"case": "compiled, cold cache", **run_case(shape, device, True, cache)})
    rows.append({"case": "compiled, warm cache", **run_case(shape, device, True, cache)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,256,256")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(tuple(int(v) for v in args.shape.split(",")), args.device, args.compiled)))
        return
    rows = measure(args.shape, args.device)
    print(f"bundled model, fast path (bf16 where native), stack {args.shape}, {args.device}")
    print(f"{'case':<24}{'first stack s':>15}{'per stack s':>13}")
    for r in rows:
        print(f"{r['case']:<24}{r['first_s']:>15.2f}{r['per_stack_s']:>13.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

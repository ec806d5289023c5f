"""Draw time per frame of the live viewer, offscreen, at 512x512 and 2048x2048.

Usage::

    QT_QPA_PLATFORM=offscreen python bench/bench_draw.py [--repeats 15] [--planes 8]

For each frame size, with 3 predicted structures, it times (median over repeats):

* ``composite``  -- the overlay compositing alone (numpy, `livestain.ui.render`);
* ``draw``       -- a full redraw: XY + XZ + YZ composites and ``setImage`` calls;
* ``draw+paint`` -- the same plus a forced repaint of the image area (``grab()``),
  i.e. what a user waits for;

in three situations: a new stack + prediction arriving (levels are computed once per
frame), a z-slider step on the same frame (levels cached), and a max projection of a
new frame (projection computed once per frame). 2048 frames are composited at the
display resolution (`render.DISPLAY_MAX_PX`); the last row shows 2048 at full
resolution for comparison. Frames have few planes (``--planes``) to keep memory low:
plane-mode costs do not depend on depth; projection costs grow with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
from PySide6 import QtWidgets

from livestain.ui import render
from livestain.ui.qtcheck import guard_if_needed
from livestain.ui.window import LiveWindow
from livestain.wire import StackHeader

STRUCTURES = ["dna", "membrane", "mitochondria"]


def frames(n: int, nz: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    stack = rng.integers(800, 4000, (nz, n, n), dtype=np.uint16)
    pred = rng.normal(0.0, 1.0, (len(STRUCTURES), nz, n, n)).astype(np.float32)
    return stack, pred


def headers(n: int, nz: int, seq: int) -> tuple[StackHeader, StackHeader]:
    common = dict(run_id="bench", seq=seq, t=seq, p=0, voxel_size_um=[1.0, 0.2, 0.2])
    stack = StackHeader(kind="stack", shape=[nz, n, n], dtype="uint16", **common)
    pred = StackHeader(kind="prediction", shape=[len(STRUCTURES), nz, n, n], dtype="float32",
                       structures=STRUCTURES, source_seq=seq, **common)
    return stack, pred


def time_case(app: QtWidgets.QApplication, n: int, nz: int, repeats: int, case: str,
              display_max_px: int) -> dict[str, float]:
    window = LiveWindow(display_max_px=display_max_px)
    window.resize(1400, 1000)
    window.show()
    app.processEvents()
    data = [frames(n, nz, seed) for seed in range(2)]  # alternate two frames
    sh, ph = headers(n, nz, 0)
    window.ingest(sh, data[0][0])
    window.ingest(ph, data[0][1])
    window.set_mode("max" if case == "max projection, new frame" else "plane")
    window.flush()
    window.views.grab()
    comp = render.Compositor()
    pred = data[0][1]
    s = render.display_step(n, n, display_max_px)
    planes = [pred[i, nz // 2, ::s, ::s] for i in range(len(STRUCTURES))]
    levels = [(0.0, 3.0)] * len(STRUCTURES)
    colors = [(40, 110, 255), (255, 0, 200), (180, 255, 0)]
    oy = -(-n // s)
    out: dict[str, list[float]] = {"composite": [], "draw": [], "draw+paint": []}
    for r in range(repeats):
        t0 = time.perf_counter()
        comp.composite(oy, oy, planes, colors, [0.7] * 3, levels)
        out["composite"].append(time.perf_counter() - t0)

        if case == "z step, same frame":
            window.set_plane(r % nz)
        else:  # a new frame: new records, so levels/projections are computed afresh
            sh, ph = headers(n, nz, r + 1)
            stack, prediction = data[(r + 1) % 2]
            window.ingest(sh, stack)
            window.ingest(ph, prediction)
        t0 = time.perf_counter()
        window.flush()
        t1 = time.perf_counter()
        window.views.grab()  # forces a full repaint of the XY/XZ/YZ views
        t2 = time.perf_counter()
        out["draw"].append(t1 - t0)
        out["draw+paint"].append(t2 - t0)
    window.close()
    window.deleteLater()
    app.processEvents()
    return {k: statistics.median(v) * 1000 for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--planes", type=int, default=8)
    args = parser.parse_args()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    guard_if_needed()
    cases = ["new frame", "z step, same frame", "max projection, new frame"]
    rows = [(n, case, render.DISPLAY_MAX_PX) for n in (512, 2048) for case in cases]
    rows.append((2048, "new frame, full-res overlay", 4096))
    print(f"viewer draw time per frame, median of {args.repeats} (ms); 3 structures, "
          f"{args.planes} planes; {os.cpu_count()} CPU(s), QT_QPA_PLATFORM={os.environ['QT_QPA_PLATFORM']}")
    print(f"{'size':>9}  {'situation':<28} {'composite':>9} {'draw':>7} {'draw+paint':>10}")
    for n, case, max_px in rows:
        label = case.replace(", full-res overlay", "")
        r = time_case(app, n, args.planes, args.repeats, label, max_px)
        print(f"{n:>4}x{n:<4}  {case:<28} {r['composite']:9.1f} {r['draw']:7.1f} {r['draw+paint']:10.1f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render time of the simulated microscope, and the figure of what it renders.

Times, for a brightfield z-stack of Z planes (1 um apart, centred on the cells) of an
S x S field, the median of ``--repeats`` runs:

* ``field``: generating the cells of one stage tile (`devices.sample.make_field`);
* ``setup``: the renderer's per-field work (each component's slice spectra);
* ``first``: the noise-free stack, the first time these focus positions are seen;
* ``moved``: the same stack a minute later (cells moved; per-focus sums are cached, as
  in a time-lapse);
* ``camera``: shot noise, read noise, offset, uint16 for the whole stack;
* ``scope``: the stack acquired through pymmcore-plus (``core.snapImage`` per plane on
  the simulated core: stage moves, rendering, noise, ledger), field already generated.

Usage::

    .venv/bin/python bench/bench_render.py [--repeats 3] [--json out.json]
    .venv/bin/python bench/bench_render.py --figure docs/simulator.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from livestain.devices.optics import FieldRenderer, OpticsConfig, to_camera_counts
from livestain.devices.pairs import default_z_planes
from livestain.devices.sample import STRUCTURES, SampleGeometry, make_field
from livestain.devices.simulated import SimulatedScope, build_simulated_core

Z_CELLS = 3.5  # stage z of the cells' mid-plane


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(size: int, planes: int, repeats: int, seed: int = 0) -> dict:
    geo = SampleGeometry(shape=(40, size, size))
    optics = OpticsConfig()
    zs = default_z_planes(4.0, planes, 1.0)
    runs: dict[str, list[float]] = {k: [] for k in ("field", "setup", "first", "moved", "camera", "scope")}
    for rep in range(repeats):
        holder: dict = {}
        runs["field"].append(_timed(lambda: holder.update(f=make_field(seed + rep, (0, 0), geo))))
        field = holder["f"]
        runs["setup"].append(_timed(lambda: holder.update(r=FieldRenderer(field, optics))))
        r = holder["r"]
        stack: list[np.ndarray] = []
        runs["first"].append(_timed(lambda: stack.extend(r.brightfield(z) for z in zs)))
        shifts = field.displacement(60.0)
        runs["moved"].append(_timed(lambda: [r.brightfield(z, shifts) for z in zs]))
        rng = np.random.default_rng(rep)
        photons = optics.bf_photons_per_ms * 10.0
        runs["camera"].append(_timed(lambda: [to_camera_counts(p, photons, optics, rng) for p in stack]))
        scope = SimulatedScope(seed=seed + rep, geometry=geo)
        core = build_simulated_core(scope)
        scope.renderer((0, 0))  # the field is generated once per position, not per stack

        def acquire() -> None:
            for z in zs:
                core.setPosition(float(z))
                core.snapImage()
                core.getImage()

        runs["scope"].append(_timed(acquire))
    return {"size": size, "planes": planes, **{k: statistics.median(v) for k, v in runs.items()}}


def figure(path: Path, seed: int = 0) -> None:
    """Brightfield planes through focus beside the fluorescence channels of one field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scope = SimulatedScope(seed=seed)
    scope.clock = lambda: 0.0
    core = build_simulated_core(scope)
    dz = (-6, -3, 0, 3, 6)

    def snap(channel: str, z: float, exposure: float = 10.0) -> np.ndarray:
        core.setConfig("Channel", channel)
        core.setExposure(exposure)
        core.setPosition(z)
        core.snapImage()
        return core.getImage().astype(float)

    bf = [snap("Brightfield", Z_CELLS + d) for d in dz]
    fl = {s: snap(s.capitalize(), Z_CELLS, 50.0) for s in STRUCTURES}
    field = scope.renderer((0, 0)).sample
    cells = field.delta_n.max(axis=0) > 0
    z_curve = np.arange(-6.0, 13.01, 0.5)
    contrast = [scope.renderer((0, 0)).brightfield(z)[cells].std() for z in z_curve]

    lo, hi = np.percentile(np.stack(bf), [0.5, 99.5])
    fig, axes = plt.subplots(2, 5, figsize=(15, 6.6), constrained_layout=True)
    for ax, d, img in zip(axes[0], dz, bf):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        where = "in focus" if d == 0 else f"{d:+d} um"
        ax.set_title(f"brightfield, {where}")
    rgb = np.zeros((*bf[0].shape, 3))
    for ax, (s, img) in zip(axes[1], fl.items()):
        a, b = np.percentile(img, [1, 99.8])
        ax.imshow(img, cmap="gray", vmin=a, vmax=b)
        ax.set_title(f"{s} fluorescence")
        norm = np.clip((img - a) / (b - a), 0, 1)
        rgb += norm[..., None] * {"dna": (0.2, 0.4, 1.0), "membrane": (1.0, 0.1, 0.8),
                                  "mitochondria": (0.1, 1.0, 0.2)}[s]
    axes[1, 3].imshow(np.clip(rgb, 0, 1))
    axes[1, 3].set_title("merge (all in focus)")
    for ax in axes.ravel()[:9]:
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[1, 4]
    ax.plot(z_curve - Z_CELLS, contrast, "k-")
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_xlabel("focus - cells' mid-plane (um)")
    ax.set_ylabel("std / background, in cells")
    ax.set_title("brightfield contrast through focus")
    bar = int(round(20 / scope.pixel_size_um))
    axes[0, 0].plot([10, 10 + bar], [245, 245], color="w", lw=3)
    axes[0, 0].text(10, 238, "20 um", color="w")
    fig.suptitle(f"livestain simulated microscope (seed {seed}, 20x/0.5, condenser NA 0.3, "
                 f"0.325 um pixels; camera images with shot and read noise)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--figure", type=Path, default=None, help="write the figure here and exit")
    args = ap.parse_args()
    if args.figure:
        figure(args.figure)
        return
    cases = [(256, 16), (256, 32), (512, 32)]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}; seconds per stack")
    head = f"{'stack':>12} {'field':>6} {'setup':>6} {'first':>6} {'moved':>6} {'camera':>7} {'scope':>6}"
    print(head)
    rows = []
    for size, planes in cases:
        row = bench(size, planes, args.repeats)
        rows.append(row)
        print(f"{planes:>3}x{size}x{size:<4} {row['field']:6.2f} {row['setup']:6.2f} {row['first']:6.2f} "
              f"{row['moved']:6.2f} {row['camera']:7.2f} {row['scope']:6.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

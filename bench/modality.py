"""Does `livestain.modality.detect_modality` tell brightfield from phase contrast?

Scores it on fields drawn by `livestain simulate --randomize`'s ranges (focus +-10 um, z
range 6-40 um, z step 0.2-2 um, pixel 0.1-0.7 um, NA, condenser, ring amplitude, camera,
dense / rounded / empty samples), half phase contrast, and on the real brightfield
stacks in ``../shared/data`` when present. Prints the confusion matrix and the
misread fields: a brightfield stack read as phase contrast would get the wrong model,
so that count is the one that matters; a phase stack read as brightfield gets the
bundled brightfield model, as it did before routing.

    python bench/modality.py [--fields 200] [--size 128] [--seed 11]

About 2.5 min for 200 fields of 128 px on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from livestain.devices import randomize
from livestain.modality import BRIGHTFIELD, PHASE, detect_modality

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def simulated(fields: int, size: int, seed: int) -> dict[tuple[str, str], int]:
    rng = np.random.default_rng(seed)
    ranges = randomize.Ranges(p_phase=0.5)
    counts: dict[tuple[str, str], int] = {}
    for i in range(fields):
        params = randomize.draw(rng, ranges)
        pair, _ = randomize.render(params, 20_000 + i, (0, 0), size)
        est = detect_modality(pair.brightfield, float(pair.voxel_size_um[0]))
        truth = params["modality"]
        counts[(truth, est.modality)] = counts.get((truth, est.modality), 0) + 1
        if est.modality != truth:
            print(f"  misread: {truth} read as {est.modality}: {params['population']['kind']} sample, "
                  f"focus {params['focus_offset_um']:+.1f} um, {pair.brightfield.shape[0]} planes, "
                  f"skew {est.skew:+.2f}, sign change {est.sign_change:.2f}, share {est.share:.2f}", flush=True)
    return counts


def real() -> list[tuple[str, str, str]]:
    """(file, read as, why) for the real brightfield stacks in ../shared/data."""
    import tifffile

    out = []
    for path, z_step in [(SHARED / "bfdc3d_imodpasteur" / "LED_stack_full_100nm.tif", 0.1),
                         *[(p, 10.0) for p in sorted((SHARED / "sephace_bf_dapi").glob("Set*_brightfield_zstack.ome.tif"))]]:
        if not path.is_file():
            continue
        stack = np.squeeze(tifffile.imread(path)).astype(np.float32)
        est = detect_modality(stack, z_step)
        out.append((path.name, est.modality, est.reason))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fields", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    counts = simulated(a.fields, a.size, a.seed)
    print(f"{a.fields} randomized fields of {a.size} px ({time.perf_counter() - t0:.0f} s):")
    for truth in (BRIGHTFIELD, PHASE):
        n = sum(v for (t, _), v in counts.items() if t == truth)
        read = {m: counts.get((truth, m), 0) for m in (BRIGHTFIELD, PHASE)}
        print(f"  {truth:11s} ({n:3d}): read as brightfield {read[BRIGHTFIELD]:3d}, as phase {read[PHASE]:3d}")
    for name, modality, why in real():
        print(f"  real {name}: {modality} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

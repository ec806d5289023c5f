"""Which per-voxel uncertainty ranks the errors? The shipped TTA spread against a signal
term, per voxel and per stack (issue 11: mitochondria's per-voxel Spearman is 0.16).

The TTA copies of one model miss mitochondria's thin tubules alike, so their spread
does not rank those errors; the errors are largest where the predicted signal is
(heteroscedastic). Candidates, per structure:

* ``spread``: `inference.uncertainty.predict_with_uncertainty` as shipped;
* ``signal``: the prediction's positive part above the stack's median, smoothed by one
  voxel;
* ``spread+W*signal*mean_spread``: the two, the signal scaled by the stack's mean spread
  so stacks keep the spread's order.

Measured 2026-12-02 (bundled model, seeds 7331 and 8443 x bench/calibration.py's 9
conditions; dna / membrane / mitochondria), per voxel in focus -> per stack:
spread 0.58 / 0.62 / 0.12 -> 0.85 / 0.87 / 0.92; signal 0.73 / 0.63 / 0.54 -> 0.64 /
0.62 / 0.46; W = 100: 0.74 / 0.66 / 0.50 -> 0.79 / 0.69 / 0.69. Seed 9551 alone (not
used to choose W), mitochondria: spread 0.16 -> 0.78, W = 100 0.52 -> 0.57. Not shipped
yet: the per-stack ranking pays, and the scales (`ERROR_PER_STD`) need re-measuring.

    .venv/bin/python bench/uncertainty_candidates.py [SEED ...]   (~1 min per seed, 2 CPUs)
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import spearmanr

from calibration import CONDITIONS, VOXELS_PER_STACK, render_field
from livestain.inference import uncertainty
from livestain.inference.normalize import zscore
from livestain.inference.predict import Predictor

WEIGHTS = (3.0, 10.0, 30.0, 100.0)


def candidates(mean: np.ndarray, spread: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate uncertainty of one structure's (z, y, x) prediction."""
    signal = ndi.gaussian_filter(np.maximum(mean - np.median(mean), 0), 1.0)
    out = {"spread": spread, "signal": signal}
    for w in WEIGHTS:
        u = spread + w * signal * spread.mean()
        out[f"spread+{w:g}*signal*mean_spread"] = u
        out[f"  same, stack mean kept (w={w:g})"] = u * (spread.mean() / max(float(u.mean()), 1e-12))
    return out


def main(seeds: list[int]) -> int:
    predictor = Predictor(None, "cpu")
    names = predictor.structures
    rng = np.random.default_rng(0)
    stacks = []
    for seed in seeds:
        for name, offset, exposure in CONDITIONS:
            field = render_field(seed, 128, offset, exposure_ms=exposure)
            truth = np.stack([zscore(t) for t in field["truth"]])
            mean, spread = uncertainty.predict_with_uncertainty(predictor, field["brightfield"], field["voxel"])
            idx = rng.choice(truth[0].size, VOXELS_PER_STACK, replace=False)
            stacks.append((name, mean, spread, np.abs(mean - truth), idx))
            print(f"  seed {seed} {name}", file=sys.stderr, flush=True)
    for i, structure in enumerate(names):
        for only in ("in focus", None):
            us: dict[str, list[np.ndarray]] = {}
            errors = []
            for name, mean, spread, err, idx in stacks:
                if only and name != only:
                    continue
                for key, u in candidates(mean[i], spread[i]).items():
                    us.setdefault(key, []).append(u.ravel()[idx])
                errors.append(err[i].ravel()[idx])
            e = np.concatenate(errors)
            rho = {k: round(float(spearmanr(np.concatenate(v), e)[0]), 3) for k, v in us.items()}
            print(f"{structure} per voxel, {only or 'all conditions'}: {rho}")
        per_u: dict[str, list[float]] = {}
        per_e = []
        for _, mean, spread, err, _ in stacks:
            for key, u in candidates(mean[i], spread[i]).items():
                per_u.setdefault(key, []).append(float(u.mean()))
            per_e.append(float(err[i].mean()))
        print(f"{structure} per stack: { {k: round(float(spearmanr(v, per_e)[0]), 3) for k, v in per_u.items()} }")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(s) for s in sys.argv[1:]] or [7331, 8443]))

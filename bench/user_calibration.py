"""Does a user's model's uncertainty read in its own error units? Real data, measured.

For each real paired dataset (`bench/transfer.py`'s splits: sephace, ndev), this trains
a model with ``livestain train``'s defaults (2.5D, the stack's planes as the window, a
validation strip of the training fields) and, on the held-out test crops, compares its
per-voxel uncertainty with its actual absolute error:

* ``own``: the scale ``livestain train`` fitted on the validation fields
  (`inference.calibrate`, stored in the checkpoint, used by default);
* ``bundled constants``: what the same spread read before, the bundled model's
  ``dna`` scale and curve (`uncertainty.ERROR_PER_STD`, `uncertainty.ERROR_CURVE`),
  with the bundled model's confidence halving level (`ood.U_HALF`).

Per crop: Pearson r, median |error| / median uncertainty (1: the median voxel reads its
error), Spearman of uncertainty with |error| per voxel (unchanged by any scale), and the
confidence under each. Summary per dataset: how far off the error scale is, as the
geometric mean over crops of max(ratio, 1 / ratio).

    .venv/bin/python bench/user_calibration.py [--json docs/user_calibration.json] [--seed 0]

About 2 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_experiments as ex  # noqa: E402
import transfer as T  # noqa: E402

from livestain.cli import main as livestain  # noqa: E402
from livestain.inference import ood, uncertainty  # noqa: E402
from livestain.inference.checkpoint import load_checkpoint  # noqa: E402
from livestain.inference.dataset import write_pairs  # noqa: E402
from livestain.inference.evaluate import truth_like_prediction  # noqa: E402
from livestain.inference.normalize import zscore  # noqa: E402
from livestain.inference.predict import Predictor  # noqa: E402
from livestain.metrics import pearson  # noqa: E402


def bundled_constants(raw: np.ndarray) -> np.ndarray:
    """The raw placed spread of ``dna`` as the bundled model's constants read it."""
    floor, k, power = uncertainty.ERROR_CURVE["tta"]["dna"]
    return floor + k * np.power(raw * uncertainty.ERROR_PER_STD["tta"]["dna"], power)


def off_by(ratios: list[float]) -> float:
    """Geometric mean of max(r, 1/r): the factor the error scale is off, either way."""
    return float(np.exp(np.mean(np.abs(np.log(ratios)))))


def run_split(split: T.Split, root: Path, seed: int) -> dict[str, Any]:
    data, out = root / f"{split.dataset}-train", root / f"{split.dataset}-model"
    write_pairs(split.train, data)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert livestain(["train", str(data), "--structures", "dna", "--out", str(out), "--mode", "2.5d",
                          "--z-window", str(split.z_window), "--seed", str(seed)]) == 0
    said = [line for line in buf.getvalue().splitlines() if "calibrated" in line]
    print(f"[{split.dataset}] {said[0] if said else 'not calibrated'}", flush=True)
    model = load_checkpoint(out.with_suffix(".safetensors"))
    predictor = Predictor(model, "cpu")
    own = uncertainty.own_calibration(model.meta)
    crops = []
    for f in split.test:
        truth = zscore(truth_like_prediction(model.meta.config, np.asarray(f.targets))[0])
        mean, u = uncertainty.predict_with_uncertainty(predictor, f.brightfield, f.voxel_size_um)
        _, raw = uncertainty.predict_with_uncertainty(predictor, f.brightfield, f.voxel_size_um, calibration={})
        before = bundled_constants(raw)
        err = np.abs(mean[0] - truth)
        row = {"crop": f.name, "pearson": round(float(pearson(mean[0], truth)), 4),
               "ratio_own": round(float(np.median(err) / np.median(u)), 3),
               "ratio_bundled_constants": round(float(np.median(err) / np.median(before)), 3),
               "spearman_voxel": round(float(spearmanr(u.ravel(), err.ravel())[0]), 3),
               "confidence_own": round(ood.stack_confidence(u, ("dna",), u_half=own["u_half"]).overall, 3),
               "confidence_bundled_constants": round(ood.stack_confidence(before, ("dna",)).overall, 3)}
        crops.append(row)
        print(f"  {row}", flush=True)
    return {"calibration": own, "crops": crops,
            "off_by_own": round(off_by([c["ratio_own"] for c in crops]), 2),
            "off_by_bundled_constants": round(off_by([c["ratio_bundled_constants"] for c in crops]), 2),
            "spearman_voxel": [min(c["spearman_voxel"] for c in crops), max(c["spearman_voxel"] for c in crops)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"datasets": {}, "skipped": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, available, split in (("sephace", ex.sephace_available(), T.sephace_split),
                                       ("ndev", ex.ndev_path() is not None, T.ndev_split)):
            if not available:
                result["skipped"][name] = "data absent"
                print(f"{name}: skipped (data absent)")
                continue
            result["datasets"][name] = run_split(split(), Path(tmp), a.seed)
    for name, d in result["datasets"].items():
        print(f"{name}: error scale off by x{d['off_by_bundled_constants']} with the bundled constants, "
              f"x{d['off_by_own']} with its own; per-voxel Spearman {d['spearman_voxel'][0]:.2f}-"
              f"{d['spearman_voxel'][1]:.2f}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"done in {result['seconds']:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

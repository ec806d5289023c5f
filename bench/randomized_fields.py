"""Everything at once: Pearson r of a model on brightfield fields whose optics, camera and
sample are drawn together, not one factor at a time as bench/robustness.py varies them.

A model can pass every row of the one-factor grid and still fail when a different
objective, an uneven lamp and a dense sample come together, as they do on a user's
microscope. Two sets of 10 held-out fields:

* ``optics``: the geometry of the bundled acquisition (16 planes 1 um apart on the
  cells, 0.325 um pixels: the worker's z window and resampling handle geometry), optics,
  camera and sample drawn from `livestain.bundled.robust_ranges` (192 px, seeds 9800+);
* ``everything``: `livestain simulate --randomize`'s ranges, geometry included, at most 40
  planes (160 px,
  seeds 9700+; empty fields and stacks far off the cells among them).

    .venv/bin/python bench/randomized_fields.py [MODEL ...]

Prints mean r per structure and the worst field's DNA r per set and model (default: the
bundled model, picked per stack as the worker does). About 1 min per model on 2 CPU
cores. Measured 2026-12-02, DNA / membrane / mitochondria mean r, the morning's dense-mix
model -> the shipped NA fine-tune: optics 0.09 / 0.41 / 0.23 -> 0.79 / 0.85 / 0.55 (worst
DNA 0.47), everything 0.18 / 0.39 / 0.19 -> 0.64 / 0.71 / 0.38.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def field_sets() -> dict[str, list]:
    """The two held-out sets (see the module docstring), rendered reproducibly."""
    from livestain.bundled import robust_ranges
    from livestain.devices import randomize

    rng = np.random.default_rng(43)
    optics = [randomize.render(randomize.draw(rng, robust_ranges(0.0)), 9800 + i, (0, 0), 192)[0]
              for i in range(10)]
    rng = np.random.default_rng(44)
    everything = [randomize.render(randomize.draw(rng, randomize.Ranges(p_phase=0.0, max_planes=40)), 9700 + i, (0, 0), 160)[0]
                  for i in range(10)]
    return {"optics": optics, "everything": everything}


def main(argv: Sequence[str] | None = None) -> int:
    from livestain.inference.evaluate import evaluate_model
    from livestain.inference.predict import Predictor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=[None], help="checkpoints (default: the bundled model)")
    a = p.parse_args(argv)
    sets = field_sets()
    for model in a.models:
        predictor = Predictor(model, "cpu")
        for name, fields in sets.items():
            res = evaluate_model(predictor, fields)
            means = {s: round(res["mean"][s]["pearson"], 3) for s in res["structures"]}
            worst = min(res["fields"][k]["dna"]["pearson"] for k in res["fields"])
            print(f"{model or 'bundled'}  {name:10s}  mean r {means}  worst field DNA r {worst:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

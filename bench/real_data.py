"""Train and score 2.5D models on real brightfield data; print Pearson r, write figures.

    .venv/bin/python bench/real_data.py [--only sephace|ndev] [--sephace-steps 1500]
        [--ndev-steps 800] [--out runs/real_data] [--figures docs] [--json results.json]

* sephace (``../shared/data/sephace_bf_dapi``, skipped when absent): a 6-plane
  brightfield defocus series -> DAPI; trained on field Set1, scored on field Set2.
* ndev (``pip install --no-deps ndev-sampledata``, skipped when absent): oblique
  transmitted light -> Hoechst; trained on time points 0-6, scored on 7-9.

Models go to ``--out`` (not the project: the sephace data are licensed for
non-commercial research only), figures to ``docs/real_sephace.png`` and
``docs/real_ndev.png``. See `bench/real_experiments.py` for the details and the
baselines printed beside each result.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import real_experiments as ex


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("sephace", "ndev"), default=None)
    ap.add_argument("--sephace-steps", type=int, default=1500)
    ap.add_argument("--ndev-steps", type=int, default=800)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--out", type=Path, default=Path("runs/real_data"), help="where the models go")
    ap.add_argument("--figures", type=Path, default=Path("docs"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    results = {}
    if a.only in (None, "sephace"):
        if not ex.sephace_available():
            print(f"sephace: skipped ({ex.SEPHACE_DIR} is absent)")
        else:
            exp, trn, tst = ex.sephace_experiment(steps=a.sephace_steps, precision=a.precision)
            print(f"sephace: training on {exp.train_names}, testing on {exp.test_names} "
                  f"({exp.settings.steps} steps, {exp.config.z_window}-plane window, binning {exp.binning})")
            r = ex.run_experiment(exp, trn, tst, a.out)
            fig = ex.save_real_figure(
                a.figures / "real_sephace.png", r["model"], tst,
                f"sephace: 2.5D model (6 defocus planes -> DAPI) trained on Set1, tested on Set2 "
                f"(Pearson r {r['mean']['dna']['pearson']:.3f})", bf_plane=0, zoom=384)
            r["figure"] = str(fig)
            results["sephace"] = r
            _print(r)
    if a.only in (None, "ndev"):
        if ex.ndev_path() is None:
            print("ndev: skipped (pip install --no-deps ndev-sampledata)")
        else:
            exp, trn, tst = ex.ndev_experiment(steps=a.ndev_steps, precision=a.precision)
            print(f"ndev: training on {exp.train_names}, testing on {exp.test_names} ({exp.settings.steps} steps)")
            r = ex.run_experiment(exp, trn, tst, a.out)
            fig = ex.save_real_figure(
                a.figures / "real_ndev.png", r["model"], tst,
                f"ndev scratch assay: 2D model (oblique light -> Hoechst) trained on t0-t6, tested on t7-t9 "
                f"(mean Pearson r {r['mean']['dna']['pearson']:.3f})")
            r["figure"] = str(fig)
            results["ndev"] = r
            _print(r)
    if a.json:
        a.json.write_text(ex.summary_json(results))
    return 0


def _print(r: dict) -> None:
    m = r["mean"]["dna"]
    b = r["baseline_best_plane"]
    print(f"  test {', '.join(r['test_fields'])}: Pearson r {m['pearson']:.3f}, SSIM {m['ssim']:.3f}, "
          f"NRMSE {m['nrmse']:.3f}; per field: "
          + ", ".join(f"{k} {v['dna']['pearson']:.3f}" for k, v in r["test"].items()))
    print(f"  baselines: best single brightfield plane |r| {b['best_abs_r']:.3f} (plane {b['best_plane']}), "
          f"untrained network r {r['baseline_untrained_r']:.3f}")
    print(f"  trained in {r['train_seconds']:.0f} s ({r['precision']}); model {r['model']}; figure {r['figure']}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    raise SystemExit(code)

"""Does a user's own model say when not to trust it? Home stacks against foreign ones.

Trains one model per real paired dataset through ``livestain train`` as a user would
(sephace: 4 binned quadrants of Set1, a 6-plane window; ndev: 30 quadrants, one plane,
16 base channels), then predicts with uncertainty, as ``livestain predict --uncertainty``
and the worker do:

* **home**: the dataset's own held-out crops (bench/transfer.py's test crops);
* **foreign**: stacks from elsewhere the model could be handed: the other dataset's
  planes (ndev's model on sephace's in-focus and +25 um planes at their true 0.2 um
  pixels), and simulated fields at the model's plane geometry (bench/transfer.py's
  `simulate_fields`).

Per set: DNA Pearson r (mean, worst), the confidence with the checks as they are, and as
they were before 2026-12-03 (no training-stack focus dip, no `unlike_training`), the
flags, and the likeness ratio (`inference.signature`). A good check keeps home stacks
trusted and drops stacks whose r is poor.

    .venv/bin/python bench/likeness.py --json docs/likeness.json   # ~2 min on 2 CPU cores
    .venv/bin/python bench/likeness.py --quick                     # smoke run, numbers meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_experiments as ex  # noqa: E402
import transfer as tb  # noqa: E402
from livestain.cli import main as livestain  # noqa: E402
from livestain.inference.dataset import write_pairs  # noqa: E402
from livestain.inference.normalize import zscore  # noqa: E402
from livestain.inference.ood import check_stack, model_expectations, stack_confidence  # noqa: E402
from livestain.inference.predict import Predictor  # noqa: E402
from livestain.inference.signature import Likeness, check_likeness  # noqa: E402
from livestain.inference.train import pearson  # noqa: E402
from livestain.inference.uncertainty import own_u_half  # noqa: E402

SEPHACE_PIXEL = (1.0, ex.SEPHACE_PIXEL_UM, ex.SEPHACE_PIXEL_UM)
TRUSTED = 0.5  # confidence at or above: the window shows it as trustworthy
WRONG = 0.7  # DNA r below: the prediction is not what the stain shows (bench/trust.py's bar)


def train_model(split: tb.Split, options: Sequence[str], root: Path, quick: bool) -> Path:
    """``livestain train`` on the split's training fields; the checkpoint's path."""
    data, out = root / f"{split.dataset}-train", root / f"{split.dataset}-model"
    write_pairs(split.train, data)
    extra = ["--steps", "3", "--depth", "1", "--base-channels", "4"] if quick else []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = livestain(["train", str(data), "--structures", "dna", "--out", str(out), *options, *extra])
    if rc != 0:
        raise RuntimeError(f"livestain train failed:\n{buf.getvalue()[-2000:]}")
    return out.with_suffix(".safetensors")


def score_set(model: Path, label: str, kind: str, fields: Sequence[ex.RealField],
              voxel: Sequence[float] | None = None, plane: int | None = None) -> dict[str, Any]:
    """r, confidence now and before, flags and likeness ratio over ``fields`` (``plane``:
    that one brightfield plane only; ``voxel``: declared instead of the field's)."""
    predictor = Predictor(model, "cpu")
    likeness = Likeness.of(predictor.model)
    expect = model_expectations(predictor.model.meta, predictor.focus_window)
    rs, now, before, ratios, flags = [], [], [], [], set()
    for f in fields:
        bf = np.asarray(f.brightfield, np.float32)
        if plane is not None:
            bf = bf[plane : plane + 1]
        v = tuple(voxel or f.voxel_size_um)
        mean, unc = predictor.predict_with_uncertainty(bf, v)
        rs.append(pearson(mean[0].reshape(mean.shape[-2:]), zscore(np.asarray(f.targets[0]).squeeze())))
        checks = check_stack(bf, v, **expect)
        check_likeness(checks, likeness, bf, v)
        old = check_stack(bf, v, **{**expect, "model_focus_dip": None})
        u_half = own_u_half(predictor.model.meta)
        now.append(stack_confidence(unc, predictor.structures, checks, u_half=u_half).overall)
        before.append(stack_confidence(unc, predictor.structures, old, u_half=u_half).overall)
        ratios.append(checks.stats.get("unlike_training_ratio", float("nan")))
        flags.update(checks.codes)
    return {"model": model.stem, "set": label, "kind": kind, "stacks": len(fields),
            "r_mean": round(float(np.mean(rs)), 3), "r_worst": round(float(np.min(rs)), 3),
            "confidence": [round(float(min(now)), 2), round(float(max(now)), 2)],
            "confidence_before": [round(float(min(before)), 2), round(float(max(before)), 2)],
            "likeness_ratio": [round(float(np.nanmin(ratios)), 2), round(float(np.nanmax(ratios)), 2)],
            "likeness_limit": likeness.signature.get("limit") if likeness else None,
            "flags": sorted(flags)}


def verdicts(rows: Sequence[dict[str, Any]], key: str) -> dict[str, int]:
    """Sets trusted (lowest confidence >= `TRUSTED`) though wrong (worst r < `WRONG`), and
    flagged (highest confidence < `TRUSTED`) though right, with confidence ``key``."""
    return {"trusted_but_wrong": sum(r[key][0] >= TRUSTED and r["r_worst"] < WRONG for r in rows),
            "flagged_but_right": sum(r[key][1] < TRUSTED and r["r_worst"] >= WRONG for r in rows)}


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | stacks | DNA r mean (worst) | confidence | checks as before | likeness ratio (limit) | flags |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        span = lambda a: f"{a[0]:.2f}-{a[1]:.2f}" if a[0] != a[1] else f"{a[0]:.2f}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['set']} ({r['kind']}) | {r['r_mean']:.3f} ({r['r_worst']:.3f}) | "
                     f"{span(r['confidence'])} | {span(r['confidence_before'])} | {span(r['likeness_ratio'])} ({r['likeness_limit']}) | "
                     f"{', '.join(r['flags']) or '-'} |")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny crops and network, a few steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": tb.machine(), "rows": [], "skipped": {}}
    have_s, have_n = ex.sephace_available(), ex.ndev_path() is not None
    if not (have_s and have_n):
        results["skipped"]["all"] = "needs both ../shared/data/sephace_bf_dapi and ndev-sampledata (foreign = the other)"
        log(f"skipped: {results['skipped']['all']}")
        return results
    seph, ndev = tb.sephace_split(a.quick), tb.ndev_split(a.quick)
    n_sim, size = (2, 64) if a.quick else (6, 256)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        m_s = train_model(seph, ["--mode", "2.5d", "--z-window", "6"], root, a.quick)
        m_n = train_model(ndev, ["--mode", "2.5d", "--base-channels", "16"], root, a.quick)
        sets = [
            (m_s, "sephace held-out quadrants", "home", seph.test, None, None),
            (m_n, "ndev held-out quadrant, 10 time points", "home", ndev.test, None, None),
            (m_n, "sephace in-focus plane", "foreign", seph.test, SEPHACE_PIXEL, 2),
            (m_n, "sephace +25 um plane", "foreign", seph.test, SEPHACE_PIXEL, 5),
            (m_n, "simulated brightfield planes", "foreign", tb.simulate_fields(ndev, n_sim, size), (1.0, 1.0, 1.0),
             None),
            (m_s, "simulated 6-plane defocus series", "foreign", tb.simulate_fields(seph, n_sim, size), None, None),
        ]
        for model, label, kind, fields, voxel, plane in sets:
            row = score_set(model, label, kind, fields, voxel, plane)
            results["rows"].append(row)
            log(f"{row['model']} on {label} ({kind}): r {row['r_mean']:.3f} (worst {row['r_worst']:.3f}), "
                f"confidence {row['confidence']} (before {row['confidence_before']}), ratio "
                f"{row['likeness_ratio']}, flags {row['flags']}")
    results["verdicts"] = {"now": verdicts(results["rows"], "confidence"),
                           "before": verdicts(results["rows"], "confidence_before")}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["table"] = table(results["rows"])
    log("")
    log(results["table"])
    log(f"trusted but wrong / flagged but right: now {results['verdicts']['now']}, "
        f"before {results['verdicts']['before']}; {results['seconds']:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=tb._json_default))
    return results


if __name__ == "__main__":
    run()

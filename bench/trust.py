"""Does the confidence say when not to trust a prediction? Pearson r beside the per-stack
confidence, condition by condition, on held-out simulated fields.

A prediction a microscopist should not trust must carry a low confidence; one that is
right should not be buried under false alarms. For each condition of
`bench/robustness.py` (one acquisition factor changed at a time), plus stacks too thin
for a 3D model (a single plane, a few planes, finely stepped short stacks) and one far
out of focus, this predicts the held-out fields with the bundled models (routed by
modality) and their per-voxel uncertainty, runs the input checks (`inference.ood`) and
prints, per condition: r per structure (the mean of the uncertainty's 8 copies against
the truth), the worst field's DNA r, the mean confidence, and the flags raised. The
confidence is computed twice in the same run: with the checks as the worker runs them
(`ood.model_expectations`: the model's voxel size, its training z extent, its centred z
window) and as they ran before those expectations (the voxel size alone: no
``thin_stack``, a fine z step counted against the voxel size, no milder
``out_of_focus`` for cells just beyond the stack), so the change is measured side by side.

With the real paired datasets beside the project (``../shared/data``'s sephace,
``ndev-sampledata``; skipped when absent, and with ``--quick``), two more rows: the
bundled model applied zero-shot to their held-out crops as a user would (their declared
voxel sizes, `bench/transfer.py`'s split), DNA r at the in-focus plane(s) against the
stain beside the confidence the worker would show.

"Trusted but wrong" counts the conditions whose mean confidence is at least
`TRUSTED` (the daemon's low-confidence line: `status` counts stacks below it) while their
worst DNA r is under `WRONG` (a nucleus map one would not act on).

    .venv/bin/python bench/trust.py [--quick] [--size 128] [--json docs/trust.json]

About 9 min on 2 CPU cores (29 simulated conditions x 3 fields of 128 px, 8 passes each, 5 min; the real crops 4 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness as R  # noqa: E402

from livestain.devices.sample import STRUCTURES  # noqa: E402
from livestain.metrics import pearson  # noqa: E402

#: The daemon's line for a low-confidence stack (`status`'s ``low_confidence_stacks``).
TRUSTED = 0.5
#: DNA r below which a nucleus map is wrong enough not to act on.
WRONG = 0.7


def conditions() -> list[tuple[str, Any]]:
    """`bench/robustness.py`'s conditions, then what its grid keeps out: thin stacks and
    a stack far from the cells."""
    out = list(R.conditions())
    out += [("1 plane", R._with(n_planes=1)), ("3 planes (1 um)", R._with(n_planes=3)),
            ("4 planes 1.5 um apart", R._with(n_planes=4, z_step_um=1.5)),
            ("5 planes 0.3 um apart", R._with(n_planes=5, z_step_um=0.3)),
            ("8 planes 0.3 um apart", R._with(n_planes=8, z_step_um=0.3)),
            ("focus +12 um", R._with(focus_offset_um=12.0))]
    return out


def real_rows(predictor: Any) -> dict[str, dict[str, Any]]:
    """The bundled models zero-shot on the real paired datasets' test crops: DNA r of the
    mean prediction at the in-focus plane(s) against the stain, and the confidence."""
    import real_experiments as ex
    import transfer as T

    from livestain.inference import ood
    from livestain.inference.normalize import zscore

    rows: dict[str, dict[str, Any]] = {}
    for name, available, make in (("sephace", ex.sephace_available(), T.sephace_split),
                                  ("ndev", ex.ndev_path() is not None, T.ndev_split)):
        if not available:
            print(f"  real {name}: skipped (data absent)")
            continue
        t0 = time.perf_counter()
        split = make()
        voxel = split.zero_shot_voxel_um
        r, conf, conf_before, flags = [], [], [], set()
        for f in split.test:
            stack = np.asarray(f.brightfield, np.float32)
            mean, unc = predictor.predict_with_uncertainty(stack, voxel)
            dna = mean[predictor.structures.index("dna")]
            r.append(float(pearson(dna[list(split.in_focus)].mean(axis=0), zscore(f.targets[0]))))
            expect = ood.model_expectations(predictor.model.meta, predictor.focus_window)
            report = ood.check_stack(stack, voxel, **expect)
            conf.append(ood.stack_confidence(unc, predictor.structures, report).overall)
            before = ood.check_stack(stack, voxel, expect["model_voxel_size_um"])
            conf_before.append(ood.stack_confidence(unc, predictor.structures, before).overall)
            flags |= set(report.codes)
        label = f"real {name}, zero-shot ({len(split.test)} crops)"
        rows[label] = {"pearson": {"dna": round(float(np.mean(r)), 4)}, "dna_worst": round(min(r), 4),
                       "confidence": round(float(np.mean(conf)), 3),
                       "confidence_before": round(float(np.mean(conf_before)), 3),
                       "flags": sorted(flags), "model": predictor.model.name,
                       "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {label}: DNA r {np.mean(r):.3f} (worst {min(r):.3f}), confidence {np.mean(conf):.2f} "
              f"(checks as before {np.mean(conf_before):.2f}), flags {sorted(flags) or '-'}", flush=True)
    return rows


def run(seeds: Sequence[int], size: int, only: Sequence[str] | None = None,
        real: bool = True) -> dict[str, Any]:
    from livestain.inference import ood
    from livestain.inference.predict import Predictor

    predictor = Predictor(None, "cpu")
    rows: dict[str, dict[str, Any]] = {}
    for name, edit in conditions():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        r_fields, conf, conf_before, flags = [], [], [], set()
        for pair in R.render_condition(edit, seeds, size):
            mean, unc = predictor.predict_with_uncertainty(pair.brightfield, pair.voxel_size_um)
            names = predictor.structures
            r_fields.append({s: float(pearson(mean[i], pair.targets[STRUCTURES.index(s)]))
                             for i, s in enumerate(names) if s in STRUCTURES})
            expect = ood.model_expectations(predictor.model.meta, predictor.focus_window)  # the model routed to
            report = ood.check_stack(pair.brightfield, pair.voxel_size_um, **expect)
            conf.append(ood.stack_confidence(unc, names, report).overall)
            before = ood.check_stack(pair.brightfield, pair.voxel_size_um, expect["model_voxel_size_um"])
            conf_before.append(ood.stack_confidence(unc, names, before).overall)
            flags |= set(report.codes)
        rows[name] = {
            "pearson": {s: round(float(np.mean([r[s] for r in r_fields])), 4) for s in r_fields[0]},
            "dna_worst": round(min(r["dna"] for r in r_fields), 4),
            "confidence": round(float(np.mean(conf)), 3),
            "confidence_before": round(float(np.mean(conf_before)), 3),
            "flags": sorted(flags), "model": predictor.model.name,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        row = rows[name]
        print(f"  {name}: r {row['pearson']}, DNA worst {row['dna_worst']:.3f}, confidence {row['confidence']:.2f} "
              f"(checks as before {row['confidence_before']:.2f}), "
              f"flags {row['flags'] or '-'} ({row['seconds']} s)", flush=True)
    if real:
        rows.update(real_rows(predictor))
    return {"seeds": list(seeds), "size": size, "rows": rows, "summary": summarise(rows)}


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Trusted-but-wrong and flagged-but-right conditions and the rank correlation of
    confidence with DNA r, with the checks as they are and as they were."""
    out: dict[str, Any] = {"trusted": TRUSTED, "wrong": WRONG}
    dna = [r["dna_worst"] for r in rows.values()]
    for key in ("confidence", "confidence_before"):
        out[key] = {
            "trusted_but_wrong": [n for n, r in rows.items() if r[key] >= TRUSTED and r["dna_worst"] < WRONG],
            "flagged_but_right": [n for n, r in rows.items() if r[key] < TRUSTED and r["dna_worst"] >= WRONG],
            "spearman_with_dna_r": round(float(spearmanr([r[key] for r in rows.values()], dna)[0]), 3)
            if len(rows) > 2 else None,
        }
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| condition | DNA r | membrane r | mito r | DNA r worst field | confidence | "
             "checks as before | flags |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in result["rows"].items():
        p = r["pearson"]
        lines.append(f"| {name} | " + " | ".join(f"{p.get(s, float('nan')):.3f}" for s in STRUCTURES)
                     + f" | {r['dna_worst']:.3f} | {r['confidence']:.2f} | "
                     f"{r['confidence_before']:.2f} | {', '.join(r['flags']) or '-'} |")
    s = result["summary"]
    lines.append("")
    for key, label in (("confidence", "checks now"), ("confidence_before", "checks as before")):
        v = s[key]
        lines.append(f"{label}: trusted (confidence >= {TRUSTED}) but wrong (worst DNA r < {WRONG}): "
                     f"{len(v['trusted_but_wrong'])} {v['trusted_but_wrong']}; flagged but right: "
                     f"{len(v['flagged_but_right'])} {v['flagged_but_right']}; Spearman(confidence, DNA r) "
                     f"{v['spearman_with_dna_r']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 64 px, a few conditions")
    p.add_argument("--size", type=int, default=128, help="field width in pixels")
    p.add_argument("--only", nargs="+", default=None, help="conditions to run (by name)")
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                   help="the real datasets' rows (default: on, off with --quick or --only)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    a = p.parse_args(argv)
    seeds = R.HELD_OUT_SEEDS[:1] if a.quick else R.HELD_OUT_SEEDS
    size = 64 if a.quick else a.size
    only = a.only or (["default", "1 plane", "focus +12 um"] if a.quick else None)
    real = a.real if a.real is not None else not (a.quick or a.only)
    t0 = time.perf_counter()
    result = run(seeds, size, only, real)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(table(result))
    print(f"{len(result['rows'])} conditions x {len(seeds)} field(s) of {size} px in {result['total_seconds']} s")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far from its training acquisition is a model still right? Pearson r per structure
over held-out simulated conditions, one factor varied at a time.

Issue 11: the bundled model scores r ~0.97 (DNA) at its training acquisition (16
planes 1 um apart centred on the cells, 0.325 um pixels, NA 0.5 brightfield, 10 ms)
and far less off it. This bench is the instrument that says how much less, condition
by condition, and whether the worst condition meets the issue's targets (r >= 0.9 DNA,
>= 0.85 membrane, >= 0.7 mitochondria). Each condition is `devices.randomize`'s
``training_default`` with one entry changed, rendered for seeds the bundled model never
saw (it was trained on seed 101 and validated on seed 202, `livestain.bundled`), and
predicted as a user's stack would be: `inference.evaluate.evaluate_model` with the
stack's real voxel size, so the model's resampling to its own voxel applies.

    python bench/robustness.py [--model PATH] [--quick] [--json OUT]

Runtime on 2 shared CPU cores (CPU inference): 5 min full (16 conditions x 3 seeds,
256 px), about 1 min ``--quick`` (1 seed, 128 px).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from livestain.devices import randomize
from livestain.devices.pairs import Pair
from livestain.devices.sample import STRUCTURES

#: The issue's targets: a model is robust when its worst condition still meets them.
TARGETS = {"dna": 0.9, "membrane": 0.85, "mitochondria": 0.7}
#: Seeds of held-out fields: the bundled model was trained on 101 and validated on 202.
HELD_OUT_SEEDS = (7331, 8443, 9551)
TRAINING_SEEDS = (101, 202)


def _with(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(p: dict[str, Any]) -> dict[str, Any]:
        p = copy.deepcopy(p)
        for k, v in changes.items():
            p[k] = v
        if "n_planes" in changes or "z_step_um" in changes:
            p["z_range_um"] = (p["n_planes"] - 1) * p["z_step_um"]
        return p
    return edit


def conditions() -> list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]]:
    """(name, edit of the training-default parameters), one factor at a time.

    Focus offsets are from the training stack's centre (stage z 4 um); z range keeps the
    1 um step (more or fewer planes); z step keeps 16 planes; pixel size keeps the cell
    density (so a coarse pixel sees more cells), exposure scales the 10 ms.
    """
    density = {"kind": "typical", "density_per_1e4um2": round(randomize.DEFAULT_DENSITY, 3)}
    out: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [("default", _with())]
    out += [(f"focus {o:+d} um", _with(focus_offset_um=float(o))) for o in (-8, -4, 4, 8)]
    out += [(f"z range {r} um ({r} planes)", _with(n_planes=r)) for r in (8, 32, 40)]
    out += [(f"z step {s} um (16 planes)", _with(z_step_um=s)) for s in (0.3, 2.0)]
    out += [(f"pixel {px} um", _with(pixel_um=px, population=density)) for px in (0.2, 0.65)]
    out += [("exposure 0.25x", _with(exposure_ms=2.5)), ("exposure 4x", _with(exposure_ms=40.0))]
    out += [("dense colony", _with(population={
        "kind": "dense", "density_per_1e4um2": 25.0, "body_xy_um": [6.0, 10.0],
        "body_z_um": [2.5, 4.5], "max_overlap": 0.35, "attempts_per_cell": 10}))]
    out += [("phase contrast", _with(modality="phase", phase_ring_amplitude=0.5))]
    # optics and samples the grid above holds fixed (the issue's grid stops at phase
    # contrast; these are what a different microscope or sample brings)
    out += [(f"NA {na} (condenser {c})", _with(na_objective=na, na_condenser=c))
            for na, c in ((0.3, 0.2), (0.8, 0.5), (1.2, 0.55))]
    out += [("uneven illumination (5% tilt, 15% vignette)",
             _with(illumination_tilt=0.05, illumination_angle_rad=1.0, illumination_vignette=0.15))]
    out += [("dust (2 shadows)", _with(dust=[[0.3, 0.4, 10.0, 0.2], [0.7, 0.6, 6.0, 0.15]]))]
    out += [("rounded cells", _with(population={
        "kind": "rounded", "density_per_1e4um2": 3.0, "body_xy_um": [5.0, 8.0], "body_z_um": [4.5, 7.5],
        "nucleus_frac": [0.45, 0.55], "ri_scale": 0.85, "empty_fraction": 0.0}))]
    # DIC / oblique light (`devices.optics`: shear 0.25 um, bias 0.4 rad, 45 degrees):
    # no shipped model was trained on it; this row says how far off it is
    out += [("DIC (no model trained on it)", _with(modality="dic"))]
    return out


#: The issue's grid (the rows before the optics and samples added after it).
ISSUE_GRID_ROWS = 16


def render_condition(edit: Callable[[dict[str, Any]], dict[str, Any]], seeds: Sequence[int],
                     size: int) -> list[Pair]:
    """The condition's held-out fields, one per seed (tile (0, 0))."""
    params = edit(randomize.training_default())
    return [randomize.render(params, seed, (0, 0), size)[0] for seed in seeds]


def run(model: str | None, seeds: Sequence[int], size: int,
        only: Sequence[str] | None = None, device: str | None = None,
        focus_window: bool = True) -> dict[str, Any]:
    """Mean Pearson r per structure of every condition, the worst per structure, and
    whether it meets `TARGETS`."""
    from livestain.inference.evaluate import evaluate_model
    from livestain.inference.predict import Predictor

    if set(seeds) & set(TRAINING_SEEDS):
        raise ValueError(f"seeds {sorted(set(seeds) & set(TRAINING_SEEDS))} trained the bundled model")
    predictor = Predictor(model, device, focus_window=focus_window)
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    models: dict[str, str] = {}
    for name, edit in conditions():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        fields = render_condition(edit, seeds, size)
        res = evaluate_model(predictor, fields)
        rows[name] = {s: round(res["mean"][s]["pearson"], 4) for s in res["structures"]}
        models[name] = predictor.model.name  # the bundled models: the one routed to (last field)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: {rows[name]} ({seconds[name]} s)", flush=True)
    issue_grid = [name for name, _ in conditions()[:ISSUE_GRID_ROWS]]
    named = sorted(set(models.values())) or [predictor.model.name]
    return {"model": " + ".join(named) + (" (routed by modality)" if predictor.routes_modality else ""),
            "models": models, "seeds": list(seeds), "size": size, "focus_window": focus_window,
            "rows": rows, "worst": _worst(rows),
            "worst_issue_grid": _worst({n: r for n, r in rows.items() if n in issue_grid}),
            "seconds": seconds, "targets": TARGETS}


def _worst(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per structure: the condition with the lowest r, and whether it meets `TARGETS`."""
    worst = {}
    for s in STRUCTURES:
        vals = {n: r[s] for n, r in rows.items() if s in r}
        if vals:
            name = min(vals, key=vals.get)  # type: ignore[arg-type]
            worst[s] = {"condition": name, "pearson": vals[name], "target": TARGETS[s],
                        "meets": vals[name] >= TARGETS[s]}
    return worst


def table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, then the worst cell per structure."""
    lines = ["| condition | " + " | ".join(STRUCTURES) + " |",
             "|---|" + "---:|" * len(STRUCTURES)]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r.get(s, float('nan')):.3f}" for s in STRUCTURES) + " |")
    lines.append("")
    for title, key in (("the issue's grid", "worst_issue_grid"), ("every condition", "worst")):
        lines.append(f"{title}:")
        for s, w in result.get(key, {}).items():
            verdict = "meets" if w["meets"] else "MISSES"
            lines.append(f"  worst {s}: r = {w['pearson']:.3f} at '{w['condition']}' "
                         f"({verdict} the target >= {w['target']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--quick", action="store_true", help="1 seed, 128 px fields")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="held-out sample seeds")
    p.add_argument("--size", type=int, default=None, help="field width in pixels")
    p.add_argument("--only", nargs="+", default=None, help="conditions to run (by name)")
    p.add_argument("--device", default=None)
    p.add_argument("--focus-window", action=argparse.BooleanOptionalAction, default=True,
                   help="predict from the model's z window centred on the cells (default: on)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    a = p.parse_args(argv)
    seeds = a.seeds or (HELD_OUT_SEEDS[:1] if a.quick else HELD_OUT_SEEDS)
    size = a.size or (128 if a.quick else 256)
    t0 = time.perf_counter()
    result = run(a.model, seeds, size, a.only, a.device, a.focus_window)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"model: {result['model']}")
    print(table(result))
    print(f"{len(result['rows'])} conditions x {len(seeds)} field(s) of {size} px in "
          f"{result['total_seconds']} s")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

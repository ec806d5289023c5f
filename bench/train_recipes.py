"""`livestain train` recipes on real data, run as a user runs them: the command's own
defaults (steps and patch from the data, a validation strip of the training fields,
the best checkpoint kept, early stopping), then `livestain evaluate`'s Pearson r.

    .venv/bin/python bench/train_recipes.py [--quick] [--json OUT] [--only sephace|ndev]
        [--seeds 3] [--counts 1,all] [--recipes TEXT]

Recipes (each once per training seed, ``--seed``):

* ``scratch``: ``--mode 2.5d --z-window W`` (W = the stack's planes), and with
  ``--base-channels 16``, the bundled model's width (the command's default is 8): the
  control that tells what the bundled weights add from what its size adds;
* ``--init bundled``: the bundled 3D model flattened to a 2.5D network;
* ``--init bundled --sim-pretrain 16``: that network trained first on 16 simulated
  fields shaped like the data (its planes and pixel size), then fine-tuned;
* ``--sim-pretrain 16`` from scratch.

ndev's recipes with ``--sim-pretrain`` add ``--sim-modality dic`` (the simulator's
relief contrast, oblique light's stand-in) in a second row, and brightfield in the first.

The data are cut as in ``bench/transfer.py`` (sephace: Set1's quadrants 2x2 binned to
train, Set2's four native quadrants to test; ndev: quadrants of each time point, the
bottom-right one at all ten time points to test) and written as livestain dataset
folders, so the command reads them as it reads a user's.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_experiments as ex  # noqa: E402
import transfer as T  # noqa: E402
from livestain.cli import main as livestain  # noqa: E402
from livestain.inference.dataset import write_pairs  # noqa: E402


def recipes(split: T.Split) -> list[tuple[str, list[str]]]:
    w = ["--mode", "2.5d", "--z-window", str(split.z_window)]
    out = [("scratch", w), ("scratch --base-channels 16 (the bundled's width)", [*w, "--base-channels", "16"]),
           ("--init bundled", ["--init", "bundled", *w[:2]]),
           ("--init bundled --sim-pretrain 16", ["--init", "bundled", *w[:2], "--sim-pretrain", "16"]),
           ("--sim-pretrain 16 (scratch)", [*w, "--sim-pretrain", "16"])]
    if split.dataset == "ndev":
        out += [("--init bundled --sim-pretrain 16 --sim-modality dic",
                 ["--init", "bundled", *w[:2], "--sim-pretrain", "16", "--sim-modality", "dic"])]
    return out


def _run(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = livestain(argv)
    return rc, buf.getvalue()


def run_split(split: T.Split, counts: list[str], seeds: int, quick: bool, root: Path,
              log=print, match: str = "") -> dict[str, Any]:
    test_dir = root / f"{split.dataset}-test"
    write_pairs(split.test, test_dir)
    rows = []
    for label, n in split.field_counts():
        if not any(label.startswith(c) for c in counts):
            continue
        data = root / f"{split.dataset}-train-{n}"
        if not data.exists():
            write_pairs(split.train[:n], data)
        for index, (name, extra) in enumerate(recipes(split)):
            if match and not any(m in name for m in match.split("|")):
                continue
            if quick:  # tiny networks, a few steps, 2 simulated fields
                extra = [*(("2" if prev == "--sim-pretrain" else e) for prev, e in zip(["", *extra], extra)),
                         "--steps", "3", "--sim-steps", "3", "--depth", "1", "--base-channels", "4"]
            means, worst, secs = [], (1.0, ""), []
            for seed in range(seeds):
                out = root / f"{split.dataset}-{n}-recipe{index}-seed{seed}"
                t0 = time.perf_counter()
                rc, text = _run(["train", str(data), "--structures", "dna", "--out", str(out), "--seed", str(seed),
                                 *extra])
                secs.append(time.perf_counter() - t0)
                if rc != 0:
                    raise RuntimeError(f"{name} failed:\n{text[-2000:]}")
                rc, text = _run(["evaluate", str(out.with_suffix(".safetensors")), str(test_dir), "--json"])
                if rc != 0:
                    raise RuntimeError(f"evaluate failed:\n{text[-2000:]}")
                report = json.loads(text[text.index("{"):])
                crop = {f"field{i:03d}": f.name for i, f in enumerate(split.test)}  # write_pairs' names
                per = {crop.get(f, f): float(m["dna"]["pearson"]) for f, m in report["fields"].items()}
                means.append(float(np.mean(list(per.values()))))
                w = min(per.items(), key=lambda kv: kv[1])
                if w[1] < worst[0]:
                    worst = (w[1], w[0])
            row = {"dataset": split.dataset, "recipe": name, "fields": label, "mean_r": round(float(np.mean(means)), 4),
                   "per_seed": [round(m, 4) for m in means], "worst_r": round(worst[0], 4), "worst_crop": worst[1],
                   "seconds": round(float(np.mean(secs)), 1)}
            rows.append(row)
            log(f"[{split.dataset}] {label} field(s), {name}: r {row['mean_r']:.3f} (seeds "
                f"{' / '.join(f'{m:.3f}' for m in means)}), worst {row['worst_r']:.3f} ({worst[1]}), "
                f"{row['seconds']:.0f} s per training")
    return {"rows": rows}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | training fields | recipe | Pearson r mean | per seed | worst crop | s per training |",
             "|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['fields']} | `{r['recipe']}` | {r['mean_r']:.3f} | "
                     f"{' / '.join(f'{m:.3f}' for m in r['per_seed'])} | {r['worst_r']:.3f} ({r['worst_crop']}) | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny crops, networks and steps")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", choices=("sephace", "ndev"), default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--counts", default="1,all", help="training field counts: any of 1, 2, all (default: 1,all)")
    ap.add_argument("--recipes", default="", metavar="TEXT", help="only the recipes whose name contains TEXT (alternatives: A|B)")
    a = ap.parse_args(argv)
    counts = [c.strip() for c in a.counts.split(",")]
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": T.machine(), "rows": [], "skipped": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if a.only in (None, "sephace"):
            if ex.sephace_available():
                results["rows"] += run_split(T.sephace_split(a.quick), counts, a.seeds, a.quick, Path(tmp),
                                             match=a.recipes)["rows"]
            else:
                results["skipped"]["sephace"] = f"{ex.SEPHACE_DIR} is absent"
        if a.only in (None, "ndev"):
            if ex.ndev_path() is not None:
                results["rows"] += run_split(T.ndev_split(a.quick), counts, a.seeds, a.quick, Path(tmp),
                                             match=a.recipes)["rows"]
            else:
                results["skipped"]["ndev"] = "pip install --no-deps ndev-sampledata"
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(results["rows"]))
    print(f"done in {results['seconds']:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

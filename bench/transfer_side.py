"""Two more ways to start a real-data model from the bundled one, beside bench/transfer.py.

Issue 11 asks that fine-tuning from the bundled model beat training from scratch on every
real paired dataset. bench/transfer.py measured every start that changes the bundled
weights (flattened, adapted on the simulator first, at several rates): none beats
scratch on both datasets. Two reasons could remain, and each is measured here with a
control that differs from it in that one thing:

* **The fine-tune forgets what helps, or cannot unlearn what misleads** (negative
  transfer). *Side-tuning* (Zhang et al., ECCV 2020) keeps the bundled network frozen and
  trains a fresh U-Net (the bench's scratch size) that reads the brightfield planes
  **and** the bundled network's last decoder features and predictions (16 + 3 channels)
  as extra input channels. Nothing the bundled model knows is lost, and the fresh network
  can learn to ignore it. Control: the same side network with the bundled channels
  zeroed (same shape, same initialisation per seed), i.e. scratch.
* **The bundled features look at the wrong scale.** The simulated nuclei it learnt are
  ~24 px across; ndev's are ~12 px (sephace's training fields, 2x2 binned, ~29 px: already
  close). *Scale-matched fine-tune*: the training fields upsampled by the ratio (x2 for
  ndev) and the flattened bundled model fine-tuned on them as bench/transfer.py does
  (400 steps at 2e-3); the test crops are resampled by the `Predictor`, as for any model
  of another voxel size. Control: the bundled's size from scratch at the same scale.

Splits, test crops, seeds, steps and augmentation are bench/transfer.py's (its `Plan`),
so the rows compare with its table. Reproduce:

    .venv/bin/python bench/transfer_side.py --json docs/transfer_side.json   # ~35 min on 2 CPU cores
    .venv/bin/python bench/transfer_side.py --quick                          # smoke run, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from scipy import ndimage
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_experiments as ex  # noqa: E402
import transfer as tb  # noqa: E402
from livestain.inference import train as train_module  # noqa: E402
from livestain.inference.checkpoint import load_checkpoint  # noqa: E402
from livestain.inference.flatten import flatten_to_2_5d  # noqa: E402
from livestain.inference.model import UNet3D, UNetConfig, pad_to_multiple  # noqa: E402

ARMS = ("side-tuned on the bundled's features", "side network, bundled channels zeroed (control)",
        "fine-tuned from bundled at its nucleus scale", "scratch, the bundled's size, at that scale (control)")
#: Nucleus diameter (px) in the simulated fields the bundled model learnt from, at its
#: 0.325 um pixels (median equivalent diameter of the in-focus DNA blobs, 4 fields).
SIM_NUCLEUS_PX = 24.0
#: Scale ratios closer to 1 than this are left alone (the data are already at the bundled's scale).
MIN_RESCALE = 1.33


class BundledFeatures(nn.Module):
    """The frozen bundled network (flattened to 2.5D) as a feature extractor: its last
    decoder layer and its predictions, at the input's size. Always in evaluation mode, so
    its BatchNorm statistics stay those it was trained with."""

    def __init__(self, net: UNet3D) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.channels = net.config.base_channels + len(net.config.structures)

    def train(self, mode: bool = True) -> BundledFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        h = self.net.decoder_features(pad_to_multiple(x, self.net.multiple))
        h = torch.cat([h, self.net.head(h)], dim=1)
        return h[(Ellipsis, *(slice(0, s) for s in size))]


class SideTuned(nn.Module):
    """A fresh 2.5D U-Net reading the brightfield planes beside the bundled features.

    ``config`` is the data's 2.5D config (what `train` samples patches for); the side
    network's own config reads ``z_window + features`` channels. ``use_features`` False
    zeroes the bundled channels: the control, identical in shape and initialisation."""

    def __init__(self, config: UNetConfig, features: BundledFeatures, side_config: UNetConfig,
                 use_features: bool = True) -> None:
        super().__init__()
        self.config = config
        self.features = features
        self.side = UNet3D(side_config)
        self.use_features = use_features

    @property
    def multiple(self) -> int:
        return max(self.features.net.multiple, self.side.multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).to(x.dtype)
        return self.side(torch.cat([x, f if self.use_features else torch.zeros_like(f)], dim=1))


def side_fit(fields: Sequence[ex.RealField], config: UNetConfig, features: BundledFeatures, plan: tb.Plan,
             settings: train_module.TrainSettings, use_features: bool) -> tuple[Any, float]:
    """`transfer.fit` with `SideTuned` as the network `train` builds (it builds a
    `UNet3D(config)` itself; the patch swaps that one name for the duration)."""
    side_cfg = UNetConfig(structures=config.structures, depth=plan.depth, base_channels=plan.base_channels,
                          mode="2.5d", z_window=1, in_channels=config.z_window + features.channels)

    def build(cfg: UNetConfig) -> SideTuned:
        return SideTuned(cfg, features, side_cfg, use_features)

    with mock.patch.object(train_module, "UNet3D", build):
        return tb.fit(fields, config, settings, "side", log=lambda s: None)


def nucleus_diameter_px(stain: np.ndarray) -> float:
    """Median equivalent diameter of the bright blobs of a nuclear stain (smoothed,
    thresholded at 30% between its 5th and 99.5th percentiles; blobs of 20 px or more)."""
    img = ndimage.gaussian_filter(np.asarray(stain, np.float32).squeeze(), 1.0)
    lo, hi = np.percentile(img, [5, 99.5])
    labels, n = ndimage.label(img > lo + 0.3 * (hi - lo))
    areas = np.asarray(ndimage.sum(np.ones_like(img), labels, range(1, n + 1)))
    areas = areas[areas >= 20]
    return float(np.median(2 * np.sqrt(areas / np.pi))) if areas.size else float("nan")


def zoomed(f: ex.RealField, k: float) -> ex.RealField:
    """``f`` resampled by ``k`` in y and x (linear), its pixel size divided by ``k``."""
    bf = ndimage.zoom(np.asarray(f.brightfield, np.float32), (1, k, k), order=1)
    t = np.asarray(f.targets, np.float32)
    targets = ndimage.zoom(t, (1,) * (t.ndim - 2) + (k, k), order=1)
    v = f.voxel_size_um
    return ex.RealField(f.name, bf, targets, f.structures, (v[0], v[1] / k, v[2] / k))


def run_dataset(split: tb.Split, plan: tb.Plan, bundled: Any, log: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.perf_counter()
    name, seeds = split.dataset, range(plan.seeds)
    cfg = UNetConfig(structures=("dna",), depth=plan.depth, base_channels=plan.base_channels, mode="2.5d",
                     z_window=split.z_window)
    flat_cfg = replace(bundled.meta.config, mode="2.5d", z_window=split.z_window, structures=("dna",))
    features = BundledFeatures(flatten_to_2_5d(bundled.net, split.z_window))
    rows: list[dict[str, Any]] = []

    def arm(label: str, fields: Sequence[ex.RealField], fit_one: Callable[[Sequence[ex.RealField], int], Any],
            **extra: Any) -> None:
        for count, n in split.field_counts():
            per_seed, seconds = [], 0.0
            for seed in seeds:
                model, sec = fit_one(fields[:n], seed)
                per_seed.append(tb.score_2_5d(model, split.test))
                seconds += sec
            row = tb._row(name, label, count, n, per_seed, seconds / len(per_seed), **extra)
            rows.append(row)
            log(f"[{name}] {label}, {count} field(s): r mean {row['r_mean']:.3f} "
                f"(per seed {row.get('r_mean_per_seed')}), worst {row['r_worst']:.3f} ({row['worst_crop']})")

    def settings(seed: int) -> train_module.TrainSettings:
        return plan.settings(plan.steps, split.z_window, plan.lr, seed)

    for label, use in ((ARMS[0], True), (ARMS[1], False)):
        arm(label, split.train, lambda fs, seed, use=use: side_fit(fs, cfg, features, plan, settings(seed), use))

    measured = nucleus_diameter_px(split.train[0].targets[0])
    ratio = SIM_NUCLEUS_PX / measured
    scale = {"data_nucleus_px": round(measured, 1), "bundled_nucleus_px": SIM_NUCLEUS_PX, "ratio": round(ratio, 2)}
    if not np.isfinite(ratio) or max(ratio, 1 / ratio) < MIN_RESCALE:
        log(f"[{name}] nuclei {measured:.0f} px against the bundled's {SIM_NUCLEUS_PX:.0f}: at its scale (or no "
            "nuclei measured), no scale-matched arm")
    else:
        k = float(np.round(ratio * 2) / 2)  # to the nearest half: x2 for ndev
        scale["zoom"] = k
        log(f"[{name}] nuclei {measured:.0f} px against the bundled's {SIM_NUCLEUS_PX:.0f}: training fields x{k:g}")
        big = [zoomed(f, k) for f in split.train]

        def flat() -> UNet3D:
            return flatten_to_2_5d(bundled.net, split.z_window)

        arm(ARMS[2], big, lambda fs, seed: tb.fit(fs, flat_cfg, settings(seed), "scaled", init=flat(),
                                                  log=lambda s: None), zoom=k)
        arm(ARMS[3], big, lambda fs, seed: tb.fit(fs, flat_cfg, settings(seed), "scaled-scratch",
                                                  log=lambda s: None), zoom=k)
    return {"split": split.description, "train_fields": [f.name for f in split.train],
            "test_crops": [f.name for f in split.test], "nucleus_scale": scale, "rows": rows,
            "seconds": round(time.perf_counter() - t_start, 1)}


def run(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse ``argv``, run, print the table; returns the results (also the JSON's content)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny crops and network, a few steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--only", choices=("sephace", "ndev"), default=None)
    ap.add_argument("--seeds", type=int, default=None, help="training seeds per arm (default 3)")
    a = ap.parse_args(argv)
    plan = tb.Plan.quick_plan() if a.quick else tb.Plan()
    if a.seeds is not None:
        plan = replace(plan, seeds=a.seeds)
    threads = torch.get_num_threads()
    if plan.quick:
        torch.set_num_threads(1)
    try:
        log(f"plan: {json.dumps(plan.__dict__)}")
        t0 = time.perf_counter()
        bundled = load_checkpoint(None, "cpu")
        results: dict[str, Any] = {"plan": dict(plan.__dict__), "machine": tb.machine(), "datasets": {},
                                   "skipped": {}}
        if a.only in (None, "sephace"):
            if ex.sephace_available():
                results["datasets"]["sephace"] = run_dataset(tb.sephace_split(plan.quick), plan, bundled, log)
            else:
                results["skipped"]["sephace"] = f"{ex.SEPHACE_DIR} is absent"
        if a.only in (None, "ndev"):
            if ex.ndev_path() is not None:
                results["datasets"]["ndev"] = run_dataset(tb.ndev_split(plan.quick), plan, bundled, log)
            else:
                results["skipped"]["ndev"] = "ndev-sampledata is not installed (pip install --no-deps ndev-sampledata)"
        for name, why in results["skipped"].items():
            log(f"{name}: skipped ({why})")
        results["seconds"] = round(time.perf_counter() - t0, 1)
        results["table"] = tb.table(results)
        log("")
        log(results["table"])
        log(f"done in {results['seconds']:.0f} s")
        if a.json:
            a.json.write_text(json.dumps(results, indent=2, default=tb._json_default))
        return results
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    run()

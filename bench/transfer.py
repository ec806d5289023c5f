"""Zero-shot, from scratch, or fine-tuned? Measured on every real paired dataset, with
1, 2 and all training fields (issue 11, item 3).

    .venv/bin/python bench/transfer.py [--quick] [--json OUT] [--only sephace|ndev]
        [--steps 400] [--finetune-steps 400] [--pretrain-steps 600] [--seeds 3] [--precision auto]
        [--ndev-sim brightfield|dic]

Datasets (each skipped, with a line saying so, when absent):

* ``sephace`` (``../shared/data/sephace_bf_dapi``): two fields, each a 6-plane
  brightfield defocus series (-24, -10, ~0, ~0, +10, +25 um) and one DAPI image.
  Each field is tiled into its 4 quadrants (512 x 672 native pixels, 103 x 135 um).
  Test: the 4 quadrants of Set2 (never trained on, by any arm). Training fields: the
  quadrants of Set1 in raster order (1 = top-left, 2 = top row, all = 4), 2 x 2 binned
  for training as in `real_experiments` (0.40 um pixels).
* ``ndev`` (``pip install --no-deps ndev-sampledata``): one field of a scratch assay,
  10 time points of a 210 x 576 oblique transmitted-light image and its Hoechst image.
  Each time point is tiled into its 4 quadrants (105 x 288 px). Test: the bottom-right
  quadrant at all 10 time points (10 crops). Training fields: the other three quadrants
  in time-then-raster order (1 = top-left at t0, 2 = top-left and top-right at t0,
  all = 3 quadrants x 10 time points = 30). No test crop overlaps a training crop in
  space (the same cells are never in both, except cells migrating across the border).

Arms, every one scored by Pearson r of the predicted DNA against the measured stain on
every test crop (mean and worst):

* ``zero-shot (bundled 3D)``: the bundled model as ``livestain predict`` applies it: a
  `Predictor` given the data's voxel size (sephace: the defocus series' mean spacing,
  9.84 um, in z, 0.2004 um pixels; ndev: the placeholder 1 um the loader uses, its
  pixel size is not recorded), its ``dna`` channel compared with the stain at the
  in-focus planes (sephace: the mean of the two in-focus planes; ndev: the one plane).
  The JSON also has the maximum projection over z.
* ``bundled, flattened to 2.5D``: the bundled network turned into a 2.5D one of its
  depth and width (`livestain.inference.flatten`), untrained on real fields; then
  ``fine-tuned from bundled (flattened)`` on 1, 2 or all training fields, as ``livestain
  train --init bundled`` does on one-plane truth (``--steps`` steps at the from-scratch
  rate).
* ``bundled, then sim-pretrained`` (0 fields) and ``fine-tuned (bundled, then sim)``:
  the flattened bundled network trained on the same simulated fields as the
  ``sim-pretrained 2.5D`` arm below, then fine-tuned as that arm is: the bundled
  model, adapted on the simulator to the data's plane geometry, then to the data.
* ``scratch (2.5D)``: the 2.5D model `real_experiments` trains (depth 3, 16
  channels; sephace a 6-plane window, ndev a 1-plane one) on the first 1, 2 or all
  training fields, ``--steps`` steps; ``scratch (2.5D, the bundled's size)`` the same
  at the bundled model's depth and width (the control for the bundled fine-tune).
* ``sim-pretrained 2.5D``, with 0 fields: the same architecture trained only on
  simulated fields rendered with the dataset's geometry (sephace: the same 6 defocus
  offsets; ndev: one brightfield plane within +/-3 um of focus, 2 x 2 binned to
  roughly ndev's nucleus size), ``--pretrain-steps`` steps; then ``fine-tuned (sim
  2.5D)`` on 1, 2 or all real training fields, ``--finetune-steps`` steps at a quarter
  of the learning rate (as ``livestain train --init`` does).

Every arm trains with fixed steps and keeps its last weights (no validation: the only
held-out data are the test crops, and selecting weights on them would bias the scores).
Each arm that trains on real fields runs once per training seed (``--seeds``, default
3: seeds 0, 1, 2); its row's mean is over the seeds, its worst the worst crop of any.
The simulation seed is 4242. Results: docs/transfer.md. Models are kept in memory,
nothing is written except ``--json``. ``--quick`` is a smoke run on tiny crops and a
tiny network (seconds; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import real_experiments as ex
from livestain.inference.checkpoint import LoadedModel, ModelMeta, load_checkpoint
from livestain.inference.evaluate import evaluate_model
from livestain.inference.flatten import flatten_to_2_5d
from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.normalize import PercentileNorm, zscore
from livestain.inference.predict import Predictor
from livestain.inference.train import TrainSettings, pearson, train

#: Defocus of the sephace planes from the in-focus pair (um): stage z of Set1 and Set2
#: (PROVENANCE.txt) minus the mean of their planes 2 and 3, averaged over both sets.
SEPHACE_OFFSETS_UM = (-24.3, -9.9, -0.3, 0.3, 10.1, 25.1)
#: Their mean spacing: the one z step a user can give ``livestain predict`` for them.
SEPHACE_MEAN_STEP_UM = 9.84
SEPHACE_IN_FOCUS = (2, 3)
SIM_SEED = 4242
#: Stage z (um) of the simulated cells' middle (`devices.pairs.default_z_planes`).
SIM_FOCUS_UM = 4.0
ARMS = ("zero-shot (bundled 3D)", "bundled, flattened to 2.5D", "fine-tuned from bundled (flattened)",
        "scratch (2.5D)", "scratch (2.5D, the bundled's size)", "sim-pretrained 2.5D", "fine-tuned (sim 2.5D)",
        "bundled, then sim-pretrained", "fine-tuned (bundled, then sim)")
#: Arms that train on real fields, once per training seed.
TRAINED = ARMS[2:5] + ARMS[6:7] + ARMS[8:]


@dataclass(frozen=True)
class Plan:
    """Sizes and steps of one run (printed at its start and stored in the JSON)."""

    steps: int = 400
    finetune_steps: int = 400
    pretrain_steps: int = 600
    lr: float = 2e-3
    patch: int = 96
    batch: int = 8
    depth: int = 3
    base_channels: int = 16
    sim_fields: int = 16
    sim_size: int = 256
    precision: str = "auto"
    seeds: int = 3
    quick: bool = False

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(steps=3, finetune_steps=2, pretrain_steps=3, patch=16, batch=2, depth=1, base_channels=4,
                   sim_fields=2, sim_size=64, precision="fp32", seeds=2, quick=True)

    def settings(self, steps: int, z: int, lr: float | None = None, seed: int = 0) -> TrainSettings:
        # the augmentation of `real_experiments` (real data vary in exposure and contrast)
        return TrainSettings(steps=steps, patch=(z, self.patch, self.patch), batch=self.batch, seed=seed,
                             lr=self.lr if lr is None else lr, intensity=0.1, gamma=0.2, noise=0.03,
                             precision=self.precision)


@dataclass
class Split:
    """One dataset cut into training fields (in the order they are added) and a fixed test set."""

    dataset: str
    train: list[ex.RealField]  # at training resolution (sephace: 2 x 2 binned)
    test: list[ex.RealField]  # native resolution, scored through the `Predictor`
    z_window: int
    zero_shot_voxel_um: tuple[float, float, float]
    in_focus: tuple[int, ...]
    sim_offsets_um: tuple[float, ...]
    sim_focus_jitter_um: float
    sim_binning: int
    description: str
    #: transmitted-light contrast of the simulated pretraining fields (`devices.optics.MODALITIES`)
    sim_modality: str = "brightfield"

    def field_counts(self) -> list[tuple[str, int]]:
        n = len(self.train)
        return [(label, k) for label, k in (("1", 1), ("2", 2), (f"all ({n})", n)) if k <= n]


def quadrants(f: ex.RealField, name: str) -> list[ex.RealField]:
    """The 4 non-overlapping quadrants of a field, in raster order, named ``name.q0``..``q3``."""
    ny, nx = f.brightfield.shape[-2] // 2, f.brightfield.shape[-1] // 2
    out = []
    for q in range(4):
        y, x = divmod(q, 2)
        c = f.crop(y * ny, x * nx, ny, nx)
        out.append(ex.RealField(f"{name}.q{q}", c.brightfield, c.targets, c.structures, c.voxel_size_um))
    return out


def sephace_split(quick: bool = False, root: Path = ex.SEPHACE_DIR) -> Split:
    set1, set2 = ex.load_sephace(root)
    if quick:  # the centre 128 x 128
        y0, x0 = (set1.brightfield.shape[1] - 128) // 2, (set1.brightfield.shape[2] - 128) // 2
        set1, set2 = set1.crop(y0, x0, 128, 128), set2.crop(y0, x0, 128, 128)
    train_fields = [q.binned(2) for q in quadrants(set1, "Set1")]
    test_fields = quadrants(set2, "Set2")
    ny, nx = test_fields[0].brightfield.shape[1:]
    return Split(
        "sephace", train_fields, test_fields, z_window=set1.brightfield.shape[0],
        zero_shot_voxel_um=(SEPHACE_MEAN_STEP_UM, ex.SEPHACE_PIXEL_UM, ex.SEPHACE_PIXEL_UM),
        in_focus=SEPHACE_IN_FOCUS, sim_offsets_um=SEPHACE_OFFSETS_UM, sim_focus_jitter_um=1.0, sim_binning=1,
        description=(f"fields = quadrants ({ny}x{nx} native px); test: Set2 q0-q3; training: Set1 q0, q0-q1, "
                     "q0-q3 (2x2 binned)"))


def ndev_split(quick: bool = False, sim_modality: str = "brightfield") -> Split:
    fields = ex.load_ndev()
    if quick:  # the first 3 time points, top-left 64 x 128
        fields = [f.crop(0, 0, 64, 128) for f in fields[:3]]
    tiles = [quadrants(f, f.name) for f in fields]
    train_fields = [t[q] for t in tiles for q in (0, 1, 2)]
    test_fields = [t[3] for t in tiles]
    ny, nx = test_fields[0].brightfield.shape[1:]
    return Split(
        "ndev", train_fields, test_fields, z_window=1, zero_shot_voxel_um=(1.0, 1.0, 1.0), in_focus=(0,),
        sim_offsets_um=(0.0,), sim_focus_jitter_um=3.0, sim_binning=2, sim_modality=sim_modality,
        description=(f"fields = quadrants ({ny}x{nx} px) of each time point; test: q3 (bottom right) at "
                     f"t0-t{len(fields) - 1}; training: q0-q2 in time-then-raster order (t0.q0, t0.q1, ...)"))


# ------------------------------------------------------------------ simulated pretraining data


def simulate_fields(split: Split, n: int, size: int, seed: int = SIM_SEED) -> list[ex.RealField]:
    """``n`` simulated fields with ``split``'s plane geometry: brightfield planes at the
    dataset's defocus offsets around a focus drawn within +/- the split's jitter of the
    cells' middle, and the DNA fluorescence in focus there (what a widefield DAPI or
    Hoechst image is). ``split.sim_modality`` "dic" draws the relief's shear, bias and
    direction per field (oblique light's relief varies with the condenser's setting)."""
    from livestain.devices.optics import FieldRenderer, OpticsConfig, to_camera_counts
    from livestain.devices.sample import CellPopulation, SampleGeometry, make_field

    geo = SampleGeometry(shape=(40, size, size))
    rng = np.random.default_rng(seed)
    grid = geo.plane_z_um()
    out = []
    for i in range(n):
        field = make_field(seed, (i, 7), geo, CellPopulation())
        focus = SIM_FOCUS_UM + float(rng.uniform(-split.sim_focus_jitter_um, split.sim_focus_jitter_um))
        opt = OpticsConfig(modality=split.sim_modality)
        if split.sim_modality == "dic":
            opt = replace(opt, dic_shear_um=float(rng.uniform(0.15, 0.5)), dic_bias_rad=float(rng.uniform(0.3, 1.5)),
                          dic_angle_deg=float(rng.uniform(0.0, 360.0)))
        zs = focus + np.asarray(split.sim_offsets_um)
        beyond = max(grid[0] - zs.min(), zs.max() - grid[-1], 0.0)
        r = FieldRenderer(field, opt, z_margin_um=beyond + 1.0 if beyond > 0 else 0.0)
        noise = np.random.default_rng([seed, i, 7])
        bf = np.stack([to_camera_counts(r.brightfield(z), opt.bf_photons_per_ms * 10.0, opt, noise) for z in zs])
        dna = r.fluorescence("dna", SIM_FOCUS_UM)[None].astype(np.float32)
        f = ex.RealField(f"sim{i}", bf.astype(np.float32), dna, ("dna",),
                         (1.0, opt.pixel_size_um, opt.pixel_size_um)).binned(split.sim_binning)
        out.append(f)
    return out


# ------------------------------------------------------------------ arms


def _in_memory(net: UNet3D, config: UNetConfig, voxel: Sequence[float], name: str) -> LoadedModel:
    """A trained network as a `LoadedModel` without writing a file (the `Predictor` takes it)."""
    return LoadedModel(net=net.eval(), meta=ModelMeta(config, PercentileNorm(), tuple(voxel)),
                       path=Path(f"{name}.safetensors"), fingerprint="in-memory")


def fit(fields: Sequence[ex.RealField], config: UNetConfig, settings: TrainSettings, name: str,
        init: UNet3D | None = None, log: Callable[[str], None] = print) -> tuple[LoadedModel, float]:
    """Train (or fine-tune from ``init``) on ``fields`` with no validation; (model, seconds)."""
    every = max(1, settings.steps // 4)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step == settings.steps:
            log(f"    step {step}/{settings.steps} loss {loss:.4f}")

    torch.manual_seed(settings.seed)  # the fresh network's (and a fresh head row's) initialisation
    res = train([f.as_pair() for f in fields], [], config, settings, PercentileNorm(), on_step=on_step, init=init)
    return _in_memory(res.net, config, fields[0].voxel_size_um, name), float(res.seconds)


def score_2_5d(model: LoadedModel, test: Sequence[ex.RealField]) -> dict[str, float]:
    """Pearson r of DNA per test crop, through the `Predictor` (native resolution,
    resampled to the model's voxel size and back) as ``livestain evaluate`` scores."""
    report = evaluate_model(Predictor(model, "cpu"), test)
    return {name: float(m["dna"]["pearson"]) for name, m in report["fields"].items()}


def zero_shot(split: Split, bundled: LoadedModel) -> tuple[dict[str, float], dict[str, float]]:
    """The bundled 3D model's DNA vs the stain: (r at the in-focus planes, r of the z maximum) per test crop."""
    predictor = Predictor(bundled, "cpu")
    k = predictor.structures.index("dna")
    at_focus, projected = {}, {}
    for f in split.test:
        dna = predictor.predict(np.asarray(f.brightfield, np.float32), split.zero_shot_voxel_um)[k]
        truth = zscore(f.targets[0])
        at_focus[f.name] = pearson(dna[list(split.in_focus)].mean(axis=0), truth)
        projected[f.name] = pearson(dna.max(axis=0), truth)
    return at_focus, projected


def plane_baseline(split: Split) -> dict[str, Any]:
    """Context: the best sign-corrected r of one normalised brightfield plane with the
    stain, mean over the test crops (chosen on the test crops: optimistic)."""
    b = ex.plane_baseline(split.test, PercentileNorm())
    return {"best_plane": b["best_plane"], "best_abs_r": round(b["best_abs_r"], 4)}


def _row(dataset: str, arm: str, fields: str, n: int, per_crop: dict[str, float] | list[dict[str, float]] | None,
         seconds: float | None, note: str = "", **extra: Any) -> dict[str, Any]:
    """One table row. ``per_crop``: r per test crop, or a list of them, one per training
    seed: then the mean is over seeds and crops, the worst the worst crop of any seed,
    and ``r_mean_per_seed`` says how much the seed moves it."""
    row: dict[str, Any] = {"dataset": dataset, "arm": arm, "fields": fields, "n_fields": n,
                           "train_seconds": None if seconds is None else round(seconds, 1), "note": note}
    runs = per_crop if isinstance(per_crop, list) else [per_crop] if per_crop else []
    if runs:
        means = [float(np.mean(list(r.values()))) for r in runs]
        crop, worst = min(((c, v) for r in runs for c, v in r.items()), key=lambda cv: cv[1])
        row.update(r_mean=round(float(np.mean(means)), 4), r_worst=round(worst, 4), worst_crop=crop,
                   r_per_crop={c: round(float(np.mean([r[c] for r in runs])), 4) for c in runs[0]})
        if len(runs) > 1:
            row.update(r_mean_per_seed=[round(m, 4) for m in means])
    else:
        row.update(r_mean=None, r_worst=None, worst_crop=None, r_per_crop={})
    row.update(extra)
    return row


def run_dataset(split: Split, plan: Plan, bundled: LoadedModel, log: Callable[[str], None] = print
                ) -> dict[str, Any]:
    t_start = time.perf_counter()
    name = split.dataset
    cfg = UNetConfig(structures=("dna",), depth=plan.depth, base_channels=plan.base_channels, mode="2.5d",
                     z_window=split.z_window)
    b = bundled.meta.config
    # the bundled network as `livestain train --init bundled` starts it on one-plane truth
    flat_cfg = replace(b, mode="2.5d", z_window=split.z_window, structures=("dna",))
    seeds = range(plan.seeds)
    log(f"[{name}] {split.description}; {len(split.train)} training fields, {len(split.test)} test crops; "
        f"training seeds {list(seeds)}")
    rows: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        spread = f" (per seed {row['r_mean_per_seed']})" if "r_mean_per_seed" in row else ""
        log(f"    r mean {row['r_mean']:.3f}{spread}, worst {row['r_worst']:.3f} ({row['worst_crop']})")

    log(f"[{name}] zero-shot: bundled model, voxel size {split.zero_shot_voxel_um} um")
    t0 = time.perf_counter()
    at_focus, projected = zero_shot(split, bundled)
    report(_row(name, ARMS[0], "0", 0, at_focus, 0.0,
                note=f"DNA at the in-focus plane{'s' if len(split.in_focus) > 1 else ''} "
                     f"{','.join(map(str, split.in_focus))}; z-max projection r mean "
                     f"{np.mean(list(projected.values())):.3f}",
                r_per_crop_zmax={k: round(v, 4) for k, v in projected.items()},
                predict_seconds=round(time.perf_counter() - t0, 1)))

    def flat_bundled() -> UNet3D:
        return flatten_to_2_5d(bundled.net, split.z_window)

    log(f"[{name}] the bundled model flattened to 2.5D ({split.z_window}-plane window), untrained on real fields")
    report(_row(name, ARMS[1], "0", 0,
                score_2_5d(_in_memory(flat_bundled(), replace(flat_cfg, structures=b.structures),
                                      split.train[0].voxel_size_um, f"{name}-flat"), split.test), 0.0))

    def trained(arm: str, config: UNetConfig, steps: int, lr: float, init: Callable[[], UNet3D] | None) -> None:
        for label, n in split.field_counts():
            log(f"[{name}] {arm}, {label} training field(s): {steps} steps, lr {lr:g}, seeds {list(seeds)}")
            per_seed, seconds = [], 0.0
            for seed in seeds:
                model, sec = fit(split.train[:n], config, plan.settings(steps, split.z_window, lr, seed),
                                 f"{name}-{arm}-{n}-{seed}", init=init() if init else None, log=lambda s: None)
                per_seed.append(score_2_5d(model, split.test))
                seconds += sec
            report(_row(name, arm, label, n, per_seed, seconds / len(per_seed),
                        train_fields=[f.name for f in split.train[:n]]))

    trained(ARMS[2], flat_cfg, plan.steps, plan.lr, flat_bundled)
    trained(ARMS[3], cfg, plan.steps, plan.lr, None)
    trained(ARMS[4], replace(flat_cfg), plan.steps, plan.lr, None)

    log(f"[{name}] simulating {plan.sim_fields} fields of {plan.sim_size} px "
        f"(offsets {split.sim_offsets_um} um, focus +/-{split.sim_focus_jitter_um} um, binning {split.sim_binning})")
    t0 = time.perf_counter()
    sim = simulate_fields(split, plan.sim_fields, plan.sim_size)
    sim_seconds = time.perf_counter() - t0
    def pretrain_then_finetune(pre_arm: str, tuned_arm: str, config: UNetConfig, tag: str,
                               init: UNet3D | None, extra_seconds: float, note: str) -> None:
        """Train on the simulated fields (scored as ``pre_arm``), then fine-tune a copy of
        those weights on the real fields per seed (``tuned_arm``) at a quarter rate."""
        pre, sec = fit(sim, config, plan.settings(plan.pretrain_steps, split.z_window), f"{name}-{tag}",
                       init=init, log=log)
        pre = _in_memory(pre.net, config, split.train[0].voxel_size_um, f"{name}-{tag}")  # at the data's voxel
        report(_row(name, pre_arm, "0", 0, score_2_5d(pre, split.test), sec + extra_seconds, note=note))
        weights = {k: v.clone() for k, v in pre.net.state_dict().items()}

        def pretrained() -> UNet3D:
            net = UNet3D(config)
            net.load_state_dict(weights)
            return net

        trained(tuned_arm, config, plan.finetune_steps, plan.lr / 4, pretrained)

    log(f"[{name}] pretraining on the simulated fields: {plan.pretrain_steps} steps")
    pretrain_then_finetune(ARMS[5], ARMS[6], cfg, "sim", None, sim_seconds,
                           f"{plan.sim_fields} simulated fields, {sim_seconds:.0f} s to simulate")
    log(f"[{name}] pretraining the flattened bundled model on the same simulated fields: {plan.pretrain_steps} steps")
    pretrain_then_finetune(ARMS[7], ARMS[8], flat_cfg, "bundled-sim", flat_bundled(), 0.0,
                           "the flattened bundled model trained on the simulated fields above")

    return {"split": split.description, "train_fields": [f.name for f in split.train],
            "test_crops": [f.name for f in split.test], "baseline_best_plane": plane_baseline(split),
            "rows": rows, "seconds": round(time.perf_counter() - t_start, 1)}


# ------------------------------------------------------------------ report


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(results: dict[str, Any]) -> str:
    lines = ["| dataset | arm | training fields | Pearson r mean | per training seed | Pearson r worst (crop) "
             "| training s |", "|---|---|---|---:|---|---:|---:|"]
    for ds in results["datasets"].values():
        for r in ds["rows"]:
            worst = _fmt(r["r_worst"]) + (f" ({r['worst_crop']})" if r["worst_crop"] else "")
            sec = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
            per_seed = " / ".join(f"{v:.3f}" for v in r.get("r_mean_per_seed", []))
            lines.append(f"| {r['dataset']} | {r['arm']} | {r['fields']} | {_fmt(r['r_mean'])} | {per_seed} | {worst} "
                         f"| {sec} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}


def run(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse ``argv``, run the bench, print the table; returns the results (also the JSON's content)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny crops and network, a few steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--only", choices=("sephace", "ndev"), default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps of a training from scratch (default 400)")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="steps of a fine-tune from the simulated model (default 400, as from scratch)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="training seeds per arm (default 3): each trained arm's mean is over them, its worst "
                         "crop the worst of any")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="steps of the simulated-data pretraining (default 600)")
    ap.add_argument("--ndev-sim", choices=("brightfield", "dic"), default="brightfield",
                    help="contrast of ndev's simulated pretraining fields: brightfield (default) or dic, the "
                         "simulator's relief contrast that stands for ndev's oblique light")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                    help="training precision (default auto: bf16 where the CPU has it natively)")
    a = ap.parse_args(argv)
    plan = Plan.quick_plan() if a.quick else Plan()
    changes = {k: v for k, v in (("steps", a.steps), ("finetune_steps", a.finetune_steps),
                                 ("pretrain_steps", a.pretrain_steps), ("precision", a.precision),
                                 ("seeds", a.seeds)) if v is not None}
    plan = replace(plan, **changes)
    threads = torch.get_num_threads()
    if plan.quick:  # tiny tensors: threading costs more than it gains (8x slower on a busy 2-core CPU)
        torch.set_num_threads(1)
    try:
        return _run(a, plan, log)
    finally:
        torch.set_num_threads(threads)


def _run(a: argparse.Namespace, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"plan: {json.dumps(plan.__dict__)}")
    log(f"machine: {json.dumps(machine())}")
    t0 = time.perf_counter()
    bundled = load_checkpoint(None, "cpu")
    results: dict[str, Any] = {"plan": dict(plan.__dict__), "machine": machine(), "datasets": {}, "skipped": {},
                               "ndev_sim_modality": a.ndev_sim}
    if a.only in (None, "sephace"):
        if ex.sephace_available():
            results["datasets"]["sephace"] = run_dataset(sephace_split(plan.quick), plan, bundled, log)
        else:
            results["skipped"]["sephace"] = f"{ex.SEPHACE_DIR} is absent"
            log(f"sephace: skipped ({ex.SEPHACE_DIR} is absent)")
    if a.only in (None, "ndev"):
        if ex.ndev_path() is not None:
            results["datasets"]["ndev"] = run_dataset(ndev_split(plan.quick, a.ndev_sim), plan, bundled, log)
        else:
            results["skipped"]["ndev"] = "ndev-sampledata is not installed (pip install --no-deps ndev-sampledata)"
            log("ndev: skipped (pip install --no-deps ndev-sampledata)")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["table"] = table(results)
    log("")
    log(results["table"])
    for name, ds in results["datasets"].items():
        b = ds["baseline_best_plane"]
        log(f"{name}: best single brightfield plane |r| {b['best_abs_r']:.3f} (plane {b['best_plane']}, "
            "chosen on the test crops)")
    log(f"done in {results['seconds']:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=_json_default))
    return results


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o)}")


if __name__ == "__main__":
    run()

"""Real-data experiments: the training pipeline on real brightfield, not the simulator.

A benchmark helper, not shipped in the package (it reads ``../shared`` beside the
clone); `bench/real_data.py` and `bench/transfer.py` import it.

Two public datasets, each used the way the issue asks:

``sephace`` (``../shared/data/sephace_bf_dapi``, Ali & Gooding; non-commercial research
licence, never copied into the project)
    Two fields of adherent cells (Nikon 90i, 40x air, 8-bit, 1344x1024, 0.2004 um px),
    each a 6-plane brightfield defocus series (-25, -10, ~0, ~0, +10, +25 um around
    focus) paired with one DAPI image. A 2.5D model sees all 6 planes and predicts the
    DAPI plane. Trained on field Set1, scored on field Set2 (never seen in training).
    Data are 2x2-binned for training (0.40 um px: nuclei of 10-20 um still span 25-50
    px); evaluation runs the native-resolution Set2 stack through the `Predictor`,
    which resamples to the model's voxel size and back, and scores against the
    native DAPI image.

``ndev`` (``pip install --no-deps ndev-sampledata``, BSD-3)
    One field of a scratch assay, 10 time points, 2D: oblique transmitted light and
    Hoechst nuclei (210x576). A 2.5D model with a 1-plane window (a 2D U-Net) is trained
    on time points 0-6 and scored on 7-9. It is the same field of view, so the cells
    at 7-9 are the training cells, moved on: a weaker test of generalisation than
    sephace's.

Each experiment also reports baselines: the best Pearson r of any single normalised
brightfield plane with the truth (sign-corrected: defocused planes correlate with
nuclei positively or negatively) and that of the untrained network.

`bench/real_data.py` runs both and writes ``docs/real_sephace.png`` and
``docs/real_ndev.png``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livestain.inference.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from livestain.inference.evaluate import evaluate_model
from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.normalize import PercentileNorm, zscore
from livestain.inference.predict import Predictor
from livestain.inference.train import TrainSettings, pearson, train

SEPHACE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sephace_bf_dapi"
SEPHACE_PIXEL_UM = 0.20044642857142855
NDEV_FILE = "scratch-assay-labeled-10T-2Ch.tiff"
#: Nominal z step given to 2.5D models of defocus series with uneven spacing: the
#: window is all planes in their stage order, so z is never resampled (both data and
#: model use this value).
NOMINAL_Z_UM = 1.0


@dataclass
class RealField:
    """One real field: brightfield (z, y, x) and single-plane truth (s, y, x)."""

    name: str
    brightfield: np.ndarray
    targets: np.ndarray
    structures: tuple[str, ...]
    voxel_size_um: tuple[float, float, float]

    def as_pair(self) -> tuple[np.ndarray, np.ndarray]:
        return self.brightfield, self.targets

    def binned(self, k: int) -> RealField:
        """``k`` x ``k`` mean-binned in y and x (voxel size scaled accordingly)."""
        if k == 1:
            return self
        return RealField(self.name, bin_yx(self.brightfield, k), bin_yx(self.targets, k), self.structures,
                         (self.voxel_size_um[0], self.voxel_size_um[1] * k, self.voxel_size_um[2] * k))

    def crop(self, y0: int, x0: int, ny: int, nx: int) -> RealField:
        return RealField(self.name, self.brightfield[:, y0 : y0 + ny, x0 : x0 + nx],
                         self.targets[:, y0 : y0 + ny, x0 : x0 + nx], self.structures, self.voxel_size_um)


def bin_yx(a: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``k`` x ``k`` blocks over the last two axes (edges that do not fill a block dropped)."""
    a = np.asarray(a, np.float32)
    ny, nx = (a.shape[-2] // k) * k, (a.shape[-1] // k) * k
    a = a[..., :ny, :nx]
    return a.reshape(*a.shape[:-2], ny // k, k, nx // k, k).mean(axis=(-3, -1))


# ------------------------------------------------------------------ data


def sephace_available(root: Path = SEPHACE_DIR) -> bool:
    return all((root / f"Set{i}_{kind}.ome.tif").is_file() for i in (1, 2) for kind in ("brightfield_zstack", "dapi"))


def load_sephace(root: Path = SEPHACE_DIR) -> list[RealField]:
    """Set1 and Set2: 6-plane brightfield (uint8, stage-z order) and the DAPI plane."""
    import tifffile

    if not sephace_available(root):
        raise FileNotFoundError(f"{root} does not hold the sephace Set1/Set2 brightfield and DAPI files")
    fields = []
    for i in (1, 2):
        bf = tifffile.imread(root / f"Set{i}_brightfield_zstack.ome.tif")
        dapi = tifffile.imread(root / f"Set{i}_dapi.ome.tif")
        if bf.ndim != 3 or dapi.shape != bf.shape[1:]:
            raise ValueError(f"unexpected sephace shapes: brightfield {bf.shape}, DAPI {dapi.shape}")
        fields.append(RealField(f"Set{i}", bf, dapi[None].astype(np.float32), ("dna",),
                                (NOMINAL_Z_UM, SEPHACE_PIXEL_UM, SEPHACE_PIXEL_UM)))
    return fields


def ndev_path() -> Path | None:
    """The ndev-sampledata scratch-assay file, found without importing the package
    (whose ``__init__`` needs napari-era libraries), or None when it is not installed."""
    spec = importlib.util.find_spec("ndev_sampledata")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "samples" / NDEV_FILE
    return path if path.is_file() else None


def load_ndev(path: Path | None = None) -> list[RealField]:
    """10 time points, each a 1-plane oblique brightfield and its Hoechst image.

    The file is CTYX: channel 0 Hoechst 33342, 1 oblique transmitted light, 2 and 3
    label images (unused). Its pixel size is not recorded (the TIFF says 1 x 1, no
    unit); 1 um is written here as a placeholder, the same for training and test.
    """
    import tifffile

    path = path or ndev_path()
    if path is None:
        raise FileNotFoundError("ndev-sampledata is not installed: pip install --no-deps ndev-sampledata")
    a = tifffile.imread(path)
    if a.ndim != 4 or a.shape[0] < 2:
        raise ValueError(f"{path}: expected CTYX with at least 2 channels, got {a.shape}")
    return [
        RealField(f"t{t}", a[1, t][None], a[0, t][None].astype(np.float32), ("dna",), (1.0, 1.0, 1.0))
        for t in range(a.shape[1])
    ]


# ------------------------------------------------------------------ experiment


@dataclass
class Experiment:
    """One train-on-some, score-on-others run, and what it measured."""

    name: str
    config: UNetConfig
    settings: TrainSettings
    train_names: list[str]
    test_names: list[str]
    binning: int = 1
    results: dict[str, Any] = field(default_factory=dict)


def plane_baseline(fields: Sequence[RealField], norm: PercentileNorm) -> dict[str, Any]:
    """Best sign-corrected Pearson r of one normalised brightfield plane with the truth."""
    per_plane = []
    for z in range(fields[0].brightfield.shape[0]):
        per_plane.append(float(np.mean([pearson(norm(f.brightfield)[z], f.targets[0]) for f in fields])))
    best = int(np.argmax(np.abs(per_plane)))
    return {"per_plane_r": per_plane, "best_plane": best, "best_abs_r": abs(per_plane[best])}


def run_experiment(
    exp: Experiment,
    train_fields: Sequence[RealField],
    test_fields: Sequence[RealField],
    out_dir: Path,
    log: Callable[[str], None] = print,
    val_every: int | None = None,
) -> dict[str, Any]:
    """Train on ``train_fields`` (binned by ``exp.binning``), save the model in ``out_dir``,
    score it on the native-resolution ``test_fields`` through the `Predictor`; returns
    ``exp.results`` (model path, seconds, Pearson r / SSIM / NRMSE per test field and
    mean, baselines, training history)."""
    norm = PercentileNorm()
    trn = [f.binned(exp.binning) for f in train_fields]
    val = [f.binned(exp.binning) for f in test_fields]  # logged as training goes; no model selection by it
    t0 = time.perf_counter()
    every = val_every or max(1, exp.settings.steps // 5)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step == exp.settings.steps:
            log(f"  {exp.name}: step {step}/{exp.settings.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")

    result = train([f.as_pair() for f in trn], [f.as_pair() for f in val], exp.config, exp.settings, norm,
                   on_step=on_step, val_every=every)
    meta = ModelMeta(exp.config, norm, trn[0].voxel_size_um, extra={
        "recipe": f"bench/real_experiments.py ({exp.name})",
        "settings": exp.settings.to_dict(),
        "data": {"train_fields": exp.train_names, "test_fields": exp.test_names, "binning": exp.binning},
        "history": result.history,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(out_dir / f"{exp.name}.safetensors", result.net, meta)
    model = load_checkpoint(path, "cpu")
    report = evaluate_model(Predictor(model, "cpu"), test_fields)
    torch.manual_seed(exp.settings.seed)
    untrained = UNet3D(exp.config).eval()
    untrained_path = save_checkpoint(out_dir / f"{exp.name}.untrained.safetensors", untrained, ModelMeta(
        exp.config, norm, trn[0].voxel_size_um))
    untrained_report = evaluate_model(Predictor(load_checkpoint(untrained_path, "cpu"), "cpu"), test_fields)
    exp.results = {
        "model": str(path),
        "train_seconds": round(result.seconds, 1),
        "precision": result.precision,
        "train_fields": exp.train_names,
        "test_fields": exp.test_names,
        "test": report["fields"],
        "mean": report["mean"],
        "baseline_best_plane": plane_baseline(test_fields, norm),
        "baseline_untrained_r": untrained_report["mean"]["dna"]["pearson"],
        "history": result.history,
    }
    return exp.results


def sephace_experiment(steps: int = 1500, crop: int | None = None, seed: int = 0,
                       depth: int = 3, base_channels: int = 16, patch: int = 128, batch: int = 8,
                       precision: str = "auto") -> tuple[Experiment, list[RealField], list[RealField]]:
    """Train on Set1, test on Set2 (``crop``: a centred crop of that many native pixels, for tests)."""
    set1, set2 = load_sephace()
    if crop:
        y0, x0 = (set1.brightfield.shape[1] - crop) // 2, (set1.brightfield.shape[2] - crop) // 2
        set1, set2 = set1.crop(y0, x0, crop, crop), set2.crop(y0, x0, crop, crop)
    z = set1.brightfield.shape[0]
    cfg = UNetConfig(structures=("dna",), depth=depth, base_channels=base_channels, mode="2.5d", z_window=z)
    settings = TrainSettings(steps=steps, patch=(z, patch, patch), batch=batch, seed=seed, lr=2e-3,
                             intensity=0.1, gamma=0.2, noise=0.03, precision=precision)
    return Experiment("sephace", cfg, settings, ["Set1"], ["Set2"], binning=2), [set1], [set2]


def ndev_experiment(steps: int = 800, n_train: int = 7, crop: int | None = None, seed: int = 0,
                    depth: int = 3, base_channels: int = 16, patch: int = 96, batch: int = 8,
                    precision: str = "auto") -> tuple[Experiment, list[RealField], list[RealField]]:
    """Train on time points 0..n_train-1, test on the rest (``crop``: first ``crop`` x ``crop`` px)."""
    fields = load_ndev()
    if crop:
        fields = [f.crop(0, 0, crop, crop) for f in fields]
    cfg = UNetConfig(structures=("dna",), depth=depth, base_channels=base_channels, mode="2.5d", z_window=1)
    settings = TrainSettings(steps=steps, patch=(1, patch, patch), batch=batch, seed=seed, lr=2e-3,
                             intensity=0.1, gamma=0.2, noise=0.03, precision=precision)
    trn, tst = fields[:n_train], fields[n_train:]
    return (Experiment("ndev", cfg, settings, [f.name for f in trn], [f.name for f in tst]), trn, tst)


# ------------------------------------------------------------------ figures


def save_real_figure(path: Path, model_path: str | Path, fields: Sequence[RealField], title: str,
                     bf_plane: int | None = None, zoom: int | None = None) -> Path:
    """Rows: test fields (and, with ``zoom``, a ``zoom`` x ``zoom`` crop of the first where its
    truth has most signal);
    columns: brightfield | predicted | truth (prediction and truth on one z-score scale)."""
    from livestain.inference.evaluate import agg_figure

    predictor = Predictor(str(model_path), "cpu")
    rows = []
    for f in fields:
        pred = predictor.predict(np.asarray(f.brightfield), f.voxel_size_um)[0, 0]
        truth = zscore(f.targets[0])
        z = f.brightfield.shape[0] // 2 if bf_plane is None else bf_plane
        rows.append((f.name, np.asarray(f.brightfield[z], np.float32), pred, truth, pearson(pred, truth)))
    if zoom:
        from scipy import ndimage

        name, bf, pred, truth, _ = rows[0]
        # the zoom's centre: where the truth has most signal (a crop of empty background shows nothing)
        cy, cx = np.unravel_index(np.argmax(ndimage.uniform_filter(truth, zoom // 2)), truth.shape)
        y0 = int(np.clip(cy - zoom // 2, 0, bf.shape[0] - zoom))
        x0 = int(np.clip(cx - zoom // 2, 0, bf.shape[1] - zoom))
        sl = (slice(y0, y0 + zoom), slice(x0, x0 + zoom))
        rows.append((f"{name} crop y{y0} x{x0} {zoom}x{zoom}", bf[sl], pred[sl], truth[sl], pearson(pred[sl], truth[sl])))
    fig = agg_figure()
    h, w = rows[0][1].shape
    fig.set_size_inches(3 * 3.2, len(rows) * 3.2 * min(1.2, max(0.45, h / w)) + 0.5)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (name, bf, pred, truth, rho) in enumerate(rows):
        lo, hi = np.percentile(truth, (1, 99.8))
        blo, bhi = np.percentile(bf, (0.5, 99.5))
        for c, (img, vmin, vmax, label) in enumerate((
            (bf, blo, bhi, f"{name} brightfield" + (f" plane {bf_plane}" if bf_plane is not None else "")),
            (pred, lo, hi, f"predicted DNA (r={rho:.3f})"),
            (truth, lo, hi, "measured DNA stain"),
        )):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def summary_json(results: dict[str, Any]) -> str:
    """The results without the bulky per-step history."""
    return json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in results.items()},
                      indent=2)

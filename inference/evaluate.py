"""How good is a model on paired data: Pearson r, SSIM and NRMSE per structure, and figures.

Pearson r is the label-free literature's headline number (Ounkomol et al. 2018) but is
blind to scale and offset; SSIM adds local structure and contrast, NRMSE the absolute
error. All three compare the prediction with the truth in z-score units (the truth is
z-scored per field, as in training), so they do not depend on fluorescence intensity.

SSIM is implemented here (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2
0.03, computed per z-plane and averaged, borders of half a window excluded) rather than
taken from scikit-image, which livestain does not otherwise need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import LoadedModel
from .normalize import zscore
from .predict import Predictor
from .structures import match

from livestain.metrics import METRICS, nrmse, pearson, ssim, structure_metrics  # noqa: F401


def _predictor(model: LoadedModel | Predictor | str | Path | None, device: str | None) -> Predictor:
    if isinstance(model, Predictor):
        return model
    return Predictor(model if isinstance(model, LoadedModel) else (str(model) if model else None), device)


def slides(cfg: Any, truth: np.ndarray) -> bool:
    """Whether a model of config ``cfg`` is scored on ``truth`` (s, [z,] y, x) by its
    sliding-window prediction of every plane: a per-plane 2.5D model on stack truth."""
    return cfg.mode == "2.5d" and truth.ndim == 4 and cfg.target_2d == "plane"


def truth_like_prediction(cfg: Any, truth: np.ndarray) -> np.ndarray:
    """``truth`` shaped like the prediction it is scored against (see `evaluate_model`):
    as it is for 3D models and sliding 2.5D ones, else ``(s, 1, y, x)``: the single
    plane, or the stack's maximum projection."""
    if cfg.mode == "2.5d" and not slides(cfg, truth):
        return (truth if truth.ndim == 3 else truth.max(axis=1))[:, None]
    return truth


def evaluate_model(
    model: LoadedModel | Predictor | str | Path | None,
    fields: Iterable[Any],
    figures_dir: str | Path | None = None,
    tile: Sequence[int] | None = None,
    tta: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``fields`` (anything with ``brightfield``, ``targets``,
    ``structures``, ``voxel_size_um``; ``name`` optional), per field and averaged.

    Structures the model predicts but a field lacks are skipped; none in common is an
    error. A field's structure counts under its name or an alias (`structures.match`:
    a ``dapi`` model is scored on ``dna`` truth); results use the model's names. With ``figures_dir`` one PNG per field is written (see `save_field_figure`).

    2.5D models: a field whose truth is single planes (s, y, x) is compared with the
    prediction of the window centred in the stack; a stack truth (s, z, y, x) with the
    stack's maximum projection (models trained with ``target_2d="max"``) or, for
    per-plane models, with the sliding-window prediction of every plane. A 3D model
    cannot be scored on single-plane truth (ValueError).

    Returns ``{"model", "structures", "fields": {name: {structure: {metric: value}}},
    "mean": {structure: {metric: value}}, "figures": [paths]}``.
    """
    predictor = _predictor(model, device)
    model_structures = tuple(predictor.structures)
    per_field: dict[str, dict[str, dict[str, float]]] = {}
    figures: list[str] = []
    evaluated: list[str] = []
    for i, field in enumerate(fields):
        name = str(getattr(field, "name", None) or f"field{i:03d}")
        field_structures = tuple(field.structures)
        on_field = match(model_structures, field_structures)  # dna is scored on dapi too
        common = list(on_field)
        if not common:
            raise ValueError(
                f"{name} has structures {field_structures} but the model predicts {model_structures}; "
                "evaluate on data with at least one of the model's structures"
            )
        truth = np.asarray(field.targets)
        cfg = predictor.model.meta.config
        planar_truth = truth.ndim == 3
        if cfg.mode == "3d" and planar_truth:
            raise ValueError(
                f"{name} has single-plane truth but {predictor.model.name} is a 3D model; score a "
                "2.5D model on it, or give stacks as truth"
            )
        slide = slides(cfg, truth)
        pred = predictor.predict(np.asarray(field.brightfield), field.voxel_size_um, tile=tile, tta=tta, slide=slide)
        truth = truth_like_prediction(cfg, truth)
        per_field[name] = {
            s: structure_metrics(pred[model_structures.index(s)], truth[field_structures.index(on_field[s])])
            for s in common
        }
        evaluated.extend(s for s in common if s not in evaluated)
        if figures_dir is not None:
            path = Path(figures_dir) / f"{name}.png"
            save_field_figure(
                path,
                np.asarray(field.brightfield),
                np.stack([pred[model_structures.index(s)] for s in common]),
                np.stack([zscore(truth[field_structures.index(on_field[s])]) for s in common]),
                common,
                title=f"{name}: {predictor.model.name}",
                metrics=per_field[name],
            )
            figures.append(str(path))
    if not per_field:
        raise ValueError("no fields to evaluate; give a dataset folder with at least one field")
    mean = {
        s: {
            m: float(np.mean([f[s][m] for f in per_field.values() if s in f]))
            for m in METRICS
        }
        for s in evaluated
    }
    return {
        "model": predictor.model.name,
        "structures": evaluated,
        "fields": per_field,
        "mean": mean,
        "figures": figures,
    }


def save_field_figure(
    path: str | Path,
    brightfield: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray,
    structures: Sequence[str],
    title: str = "",
    metrics: dict[str, dict[str, float]] | None = None,
) -> Path:
    """PNG of the middle z-plane: one row per structure, brightfield | prediction | truth.

    Prediction and truth share one grey scale (z-score units, 1st-99.9th percentile of
    the truth), so a too-weak or too-strong prediction shows as such. Prediction and
    truth of one plane (2.5D: shape (s, 1, y, x)) are shown beside the middle
    brightfield plane.
    """
    fig = agg_figure()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    z = brightfield.shape[0] // 2
    bf = np.asarray(brightfield[z], np.float32)
    bf_lo, bf_hi = np.percentile(bf, (0.5, 99.5))
    n = len(structures)
    fig.set_size_inches(9, 3 * n + 0.4)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, s in enumerate(structures):
        lo, hi = np.percentile(truth[row], (1.0, 99.9))
        panels = (
            (bf, bf_lo, bf_hi, f"brightfield z={z}"),
            (prediction[row, min(z, prediction.shape[1] - 1)], lo, hi, f"{s} predicted"),
            (truth[row, min(z, truth.shape[1] - 1)], lo, hi, f"{s} truth"),
        )
        for col, (img, vmin, vmax, label) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if col == 1 and metrics and s in metrics:
                label += f" (r={metrics[s]['pearson']:.3f})"
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def agg_figure() -> Any:
    """A matplotlib Figure drawn by the Agg (file-only) canvas.

    Not pyplot: no global backend switch, no display needed, nothing to close, so it
    is safe inside a process that also runs a Qt window.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    return fig

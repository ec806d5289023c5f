"""Does a stack look like the fields a user's model learnt from? (`unlike_training`)

Why: a model trained on one microscope's cells is confident on anything. Measured
(2026-12-03, `livestain train` defaults, 2.5D): a model trained on ndev's oblique-light
fields, given simulated brightfield planes, predicts DNA at r 0.23 with confidence
0.91-0.99 and no input flag; given a plane of another microscope's defocus series, r 0.33
at 0.34-0.38 (only the pixel-size flag). Its copies agree on what it has never seen, so
the uncertainty cannot tell; the stack's own statistics (`inference.ood`) are those of
any brightfield stack.

What the model itself sees can: the first encoder block's features, in tiles of `TILE`
pixels at the model's voxel size, summarised per channel by their mean and standard
deviation. ``livestain train`` records their mean and spread over the training fields'
tiles and the median tile's distance from them (`fit_signature`, stored as
``input_signature`` in the checkpoint). A stack's distance (`distance_ratio`) is its median
tile's, over that median. Measured with models trained by ``livestain train`` on real
data (sephace's 4 binned quadrants, 6-plane window; ndev's 30 quadrants, one plane;
reproduced by bench/likeness.py): their own held-out crops 1.06-1.22
(sephace, native pixels resampled) and 0.94-1.15 (ndev, all 10 time points); foreign
stacks 1.38-2.37 (ndev's model on simulated brightfield planes, DNA r 0.23) and
1.88-2.80 (on sephace planes, r 0.33-0.61). `RATIO_LIMIT` sits between, with a thin
margin either side: two real datasets are all there is to set it on. Not caught:
sephace's model on simulated 6-plane series (0.66-0.98; r 0.63, confidence 0.95).

Only 2.5D models record a signature (the real-data case; 3D models read simulated
stacks, which the other checks cover); a checkpoint without one is not checked. The
window checked is the stack's middle planes, where the `Predictor` centres a window
shorter than the stack on the cells' focus: the same planes for a window as tall as the
stack (both real models here). The features run on a CPU copy of the first block, so the
check can run in the worker's checking thread beside the prediction.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .model import window_indices

#: Tile side (px at the model's voxel size) over which the features are summarised:
#: about a nucleus or two, so a tile says what is there rather than one pixel's noise.
TILE = 32
#: A stack is unlike the training fields when its median tile is this many times farther
#: from their features than their own median tile (home stacks measured 0.94-1.22,
#: foreign 1.38-2.80; see the module docstring), or than the most unlike of the training
#: fields scored against the others, if that is farther (`fit_signature`).
RATIO_LIMIT = 1.3
KEY = "input_signature"
#: Largest y/x side (px at the model's voxel size) the features are computed over: the
#: centre of a larger window. A 2048 x 2048 camera frame would otherwise cost ~1 GB of
#: features on the checking thread, for statistics 1024 x 1024 px (1,024 tiles) already give.
CHECK_SIDE = 1024


def _first_block(net: Any) -> torch.nn.Module:
    """A CPU copy of the network's first encoder block, in evaluation mode: what the
    features are read from, never shared with the predicting network's thread."""
    return copy.deepcopy(net.enc[0]).cpu().eval()


class Likeness:
    """A model's first block (a CPU copy) and its recorded signature: `ratio` of a stack."""

    def __init__(self, net: Any, signature: dict, norm: Any, voxel_size_um: Sequence[float]) -> None:
        self.block = _first_block(net)
        self.config = net.config
        self.signature = signature
        self.norm = norm
        self.voxel_size_um = tuple(float(v) for v in voxel_size_um)

    @classmethod
    def of(cls, model: Any) -> Likeness | None:
        """From a `LoadedModel`, or None when its checkpoint records no signature."""
        meta = getattr(model, "meta", None)
        signature = (getattr(meta, "extra", None) or {}).get(KEY)
        if not signature or getattr(model, "net", None) is None:
            return None
        return cls(model.net, signature, meta.norm, meta.voxel_size_um)

    def ratio(self, stack: np.ndarray, voxel_size_um: Sequence[float] | None = None) -> float:
        """The stack's median tile distance over the training fields' median."""
        window = model_window(stack, self.config, self.norm, self.voxel_size_um, voxel_size_um)
        return distance_ratio(self.block, window, self.signature)


def model_window(stack: np.ndarray, config: Any, norm: Any, model_voxel_um: Sequence[float],
                 voxel_size_um: Sequence[float] | None = None) -> np.ndarray:
    """The normalised planes of ``stack`` the 2.5D model reads around its middle plane,
    resampled in y and x to the model's voxel size (as the `Predictor` does):
    ``(z_window, y, x)`` float32."""
    x = np.asarray(norm(np.asarray(stack)), np.float32)
    x = x[window_indices(x.shape[0], config.z_window)]
    if voxel_size_um is not None:
        scale = float(voxel_size_um[1]) / float(model_voxel_um[1])
        if abs(scale - 1.0) > 0.02:
            t = torch.from_numpy(np.ascontiguousarray(x))[None]
            size = [max(TILE, round(n * scale)) for n in x.shape[1:]]
            x = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
    return x


def tile_statistics(block: torch.nn.Module, window: np.ndarray) -> np.ndarray:
    """Per `TILE` x `TILE` tile of the window: the mean and standard deviation of each of
    the block's feature channels, ``(tiles, 2 * channels)``; over the centre `CHECK_SIDE`
    square of a larger window."""
    h, w = window.shape[-2:]
    y0, x0 = max(0, (h - CHECK_SIDE) // 2), max(0, (w - CHECK_SIDE) // 2)
    window = window[..., y0 : y0 + CHECK_SIDE, x0 : x0 + CHECK_SIDE]
    with torch.inference_mode():
        f = block(torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None])[0].numpy()
    c, h, w = f.shape
    t = min(TILE, h, w)
    tiles = [f[:, y : y + t, x : x + t].reshape(c, -1) for y in range(0, h - t + 1, t) for x in range(0, w - t + 1, t)]
    return np.stack([np.concatenate([p.mean(axis=1), p.std(axis=1)]) for p in tiles])


def _distances(stats: np.ndarray, signature: dict) -> np.ndarray:
    mean, spread = np.asarray(signature["mean"]), np.asarray(signature["spread"])
    return np.sqrt(np.mean(((stats - mean) / spread) ** 2, axis=1))


def _summary(stats: np.ndarray) -> dict[str, Any]:
    signature: dict[str, Any] = {"mean": stats.mean(axis=0).round(6).tolist(),
                                 "spread": (stats.std(axis=0) + 1e-6).round(6).tolist(),
                                 "tile": TILE, "tiles": int(len(stats))}
    signature["median_distance"] = round(float(np.median(_distances(stats, signature))), 6)
    return signature


def _held_out_ratios(per_window: Sequence[np.ndarray]) -> list[float]:
    """Each part's median tile distance from the signature of the others, over theirs:
    what a new field like the training ones scores. A single window's tiles are cut into
    their first and second half (raster order: the field's top and bottom halves)."""
    parts = list(per_window)
    if len(parts) == 1:
        half = len(parts[0]) // 2
        parts = [parts[0][:half], parts[0][half:]] if half >= 2 else []
    ratios = []
    for i, part in enumerate(parts):
        rest = _summary(np.concatenate(parts[:i] + parts[i + 1 :]))
        ratios.append(float(np.median(_distances(part, rest)) / rest["median_distance"]))
    return ratios


def fit_signature(net: Any, windows: Sequence[np.ndarray]) -> dict[str, Any]:
    """The signature of a 2.5D network's training ``windows`` (each `model_window`-like:
    normalised, at the model's voxel size): the features' per-channel mean and spread over
    all tiles, the median tile's distance from them, and the stack's ``limit``.

    The limit adapts to how alike the user's fields are: each training field is scored
    against the signature of the others (one field: its top and bottom halves), and the
    limit is the largest of those, at least `RATIO_LIMIT`: few or varied fields would
    otherwise flag new fields of the same kind (3 simulated 128-px fields: new ones
    scored 0.90-1.62, held-out 0.71-1.83; 8 fields: 0.68-1.20 and 0.61-1.29). On the real
    models of the module docstring the limits are 1.30 (sephace) and 1.33 (ndev); 15%
    more would have let half of the simulated planes through to ndev's model."""
    block = _first_block(net)
    per_window = [tile_statistics(block, w) for w in windows]
    signature = _summary(np.concatenate(per_window))
    held_out = _held_out_ratios(per_window)
    signature["held_out_ratios"] = [round(r, 3) for r in held_out]
    signature["limit"] = round(max([RATIO_LIMIT, *held_out]), 3)
    return signature


def distance_ratio(block: torch.nn.Module, window: np.ndarray, signature: dict) -> float:
    """A window's median tile distance from ``signature`` over the training fields' median."""
    return float(np.median(_distances(tile_statistics(block, window), signature)) / signature["median_distance"])


def unlike_training_reason(ratio: float, limit: float = RATIO_LIMIT) -> str:
    return (f"this stack looks unlike the fields the model learnt from (its features x{ratio:.2f} as far from "
            f"theirs as their own typical tile; limit x{limit:.2f}): other cells, optics or microscope; "
            "check a fluorescence frame, or fine-tune on a few fields of these (livestain train --init MODEL)")


def check_likeness(report: Any, likeness: Likeness | None, stack: np.ndarray,
                   voxel_size_um: Sequence[float] | None = None) -> None:
    """Add ``unlike_training`` to an `inference.ood.StackReport` when the stack is unlike
    the model's training fields; nothing without a signature, or when a content flag
    (blank, saturated, fluorescence, empty) already says what is wrong."""
    from .ood import _flag

    if likeness is None or any(f.code in ("blank", "saturated", "fluorescence", "empty") for f in report.flags):
        return
    ratio = likeness.ratio(stack, voxel_size_um)
    limit = float(likeness.signature.get("limit", RATIO_LIMIT))
    report.stats["unlike_training_ratio"] = round(ratio, 3)
    if ratio > limit:
        report.flags.append(_flag("unlike_training", unlike_training_reason(ratio, limit)))

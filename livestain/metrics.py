"""How close a prediction is to the real fluorescence: Pearson r, SSIM, NRMSE.

Numpy and scipy only: the evaluation commands use them, and so does the acquisition
daemon, which scores check frames (real fluorescence taken beside a prediction) during
a run and must stay torch-free.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

METRICS = ("pearson", "ssim", "nrmse")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (0 when either is constant)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def ssim(
    prediction: np.ndarray, truth: np.ndarray, data_range: float | None = None, sigma: float = 1.5
) -> float:
    """Mean structural similarity over the (y, x) planes of two (z, y, x) or (y, x) arrays.

    ``data_range`` defaults to the truth's max - min (the constants C1, C2 scale with
    it). Planes, not 3D windows, because z resolution is several times coarser than
    y/x in widefield stacks and a 3D Gaussian would blur z far more than y/x.
    """
    x = np.asarray(prediction, np.float64)
    y = np.asarray(truth, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"prediction {x.shape} and truth {y.shape} differ in shape")
    if x.ndim == 2:
        x, y = x[None], y[None]
    if data_range is None:
        data_range = float(y.max() - y.min()) or 1.0
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = (0.0, sigma, sigma)

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, s, truncate=3.5, mode="reflect")

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = int(3.5 * sigma + 0.5)
    if min(x.shape[-2:]) > 2 * pad:
        smap = smap[:, pad:-pad, pad:-pad]
    return float(smap.mean())


def nrmse(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square error divided by the truth's standard deviation.

    0 is perfect; 1 is what predicting the truth's mean everywhere scores.
    """
    p = np.asarray(prediction, np.float64)
    t = np.asarray(truth, np.float64)
    rmse = float(np.sqrt(np.mean((p - t) ** 2)))
    return rmse / max(float(t.std()), 1e-12)


def structure_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pearson r, SSIM and NRMSE of one structure; ``truth`` is z-scored first.

    SSIM's luminance term assumes non-negative intensities (opposite-signed local
    means make it negative), so for SSIM both are shifted by the same constant that
    puts the truth's minimum at 0, as the fluorescence image itself would be.
    """
    t = _zscore(truth)
    p = np.asarray(prediction, np.float32)
    lo = float(t.min())
    return {"pearson": pearson(p, t), "ssim": ssim(p - lo, t - lo), "nrmse": nrmse(p, t)}



def _zscore(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return (a - a.mean()) / max(float(a.std()), 1e-6)

"""Pure-numpy image preparation for the viewer: levels, projections, overlay compositing.

Kept free of Qt so it can be timed (``bench/bench_draw.py``) and tested on its own.
Everything here is sized for 2048x2048 x 16-plane stacks at a few redraws per second:
percentiles come from strided subsamples (a few 100k values, not 64 M), large planes
are drawn at screen resolution (`display_step`), and the compositor reuses its
float buffers from frame to frame instead of allocating ~10 arrays per redraw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RGB = tuple[int, int, int]

#: Largest side, in pixels, an overlay is composited at; larger planes are strided down
#: (2048 -> 1024) since a window shows about this many pixels anyway.
DISPLAY_MAX_PX = 1024
#: Percentiles are estimated on about this many values (strided subsample).
PERCENTILE_SAMPLES = 262_144
#: Grey levels of brightfield, as percentiles (robust to hot pixels).
BASE_PERCENTILES = (1.0, 99.5)
#: Default overlay ramp: transparent at the median (background), opaque near the max.
OVERLAY_PERCENTILES = (50.0, 99.8)
#: Smallest automatic overlay ramp in prediction units (predictions are z-scored): a
#: channel whose brightest pixels are less than this above its median holds only noise,
#: which a pure percentile ramp would stretch to full opacity.
MIN_OVERLAY_SPAN = 1.0
#: Projection modes of the main view.
MODES = ("plane", "focus", "max", "mean")


def display_step(ny: int, nx: int, max_px: int = DISPLAY_MAX_PX) -> int:
    """Stride that brings the larger side of a (ny, nx) plane to at most ``max_px``."""
    return max(1, math.ceil(max(ny, nx) / max_px))


def subsample(a: np.ndarray, n: int = PERCENTILE_SAMPLES) -> np.ndarray:
    """A strided view of ``a`` with about ``n`` elements at most (same step on every axis
    but the first of a 3-D volume, whose few planes are all kept)."""
    if a.size <= n:
        return a
    if a.ndim == 3:
        per_plane = max(1, n // a.shape[0])
        step = max(1, math.ceil(math.sqrt(a.shape[1] * a.shape[2] / per_plane)))
        return a[:, ::step, ::step]
    step = max(1, math.ceil((a.size / n) ** (1.0 / a.ndim)))
    return a[(slice(None, None, step),) * a.ndim]


def auto_levels(a: np.ndarray, q: tuple[float, float], min_span: float = 1e-6) -> tuple[float, float]:
    """Low/high percentiles of ``a`` on a subsample; ``hi >= lo + min_span`` always."""
    sample = subsample(a)
    lo, hi = np.percentile(sample, q)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = sample[np.isfinite(sample)]
        lo, hi = (np.percentile(finite, q) if finite.size else (0.0, 1.0))
    return float(lo), float(max(hi, lo + min_span))


def project(volume: np.ndarray, mode: str, axis: int = 0) -> np.ndarray:
    """Max or mean projection along ``axis`` (float32 for mean, input dtype for max)."""
    if mode == "max":
        return volume.max(axis=axis)
    if mode == "mean":
        return volume.mean(axis=axis, dtype=np.float32)
    raise ValueError(f"unknown projection {mode!r}; use max or mean")


def best_focus_plane(stack: np.ndarray) -> int:
    """Index of the sharpest plane of a [z, y, x] stack: the largest normalised variance
    of the lateral gradient, on a subsample (cheap enough to run on every new stack)."""
    if stack.shape[0] == 1:
        return 0
    sample = subsample(stack, 4 * PERCENTILE_SAMPLES).astype(np.float32)
    gy = np.diff(sample, axis=1)[:, :, :-1]
    gx = np.diff(sample, axis=2)[:, :-1, :]
    energy = (gy * gy + gx * gx).mean(axis=(1, 2))
    mean = np.abs(sample).mean(axis=(1, 2)) + 1e-6
    return int(np.argmax(energy / (mean * mean)))


class Compositor:
    """Alpha-composites structure planes into one straight-alpha RGBA uint8 image.

    Each structure's alpha ramps linearly from 0 at its ``lo`` level to its opacity at
    ``hi``. Colours mix by alpha weight, coverage is ``1 - prod(1 - alpha)`` (independent
    layers), so two overlapping structures show both colours rather than the top one.
    Buffers are kept between calls of the same size; the two output images alternate so
    the one handed to Qt last time is not overwritten while it may still be painted.
    """

    def __init__(self) -> None:
        self._shape: tuple[int, int] | None = None
        self._out_index = 0

    def _buffers(self, ny: int, nx: int) -> None:
        if self._shape == (ny, nx):
            return
        self._shape = (ny, nx)
        self._alpha = np.empty((ny, nx), np.float32)
        self._tmp = np.empty((ny, nx), np.float32)
        self._premult = np.empty((3, ny, nx), np.float32)
        self._weight = np.empty((ny, nx), np.float32)
        self._clear = np.empty((ny, nx), np.float32)
        self._out = [np.zeros((ny, nx, 4), np.uint8), np.zeros((ny, nx, 4), np.uint8)]

    def composite(
        self,
        ny: int,
        nx: int,
        planes: Sequence[np.ndarray],
        colors: Sequence[RGB],
        opacities: Sequence[float],
        levels: Sequence[tuple[float, float]],
    ) -> np.ndarray:
        """RGBA (ny, nx, 4) of the given (ny, nx) planes; all transparent when none."""
        self._buffers(ny, nx)
        out = self._out[self._out_index]
        self._out_index ^= 1
        if not planes:
            out.fill(0)
            return out
        a, tmp, premult, weight, clear = self._alpha, self._tmp, self._premult, self._weight, self._clear
        premult.fill(0.0)
        weight.fill(0.0)
        clear.fill(1.0)
        for plane, color, opacity, (lo, hi) in zip(planes, colors, opacities, levels):
            np.subtract(plane, np.float32(lo), out=a, casting="unsafe")
            np.multiply(a, np.float32(opacity / max(hi - lo, 1e-12)), out=a)
            np.clip(a, 0.0, opacity, out=a)
            for c in range(3):
                if color[c]:
                    np.multiply(a, np.float32(color[c]), out=tmp)
                    premult[c] += tmp
            weight += a
            np.subtract(1.0, a, out=tmp)
            clear *= tmp
        np.maximum(weight, 1e-12, out=weight)
        for c in range(3):
            np.divide(premult[c], weight, out=tmp)
            tmp += 0.5
            np.copyto(out[..., c], tmp, casting="unsafe")
        np.subtract(1.0, clear, out=tmp)
        tmp *= 255.0
        tmp += 0.5
        np.copyto(out[..., 3], tmp, casting="unsafe")
        return out

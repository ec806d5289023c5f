"""Per-voxel uncertainty of a prediction, without retraining the model.

The bundled U-Net (`model.UNet3D`) has no dropout and no variance head, so neither
Monte-Carlo dropout nor a predicted variance is available. What is available is the
model's *disagreement with itself*: predict several transformed copies of the stack,
map each prediction back, and take the spread. Where the brightfield evidence is
unambiguous the copies agree; where the model is guessing (a structure's edge, a
blurred or unfamiliar region) they do not.

Two families of transforms were measured (``bench/calibration.py``, held-out simulated
fields, Spearman correlation of uncertainty with absolute error):

``"tta"``
    the 8 symmetries of the y-x square (rotations by 90 degrees, with and without a
    flip). The network is not equivariant to them (it was trained on un-rotated
    patches), so its outputs differ most where its features are least certain.
``"perturb"``
    the identity plus copies with camera-like Gaussian noise (the training
    augmentation's size) and a one-plane z shift, each mapped back.
``"combined"``
    the 8 symmetries, each with a noise perturbation.

`DEFAULT_METHOD` is ``"tta"``, chosen by measurement (3 held-out seeds x 9 acquisition
conditions, 27 stacks, 8 passes each, spread not yet smoothed; rho per structure
dna / membrane / mitochondria):

=====================================  ==================  ==================
                                       tta                 perturb
=====================================  ==================  ==================
per voxel, training acquisition        0.52 / 0.57 / 0.16  0.49 / 0.60 / 0.17
per voxel, all conditions              0.65 / 0.58 / 0.40  0.70 / 0.65 / 0.40
per stack, mean spread vs mean |err|   0.97 / 0.62 / 0.81  0.93 / 0.56 / 0.84
per stack, 1 - confidence vs 1 - r     0.93 / 0.77 / 0.91  0.87 / 0.76 / 0.80
=====================================  ==================  ==================

The two are close per voxel; the symmetries rank whole stacks better, need no random
numbers (the same stack always gets the same uncertainty) and their mean is the
familiar flip-averaged prediction. ``"combined"`` measured like ``"tta"`` on one seed.
A cheap single-pass alternative, the smoothed |prediction| (errors are larger where
structures are bright), ranked voxels worse or inversely (-0.30 / 0.39 / -0.20).

The result is a standard deviation in the prediction's z-score units, smoothed over
neighbouring voxels (`SMOOTH_SIGMA`), times a per-structure factor (`ERROR_PER_STD`,
measured on the same held-out fields) so that it reads as an expected absolute error:
an uncertainty of 0.3 means "about 0.3 z-score units off, typically, in voxels like
this one". The copies share the model's biases, so the raw spread is 4-8x smaller than
the error it ranks; an ensemble of independently trained models, or a variance head
trained with a Gaussian likelihood, would rank the errors the symmetries cannot see
(mitochondria's thin tubules, missed altogether, look as certain as background). Until
then `place_by_signal` moves each stack's uncertainty towards where the structure is
predicted, where the errors are largest (mitochondria per voxel in focus: 0.16 -> 0.64,
bench/calibration.py), keeping the stack's mean the spread's.

Everything runs through `Predictor.predict` (tiling, resampling to the model's voxel
size, 2.5D windows all apply to every copy), so a stack costs ``passes`` predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Methods `predict_with_uncertainty` knows.
METHODS = ("tta", "perturb", "combined")
#: The method chosen by measurement (bench/calibration.py).
DEFAULT_METHOD = "tta"
#: Passes (predictions) per stack by default: all 8 y-x symmetries.
DEFAULT_PASSES = 8
#: Input noise of the perturbation, as a fraction of the stack's 0.5-99.5 percentile
#: range: the training augmentation's upper bound (``livestain train --noise``).
NOISE_FRACTION = 0.03
#: Expected absolute error (z-score units) per unit of spread, per method and structure;
#: structures not listed keep their raw spread. Measured by bench/calibration.py: the
#: median absolute error over the median spread of held-out in-focus voxels (the
#: spread underestimates the error several-fold: copies of one model share its biases).
ERROR_PER_STD: dict[str, dict[str, float]] = {
    # bundled model of 2026-12-02 evening (widened to 16 base channels), the signal
    # placement included (bench/calibration.py: the NA model's 5.98 / 77.5 / 15.0 read
    # 1.49 / 1.20 / 0.79x its error on it, rescaled by those)
    # (membrane 93.1 -> 12.9 when it moved to its whole signal, 2026-12-03: err/u 0.138)
    "tta": {"dna": 8.90, "membrane": 12.9, "mitochondria": 11.9},
    # measured on the earlier bundled model, spread alone: re-measure before relying on them
    "perturb": {"dna": 4.17, "membrane": 7.95, "mitochondria": 4.90},
    "combined": {"dna": 4.23, "membrane": 7.87, "mitochondria": 4.72},
}
#: The error scale alone is right for the median voxel only: the uncertainty's range is
#: far wider than the error's (binned over held-out voxels, the lowest bin's error was
#: 22-44x its uncertainty, the highest 0.2x: 4 z-score units predicted where 0.8 was the
#: error). So each scaled uncertainty ``u`` becomes ``floor + scale * u ** power``,
#: fitted per structure on seeds 1234 and 2468 x bench/calibration.py's 9 conditions
#: (20 quantile bins of every voxel, relative least squares; not the bench's own
#: seeds), so a voxel's value reads as the mean absolute error of voxels like it: bins
#: off by 16 / 29 / 13 % on average (dna / membrane / mitochondria) where the scale alone
#: was off 2-44x at the ends. Monotone, so every ranking (Spearman) is unchanged.
ERROR_CURVE: dict[str, dict[str, tuple[float, float, float]]] = {
    "tta": {"dna": (0.0122, 0.376, 0.72), "membrane": (0.0036, 0.306, 0.82),
            "mitochondria": (0.0108, 0.217, 0.74)},
}
#: Where a checkpoint keeps its own scale (`inference.calibrate`, written by ``livestain
#: train``): ``{"method", "error_per_std": {structure: k}, "u_half": {structure: u}, ...}``.
#: When present it replaces `ERROR_PER_STD` and `ERROR_CURVE` (measured on the bundled
#: models) for that model, and ``u_half`` replaces `ood.U_HALF`.
CALIBRATION_KEY = "uncertainty_calibration"


def own_calibration(meta: object | None, method: str = DEFAULT_METHOD) -> dict | None:
    """The calibration a checkpoint's ``meta`` carries for ``method`` (None: none)."""
    cal = (getattr(meta, "extra", None) or {}).get(CALIBRATION_KEY)
    return cal if isinstance(cal, dict) and cal.get("method") == method else None


def own_u_half(meta: object | None) -> dict[str, float] | None:
    """The confidence halving levels a checkpoint carries (`ood.stack_confidence`'s
    ``u_half``); None: the bundled models' `ood.U_HALF` apply."""
    own = own_calibration(meta)
    return own.get("u_half") if own else None


#: Gaussian smoothing (sigma in voxels) of the spread, per structure: errors are spatially
#: correlated, so a voxel's neighbours' spread predicts its error better than its own
#: (held-out in-focus fields, Spearman: dna 0.50 -> 0.54-0.59, membrane 0.56 -> 0.58-0.66
#: at sigma 1; sigma 2 and 3 less). Not for mitochondria: thin tubules, whose spread
#: smoothing averages away (0.13 -> 0.09).
SMOOTH_SIGMA: dict[str, float] = {"dna": 1.0, "membrane": 1.0}
#: Weight of the predicted signal in the per-voxel uncertainty (`place_by_signal`), per
#: structure. Chosen on seeds 7331 and 8443 x bench/calibration.py's 9 conditions
#: (bench/uncertainty_candidates.py, bundled model of 2026-12-02), Spearman per voxel in
#: focus, spread alone -> with the signal: dna 0.46 -> 0.61 (w 30), membrane 0.37 ->
#: 0.46, mitochondria 0.43 -> 0.62 (w 100); per stack unchanged by construction.
#: Membrane since 2026-12-03: weight 10 on its whole signal (`SIGNAL_WHOLE`), chosen on
#: held-out seeds 1234 and 2468 (not the calibration bench's), per voxel in focus / all
#: conditions 0.37 / 0.52 (clipped, weight 100) -> 0.60 / 0.61 (weights 3, 30, 100, 300:
#: 0.54 / 0.61, 0.62 / 0.58, 0.62 / 0.57, 0.62 / 0.57).
SIGNAL_WEIGHT: dict[str, float] = {"dna": 30.0, "membrane": 10.0, "mitochondria": 100.0}
#: Structures placed by their whole predicted signal (every voxel's value above the
#: stack's minimum, unsmoothed) instead of the smoothed part above the median. Clipping
#: at the median ties half a stack at zero, and a membrane's errors are spread through
#: that half (a sheet one voxel thick, predicted a little off: the voxels beside it are
#: below the median and wrong), so the tie hid them. For DNA and mitochondria the
#: clipped signal ranks better across conditions (seeds 1234, 2468, all conditions:
#: 0.61 / 0.61 clipped against 0.59 / 0.43 whole), so they keep it.
SIGNAL_WHOLE: frozenset[str] = frozenset({"membrane"})


def place_by_signal(mean: np.ndarray, spread: np.ndarray, weight: float, whole: bool = False) -> np.ndarray:
    """One structure's per-voxel uncertainty: the spread says how wrong the stack is,
    the predicted signal says where.

    The copies of one model miss the same thin tubules, so the spread is near zero where
    the largest errors are; and errors are largest where the structure is (its
    brightness is what can be wrong). So the spread plus ``weight`` times the smoothed
    signal above the stack's median (``whole``: the signal above the stack's minimum,
    unsmoothed, see `SIGNAL_WHOLE`) in units of the stack's mean spread, rescaled to
    keep the spread's own mean: the per-stack figures and the confidence stay those of
    the spread, the voxels are ranked by both.
    """
    if whole:
        signal = mean - np.float32(mean.min())
    else:
        signal = ndi.gaussian_filter(np.maximum(mean - np.float32(np.median(mean)), 0), 1.0)
    level = float(spread.mean())
    u = spread + np.float32(weight * level) * signal
    return (u * np.float32(level / max(float(u.mean()), 1e-12))).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Transform:
    """One augmentation: ``forward`` on a raw (z, y, x) stack, ``inverse`` on the
    (s, z, y, x) prediction of the transformed stack, ``swaps_yx`` when it transposes
    y and x (the voxel size is swapped with it)."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    swaps_yx: bool = False


def symmetry(k: int, flip: bool) -> Transform:
    """Rotation by ``k`` quarter turns in y-x, after a flip of x when ``flip``."""

    def fwd(a: np.ndarray) -> np.ndarray:
        a = a[..., ::-1] if flip else a
        return np.rot90(a, k, axes=(-2, -1))

    def inv(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a, -k, axes=(-2, -1))
        return a[..., ::-1] if flip else a

    return Transform(f"rot{90 * k}{'-flip' if flip else ''}", fwd, inv, swaps_yx=k % 2 == 1)


#: The 8 symmetries of the y-x square, identity first; the first four passes of a
#: shorter run still cover rotations and flips alike.
SYMMETRIES: tuple[Transform, ...] = tuple(
    symmetry(k, f) for k, f in ((0, False), (2, True), (1, False), (3, True),
                                (2, False), (0, True), (3, False), (1, True))
)


def z_shift(n: int) -> Transform:
    """Shift the stack by ``n`` planes (edge planes repeated) and the prediction back."""

    def shift(a: np.ndarray, by: int) -> np.ndarray:
        if by == 0 or a.shape[-3] < 2:
            return a
        idx = np.clip(np.arange(a.shape[-3]) - by, 0, a.shape[-3] - 1)
        return np.take(a, idx, axis=-3)

    return Transform(f"z{n:+d}", lambda a: shift(a, n), lambda a: shift(a, -n))


def _noisy(stack: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """``stack`` plus Gaussian noise of ``fraction`` of its robust range, as float32."""
    lo, hi = np.percentile(stack[:: max(1, stack.shape[0] // 4)], (0.5, 99.5))
    sd = fraction * max(float(hi - lo), 1e-6)
    return stack.astype(np.float32) + rng.normal(0.0, sd, stack.shape).astype(np.float32)


def plan(method: str, passes: int) -> list[tuple[Transform, float]]:
    """(transform, noise fraction) per pass of ``method``."""
    if method not in METHODS:
        raise ValueError(f"uncertainty method {method!r} is not one of {METHODS}")
    if passes < 2:
        raise ValueError("an uncertainty needs at least 2 passes")
    if method == "tta":
        return [(SYMMETRIES[i % 8], 0.0) for i in range(passes)]
    if method == "combined":
        return [(SYMMETRIES[i % 8], NOISE_FRACTION) for i in range(passes)]
    shifts = [z_shift(0)] + [z_shift(s) for s in (1, -1, 0, 0, 1, -1, 0)]
    return [(shifts[i % 8], 0.0 if i == 0 else NOISE_FRACTION) for i in range(passes)]


def predict_with_uncertainty(
    predictor: object,
    stack: np.ndarray,
    voxel_size_um: Sequence[float] | None = None,
    method: str = DEFAULT_METHOD,
    passes: int = DEFAULT_PASSES,
    seed: int = 0,
    calibration: dict[str, float] | None = None,
    **predict_kw: object,
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, uncertainty), both float32 ``(s, z, y, x)`` like ``predictor.predict``'s
    result: the mean of ``passes`` predictions of transformed copies of ``stack``
    (mapped back), and their standard deviation, smoothed per `SMOOTH_SIGMA`, placed by
    the predicted signal (`place_by_signal`, `SIGNAL_WEIGHT`), times
    ``ERROR_PER_STD[method]`` and through ``ERROR_CURVE[method]``: an expected absolute
    error in z-score units. A model whose checkpoint carries its own scale
    (`own_calibration`) is scaled by it instead, and ``calibration`` (structure -> scale;
    ``{}``: the raw placed spread, what `inference.calibrate` fits) overrides both.

    The mean and spread are accumulated with Welford's update, so memory stays at two
    prediction-sized arrays whatever ``passes`` is. ``predict_kw`` go to
    ``predictor.predict`` (``tile``, ``slide``, ...). Transforms that move planes
    (``perturb``'s z shifts) are skipped for 2.5D models predicting a single plane.
    """
    rng = np.random.default_rng(seed)
    steps = plan(method, passes)
    single_plane = bool(getattr(predictor, "is_2_5d", False)) and not predict_kw.get("slide")
    if single_plane:
        steps = [(t, f) for t, f in steps if not t.name.startswith("z") or t.name == "z+0"]
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    n = 0
    for transform, noise in steps:
        x = transform.forward(stack)
        if noise > 0:
            x = _noisy(x, rng, noise)
        v = voxel_size_um
        if v is not None and transform.swaps_yx:
            v = (v[0], v[2], v[1])
        y = transform.inverse(predictor.predict(np.ascontiguousarray(x), v, **predict_kw))  # type: ignore[attr-defined]
        n += 1
        if mean is None:
            mean = np.array(y, dtype=np.float32)
            m2 = np.zeros_like(mean)
            continue
        d = y - mean
        mean += d / n
        m2 += d * (y - mean)
    assert mean is not None and m2 is not None
    std = np.sqrt(m2 / max(n - 1, 1), dtype=np.float32)
    scale, curve = ERROR_PER_STD.get(method, {}), ERROR_CURVE.get(method, {})
    if calibration is None:
        own = own_calibration(getattr(getattr(predictor, "model", None), "meta", None), method)
        calibration = own.get("error_per_std") if own else None
    if calibration is not None:
        scale, curve = calibration, {}
    for i, s in enumerate(tuple(getattr(predictor, "structures", ()))[: std.shape[0]]):
        if SMOOTH_SIGMA.get(s):
            std[i] = ndi.gaussian_filter(std[i], SMOOTH_SIGMA[s])
        if SIGNAL_WEIGHT.get(s):
            std[i] = place_by_signal(mean[i], std[i], SIGNAL_WEIGHT[s], whole=s in SIGNAL_WHOLE)
        std[i] *= np.float32(scale.get(s, 1.0))
        if s in curve:
            floor, k, power = curve[s]
            std[i] = np.float32(floor) + np.float32(k) * np.power(std[i], np.float32(power))
    return mean, std

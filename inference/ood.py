"""Is this stack something the model can predict? Cheap input checks, and the per-stack
confidence that combines them with the predicted uncertainty.

A model trained on one acquisition predicts *something* for any array it is given: a
blank frame, a saturated one, a fluorescence channel picked by mistake, a stack far
from the cells. The per-voxel uncertainty (`inference.uncertainty`) does not catch all
of these: on a featureless input the model is confidently wrong, its copies agree. So
the input is checked directly, with numpy and scipy only (no torch, no model), so the
acquisition daemon can run the same checks before a stack is even sent to a worker.

`check_stack` returns a `StackReport` whose ``flags`` are `Flag` s: a short ``code``,
a human-readable ``reason`` (what was measured, and what to do) and the factor by
which the flag multiplies the stack's confidence. The checks and their thresholds
(measured on simulated fields, see tests/test_uncertainty.py and bench/calibration.py):

``blank``
    the 0.1-99.9 percentile range is zero: a constant stack (no light, a dropped frame).
``saturated``
    at least `SATURATED_FRACTION` of the voxels sit at the stack's maximum value (and at
    the dtype's maximum for integer data, said in the reason): clipped, the contrast
    the model reads is gone.
``fluorescence``
    a dark, flat background with sparse bright structures: the intensity histogram is
    right-skewed, (p99.5 - median) / (median - p0.5) above `FLUORESCENCE_SKEW`
    (brightfield of cells: 0.8-1.1; simulated DNA, membrane, mitochondria camera stacks:
    9-68; noise-free truth: > 300), *and* below the median there is only camera noise:
    (median - p0.5) under `FLUORESCENCE_LOW_SPREAD` noise sigmas (fluorescence: 1.9;
    brightfield 8-10) or a skew above `FLUORESCENCE_NOISE_FREE_SKEW` (noise-free
    truth, whose smooth background fools the noise estimate). The second test keeps
    Zernike phase contrast (skew 2.9-11: a dimmed background with bright halos, but
    dark cell bodies below it, 10-20 sigmas) from being taken for fluorescence.
``empty``
    no plane shows more structure than camera noise: the band-pass (difference of
    Gaussians, sigma 1 and 6 px) contrast of the best plane is below `EMPTY_SNR` times
    the noise estimated from neighbouring-pixel differences (pure noise: 0.27; cells
    in focus: ~2; cells 16 um out of focus: > 0.5).
``out_of_focus``
    brightfield contrast through focus of phase objects (cells) has a sharp minimum at
    the cells' focal plane and rises on both sides; a stack that holds the cells has
    that dip inside it. Flagged when no interior plane's contrast is below
    `FOCUS_DIP_RATIO` of the highest contrast on *both* sides of it (stacks centred on
    the cells: ~0.4; 6 um off: 0.42; 10 um off: > 0.95). Needs `MIN_FOCUS_PLANES` planes.
    A phase-contrast stack (`livestain.modality`) has no such minimum: its contrast
    peaks at focus, and it is flagged when that peak is its first or last plane. When the
    predictor centres a 3D model's z window on the cells (``windowed``) and the halos
    place them at most `WINDOW_RESCUE_UM` beyond the stack's end, the prediction holds:
    still flagged (the z range should move) but at `RESCUED_FOCUS_FACTOR`.
``thin_stack``
    a 3D model reads the cells from how they change through focus, so a stack of too few
    planes, or spanning too little z, gives it nothing to read: fewer than
    `MIN_MODEL_PLANES` planes, or a z extent (planes x step) under
    `MIN_EXTENT_FRACTION` of the model's training stacks'. Measured with the bundled
    model (trained on 16 planes, 1 um apart) on 3 held-out simulated fields, worst DNA r:
    1 plane -0.05, 3 planes 0.03, 4 planes 1.5 um apart 0.13, 5 planes 0.3 um apart
    (1.5 um) 0.08, 8 at 0.3 um (2.4 um) 0.76 (`bench/trust.py`); 5 planes at 1 um 0.95, 11 at 0.3 um
    (3.3 um) 0.90. Worse, the per-voxel uncertainty does not see it: its copies agree on
    a near-empty prediction, and the confidence of a single plane was 0.95, above that
    of a good 16-plane stack (0.83-0.88). Checked only when the model's training extent
    is given (3D models: `model_expectations`); a 2.5D model takes its window of planes.
``voxel_size``
    resampling from the declared voxel size to the model's would change an axis by
    `VOXEL_RATIO_LIMIT` or more: the model then sees structures at a scale it never
    learned (a pixel size 4x off, a z step far coarser than its training one; a finer z
    step is judged by the thickness check when the model is 3D). The declared size
    is what is checked, against the model's training voxel size: a stack whose metadata
    lie about the pixel size is not detected from its content (see the module's notes).

Why thresholds and not a learned detector: they fail loudly for the reasons above,
explain themselves in one line, and cost little: the contrast checks see at most four
`CHECK_CROP`-pixel squares of each plane (`_crops`), the histogram checks a strided
sample of a million voxels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from livestain.focus import (CHECK_CROP, FOCUS_DIP_RATIO, MIN_FOCUS_PLANES, FocusEstimate,  # noqa: F401
                             focus_dip, plane_contrast)

SATURATED_FRACTION = 0.1
FLUORESCENCE_SKEW = 3.0
FLUORESCENCE_LOW_SPREAD = 4.0
FLUORESCENCE_NOISE_FREE_SKEW = 30.0
EMPTY_SNR = 0.45
VOXEL_RATIO_LIMIT = 2.5
MIN_MODEL_PLANES = 5
MIN_EXTENT_FRACTION = 0.2
#: A brightfield stack whose cells' focal plane its halos place inside it or at most this
#: far beyond its end is predicted well by a 3D model whose z window the predictor
#: centres on them (`inference.zwindow`): bundled model, 3 held-out fields per offset,
#: DNA r 0.92-0.98 where the halos placed the cells 0-2 um beyond the end (stacks 7-10 um
#: off), 0.69 at 2.9 um beyond, ~0 where they placed nothing (10-12 um off).
WINDOW_RESCUE_UM = 2.0
#: The confidence factor of such an ``out_of_focus`` flag: the acquisition should still
#: move (the reason says how far), but the prediction holds.
RESCUED_FOCUS_FACTOR = 0.7
#: A model's training stacks showed a clear brightfield contrast minimum at focus when
#: their median `focus_dip` is below this (simulated stacks centred on the cells:
#: 0.28-0.44). Real sephace's sparse defocus series (6 planes 10-25 um apart) has a
#: shallow wobble at best (0.71-0.79 2x2-binned, 0.96-1.07 native), and a model trained
#: on it should not flag its own kind of stack for lacking a dip (`check_stack`).
CLEAR_DIP_RATIO = 0.5
SAMPLE_VOXELS = 1_000_000

#: Confidence multiplier per flag: how much of the prediction survives the condition.
#: Blank, saturated and fluorescence inputs carry no brightfield information at all;
#: out of focus and an empty field give predictions of mostly nothing (empty: right,
#: but in z-score units meaningless); a far-off voxel size degrades, not destroys.
FLAG_FACTORS: dict[str, float] = {
    "blank": 0.0,
    "saturated": 0.05,
    "fluorescence": 0.05,
    "out_of_focus": 0.2,
    "empty": 0.3,
    "thin_stack": 0.1,
    "voxel_size": 0.4,
    # a user's 2.5D model given a stack unlike its training fields (`inference.signature`):
    # measured r 0.23-0.33 on such stacks where its home stacks scored 0.57
    "unlike_training": 0.3,
}

#: Mean per-voxel uncertainty at which a structure's confidence halves, per uncertainty
#: method (`inference.uncertainty.METHODS`): twice the mean over held-out in-focus stacks
#: of the bundled model (bench/calibration.py), so a typical good stack scores ~0.84. A
#: retrained model's typical uncertainty differs: ``livestain train`` measures its own on
#: its validation fields (`inference.calibrate`), and callers pass it as ``u_half``.
U_HALF: dict[str, dict[str, float]] = {
    # bundled model of 2026-12-02 evening (widened to 16 base channels): 2.35x its mean
    # in-focus uncertainty, as the earlier models' were of their own
    # (membrane 12.7 -> 1.76 with its error scale, 2026-12-03; then all three 2.35x the mean
    # in-focus uncertainty through `uncertainty.ERROR_CURVE`: 0.131 / 0.217 / 0.116)
    "tta": {"dna": 0.308, "membrane": 0.510, "mitochondria": 0.273},
    "perturb": {"dna": 0.86, "membrane": 2.23, "mitochondria": 0.76},  # the earlier model: re-measure
    "combined": {"dna": 0.905, "membrane": 1.76, "mitochondria": 1.67},  # no ERROR_CURVE for it  # as tta: not measured apart
}
U_HALF_DEFAULT = 1.0


@dataclass(frozen=True)
class Flag:
    """One reason not to trust a stack's prediction."""

    code: str
    reason: str
    factor: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StackReport:
    """The input checks of one stack: ``flags`` (empty for a normal stack) and the
    measurements they were decided on (``stats``), for logs and thresholds."""

    flags: list[Flag] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def factor(self) -> float:
        """Product of the flags' confidence factors (1 when none)."""
        return math.prod(f.factor for f in self.flags)

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.flags]

    def to_dict(self) -> dict:
        return {"flags": [f.to_dict() for f in self.flags], "stats": self.stats, "factor": self.factor}


def _flag(code: str, reason: str, factor: float | None = None) -> Flag:
    return Flag(code, reason, FLAG_FACTORS[code] if factor is None else factor)


def model_expectations(meta: object | None, focus_window: bool = True) -> dict[str, object]:
    """What `check_stack` compares a stack with, from a model's checkpoint ``meta``
    (`~livestain.inference.checkpoint.ModelMeta`; None, or a stand-in without one:
    nothing): its training voxel size, its training stacks' focus dip when the checkpoint
    records it (`~livestain.inference.zwindow.training_geometry`) and, for a 3D model, its
    training stacks' z extent and whether the predictor centres its z window on the cells
    (``focus_window``, the `~livestain.inference.predict.Predictor`'s setting, on by
    default)."""
    from .zwindow import training_extent_um

    if meta is None or not hasattr(meta, "voxel_size_um"):
        return {}
    voxel = tuple(float(v) for v in meta.voxel_size_um)
    config = getattr(meta, "config", None)
    is_3d = config is not None and getattr(config, "mode", "3d") == "3d"
    extra = getattr(meta, "extra", None) or {}
    extent = training_extent_um(extra, voxel[0]) if is_3d else None
    dip = extra.get("train_focus_dip")
    return {"model_voxel_size_um": voxel, "model_extent_um": extent, "windowed": bool(is_3d and focus_window),
            "model_focus_dip": None if dip is None else float(dip)}


def check_stack(
    stack: np.ndarray,
    voxel_size_um: Sequence[float] | None = None,
    model_voxel_size_um: Sequence[float] | None = None,
    model_extent_um: float | None = None,
    windowed: bool = False,
    model_focus_dip: float | None = None,
) -> StackReport:
    """Input checks of a (z, y, x) brightfield stack (see the module docstring).

    ``voxel_size_um`` is the stack's declared voxel size and ``model_voxel_size_um`` the
    model's training one (``LoadedModel.meta.voxel_size_um``); without both the voxel
    size is not checked. ``model_extent_um``: the z extent of a 3D model's training
    stacks (`model_expectations` gives both from a checkpoint); without it the stack's
    thickness is not checked, and fine z steps count against the voxel size (with it, the
    z extent judges them). ``windowed``: the predictor centres a 3D model's z window on
    the cells, so a stack whose cells lie just beyond its end (`WINDOW_RESCUE_UM`) is still
    flagged ``out_of_focus`` but at `RESCUED_FOCUS_FACTOR`. Content checks stop at the
    first that makes the rest meaningless (a blank stack is not also "out of focus").
    ``model_focus_dip``: the median focus dip of the model's training stacks; when it is
    not below `CLEAR_DIP_RATIO` the model learnt from stacks without a clear brightfield
    contrast minimum (a sparse real defocus series), so a stack without one is what it
    expects and is not flagged for that (the phase-contrast check stays).
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"expected a (z, y, x) stack, got shape {stack.shape}")
    report = StackReport()
    _check_thickness(report, stack.shape[0], voxel_size_um, model_voxel_size_um, model_extent_um)
    _check_voxel_size(report, voxel_size_um, model_voxel_size_um, fine_z_by_extent=model_extent_um is not None)
    flat = stack.reshape(-1)
    sample = flat[:: max(1, flat.size // SAMPLE_VOXELS)].astype(np.float64)
    lo, p05, med, p995, hi = np.percentile(sample, (0.1, 0.5, 50.0, 99.5, 99.9))
    top = float(sample.max())
    report.stats.update(p0_1=float(lo), median=float(med), p99_9=float(hi))
    limit = np.iinfo(stack.dtype).max if stack.dtype.kind in "ui" else None
    if hi - lo <= 1e-6 * max(abs(med), 1.0) and not (limit is not None and top >= limit):
        report.flags.append(_flag("blank", f"the stack is constant (value {med:g}): no light, or a blank frame; "
                                           "check the lamp, shutter and exposure"))
        return report
    at_max = float(np.mean(sample >= top))
    report.stats["saturated_fraction"] = at_max
    if at_max >= SATURATED_FRACTION:
        where = f"the {stack.dtype} maximum {limit}" if limit is not None and top >= limit else f"one value ({top:g})"
        report.flags.append(_flag("saturated", f"{at_max:.0%} of the voxels sit at {where}: the camera saturated; "
                                               "lower the exposure or lamp power"))
        return report
    skew = float((p995 - med) / max(med - p05, 1e-12 * max(abs(med), 1.0)))
    contrast, noise = plane_contrast(stack)
    low = float((med - p05) / max(float(np.median(noise)), 1e-12 * max(abs(med), 1.0)))
    report.stats.update(skew=min(skew, 1e12), low_spread=min(low, 1e12))
    flat_background = low < FLUORESCENCE_LOW_SPREAD or skew > FLUORESCENCE_NOISE_FREE_SKEW
    if skew > FLUORESCENCE_SKEW and flat_background:
        report.flags.append(_flag("fluorescence", f"dark flat background with sparse bright structures (histogram "
                                                  f"skew {min(skew, 1e12):.3g} > {FLUORESCENCE_SKEW}, only noise below "
                                                  "the median): this looks like a fluorescence channel, or a "
                                                  "frame taken without transmitted light; pick the "
                                                  "transmitted-light channel and check its lamp"))
        return report
    snr = contrast / np.maximum(noise, 1e-12 * max(abs(med), 1.0))
    report.stats["best_plane_snr"] = float(snr.max())
    if snr.max() < EMPTY_SNR:
        report.flags.append(_flag("empty", f"no plane shows more structure than camera noise (best contrast/noise "
                                           f"{snr.max():.2f} < {EMPTY_SNR}): an empty field, or cells far out of "
                                           "focus; move to cells"))
        return report
    if stack.shape[0] >= MIN_FOCUS_PLANES:
        dip = focus_dip(contrast)
        report.stats["focus_dip"] = min(dip, 1e9)
        if not dip < FOCUS_DIP_RATIO:
            # the window rescues a stack off its cells only where it can resample the
            # stack's planes to the model's (a far coarser z step: not; real sephace, 10 um
            # steps, halos inside the stack, DNA r 0.35, would otherwise have been rescued)
            resamplable = report.stats.get("voxel_ratio_z", 1.0) < VOXEL_RATIO_LIMIT
            no_dip_expected = model_focus_dip is not None and not model_focus_dip < CLEAR_DIP_RATIO
            if no_dip_expected:
                report.stats["model_focus_dip"] = model_focus_dip
            _check_focus_without_dip(report, stack, contrast, dip, voxel_size_um, windowed and resamplable,
                                     model_voxel_size_um, no_dip_expected)
    return report


def _check_focus_without_dip(report: StackReport, stack: np.ndarray, contrast: np.ndarray, dip: float,
                             voxel_size_um: Sequence[float] | None, windowed: bool = False,
                             model_voxel_size_um: Sequence[float] | None = None,
                             no_dip_expected: bool = False) -> None:
    """No brightfield contrast minimum: out of focus, unless the stack is phase contrast
    (`livestain.modality`), whose contrast peaks at focus instead; it is out of focus
    when that peak is at its first or last plane. A brightfield stack whose halos place
    the cells just beyond its end keeps its prediction when ``windowed`` (see
    `check_stack`): flagged, so the acquisition moves, at a milder factor. Without a
    declared voxel size the z step is the model's, as the `Predictor` assumes (else 1 um).
    ``no_dip_expected``: the model learnt from brightfield stacks without a dip (see
    `check_stack`), so only the phase-contrast check applies."""
    from livestain.focus import focus_from_halos
    from livestain.modality import PHASE, detect_modality

    modality = detect_modality(stack, float(voxel_size_um[0]) if voxel_size_um is not None else None)
    report.stats["modality"] = modality.modality
    if modality.modality != PHASE:
        if no_dip_expected:  # the model's own training stacks had no dip: nothing unusual
            return
        z_step = float((voxel_size_um or model_voxel_size_um or (1.0,))[0])
        where = focus_from_halos(stack, z_step)
        beyond = None if where.offset_um is None else abs(where.offset_um) - (stack.shape[0] - 1) * z_step / 2
        if beyond is not None:
            report.stats["cells_beyond_stack_um"] = round(beyond, 2)
        if windowed and beyond is not None and beyond <= WINDOW_RESCUE_UM:
            report.flags.append(_flag("out_of_focus", (
                f"the cells' focal plane is at or just beyond the stack's end ({_where_to_move(where)}); "
                "this prediction holds: the model's z window was centred on them"), RESCUED_FOCUS_FACTOR))
            return
        report.flags.append(_flag("out_of_focus", f"brightfield contrast has no minimum inside the stack "
                                                  f"(deepest dip {min(dip, 9.99):.2f} >= {FOCUS_DIP_RATIO}): the "
                                                  f"cells' focal plane is outside it; {_where_to_move(where)}"))
        return
    peak = int(np.argmax(contrast))
    if peak in (0, len(contrast) - 1):
        end = "first" if peak == 0 else "last"
        report.flags.append(_flag("out_of_focus", f"phase contrast is sharpest at the stack's {end} plane: the "
                                                  f"cells' focal plane is at or beyond it; shift the z range "
                                                  f"towards its {end} plane"))


def _where_to_move(where: FocusEstimate) -> str:
    """The fix for a stack off its cells, in the user's terms: how far to shift the z
    range, when the halos place the cells at or just beyond the stack's end
    (``where``: `livestain.focus.focus_from_halos`); else the general advice."""
    if where.offset_um is None:
        return "centre the z range on the cells"
    end = "last" if where.offset_um > 0 else "first"
    return (f"their halos place them {abs(where.offset_um):.1f} um from the stack's centre, towards its {end} "
            f"plane: shift the z range by {where.offset_um:+.1f} um (or turn on track_focus)")


def _check_thickness(report: StackReport, planes: int, voxel: Sequence[float] | None,
                     model_voxel: Sequence[float] | None, model_extent_um: float | None) -> None:
    """Flag a stack too thin for a 3D model (``thin_stack``, see the module docstring):
    fewer planes than `MIN_MODEL_PLANES` (or than the model's own training stacks had,
    if fewer), or, when the z step is declared, a z extent under `MIN_EXTENT_FRACTION`
    of the model's training extent."""
    if model_extent_um is None:
        return
    report.stats["planes"] = planes
    if voxel is not None:
        report.stats["z_extent_um"] = planes * float(voxel[0])
    short = thickness_shortfall(planes, float(voxel[0]) if voxel is not None else None, model_voxel, model_extent_um)
    if short:
        report.flags.append(_flag("thin_stack", f"too thin for this 3D model: {short}"))


def thickness_shortfall(planes: int, z_step_um: float | None, model_voxel: Sequence[float] | None,
                        model_extent_um: float) -> str:
    """What a stack of ``planes`` planes ``z_step_um`` apart lacks for a 3D model trained
    on ``model_extent_um`` stacks, and the fix, in one line ("" when nothing): the
    ``thin_stack`` reason, and what the run's start says of a plan's z-stacks."""
    need_planes = MIN_MODEL_PLANES
    if model_voxel is not None and float(model_voxel[0]) > 0:
        need_planes = max(1, min(need_planes, round(float(model_extent_um) / float(model_voxel[0]))))
    need_extent = MIN_EXTENT_FRACTION * float(model_extent_um)
    short = []
    if planes < need_planes:
        short.append(f"{planes} plane{'' if planes == 1 else 's'} (needs {need_planes})")
    if z_step_um is not None and planes * z_step_um < need_extent:
        short.append(f"{planes * z_step_um:.3g} um of z (needs {need_extent:.3g})")
    if not short:
        return ""
    return (f"{' and '.join(short)}; it reads the cells through focus and learnt on {float(model_extent_um):g} um "
            f"stacks, so its prediction is near noise. Take {need_planes}+ planes over {need_extent:.3g}+ um (best "
            f"{float(model_extent_um):g} um), or train a 2.5D model: livestain train --mode 2.5d --z-window {planes}")


def _check_voxel_size(report: StackReport, voxel: Sequence[float] | None, model: Sequence[float] | None,
                      fine_z_by_extent: bool = False) -> None:
    """Flag an axis 2.5x or more from the model's voxel. ``fine_z_by_extent``: a z step
    finer than the model's is left to the thickness check: what a fine step costs a 3D
    model is z extent (bundled model, 3 held-out fields: 16 planes 0.25 um apart, DNA r
    0.93-0.98; 40 at 0.1 um 0.94-0.98; 5 at 0.3 um 0.08, flagged thin)."""
    if voxel is None or model is None:
        return
    ratios = [float(v) / float(m) for v, m in zip(voxel, model)]
    report.stats.update({f"voxel_ratio_{a}": r for a, r in zip("zyx", ratios)})
    off = [(a, r) for a, r in zip("zyx", ratios) if r >= VOXEL_RATIO_LIMIT
           or r <= 1.0 / VOXEL_RATIO_LIMIT and not (fine_z_by_extent and a == "z")]
    if off:
        text = ", ".join(f"{a} {r:.2g}x" for a, r in off)
        report.flags.append(_flag("voxel_size", f"declared voxel size {tuple(float(v) for v in voxel)} um is far from "
                                                f"the model's {tuple(float(m) for m in model)} um ({text}; limit "
                                                f"{VOXEL_RATIO_LIMIT}x): the resampled structures are at a scale the "
                                                "model never saw; check the metadata, or acquire nearer its voxel size"))


@dataclass(frozen=True)
class Confidence:
    """Per-stack confidence, 0..1 (higher: more trustworthy): per structure and overall."""

    per_structure: dict[str, float]
    overall: float
    flags: list[Flag]

    def to_dict(self) -> dict:
        return {"confidence": round(self.overall, 3),
                "confidence_per_structure": {s: round(c, 3) for s, c in self.per_structure.items()},
                "flags": [f.code for f in self.flags],
                "flag_reasons": [f.reason for f in self.flags]}


def mean_uncertainty(uncertainty: np.ndarray, border: int = 4) -> np.ndarray:
    """Mean per-voxel uncertainty per structure of an (s, z, y, x) array, without a
    ``border`` in y and x where it is larger than 4 x ``border`` (edges are predicted
    from padding: their spread says more about the stack's size than its content)."""
    u = np.asarray(uncertainty, dtype=np.float32)
    if u.shape[-1] > 4 * border and u.shape[-2] > 4 * border:
        u = u[..., border:-border, border:-border]
    return u.reshape(u.shape[0], -1).mean(axis=1)


def stack_confidence(
    uncertainty: np.ndarray | None,
    structures: Sequence[str],
    report: StackReport | None = None,
    u_half: Mapping[str, float] | None = None,
    method: str = "tta",
) -> Confidence:
    """Confidence of a prediction from its uncertainty and its input checks.

    Per structure: ``2 ** -(u / u_half) ** 2`` with ``u`` the mean per-voxel uncertainty
    (`mean_uncertainty`: a mean, so it does not grow or shrink with the stack's size)
    and ``u_half`` the level at which confidence halves (``U_HALF[method]``, ``method``
    the one the uncertainty came from), times the product
    of the flags' factors (`FLAG_FACTORS`). Without an uncertainty (a fast prediction)
    the structures start at 1 and only the flags count. Overall: the geometric mean of
    the structures' confidences, so one poorly predicted structure pulls it down.
    """
    halves = {**U_HALF.get(method, {}), **(u_half or {})}
    factor = report.factor if report is not None else 1.0
    per: dict[str, float] = {}
    means = mean_uncertainty(uncertainty) if uncertainty is not None else None
    for i, s in enumerate(structures):
        base = 1.0
        if means is not None:
            base = 2.0 ** -((float(means[i]) / halves.get(s, U_HALF_DEFAULT)) ** 2)
        per[s] = float(np.clip(base * factor, 0.0, 1.0))
    values = np.array(list(per.values()) or [factor])
    overall = float(np.exp(np.mean(np.log(np.maximum(values, 1e-12))))) if np.all(values > 0) else 0.0
    return Confidence(per, overall, list(report.flags) if report else [])

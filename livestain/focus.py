"""Where are the cells along z? The sample's focal plane, from the brightfield stack alone.

Cells are nearly transparent phase objects. In brightfield their contrast comes from
defocus: a plane above the cells shows them with bright halos, a plane below with dark
ones, and the plane through their middle shows them barely at all. So the contrast of
the planes through a z-stack has a sharp minimum at the cells' focal plane, flanked by
maxima on both sides (measured on the simulator, 0.25 um steps: the minimum lies within
0.15 um of the cells' refractive-index-weighted mid-height, and is ~1.5 um wide).

`estimate_focus` finds that minimum. It is what both sides of a run use:

- the worker (`inference.predict`) predicts from a window of the stack centred on the
  cells, the z extent the model was trained on, so a stack taller than the model's, or
  off-centre on the cells, is predicted as the model knows how;
- the daemon (focus tracking) re-centres the next stacks of a position on its cells, so
  a drifting sample stays in the stack.

Numpy and scipy only: the daemon imports it and stays torch-free. Phase contrast shows
a maximum at focus, not a minimum: `phase_focus` finds it, and `locate_cells` uses it
for stacks `livestain.modality` takes for phase contrast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: The contrast is measured on at most four squares of this many pixels a side per plane
#: (`_crops`): a fixed cost per plane however large the camera.
CHECK_CROP = 192
#: A minimum counts as the focal plane when its contrast is below this fraction of the
#: highest contrast on *both* sides of it (stacks through the cells: ~0.4-0.6; stacks
#: whose cells are outside: > 0.95).
FOCUS_DIP_RATIO = 0.75
#: Fewer planes than this show no dip worth trusting.
MIN_FOCUS_PLANES = 5


def _crops(plane: np.ndarray) -> list[np.ndarray]:
    """Where the contrast is measured: the whole plane up to 2 x `CHECK_CROP` pixels a
    side, else one `CHECK_CROP` square centred in each quadrant (four samples of a large
    field, so cells off its centre still count, at a fixed cost per plane)."""
    ny, nx = plane.shape
    c = CHECK_CROP
    if ny <= 2 * c and nx <= 2 * c:
        return [plane]
    ys = [max(0, min(ny - c, cy - c // 2)) for cy in (ny // 4, 3 * ny // 4)] if ny > 2 * c else [0]
    xs = [max(0, min(nx - c, cx - c // 2)) for cx in (nx // 4, 3 * nx // 4)] if nx > 2 * c else [0]
    return [plane[y : y + c, x : x + c] for y in ys for x in xs]


def plane_contrast(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(band-pass contrast, noise) per plane: the std of a difference of Gaussians
    (sigma 1 and 6 px: cell-sized detail, no illumination gradient, little noise) and
    the camera noise estimated from horizontally neighbouring pixels (median absolute
    difference / 0.6745 / sqrt 2), both in the stack's units, over `_crops`."""
    c, n = [], []
    for plane in stack:
        band, diffs = [], []
        for crop in _crops(plane):
            p = crop.astype(np.float32)
            band.append((ndi.gaussian_filter(p, 1.0, truncate=3.0) - ndi.gaussian_filter(p, 6.0, truncate=3.0)).ravel())
            if p.shape[1] > 1:
                diffs.append(np.abs(np.diff(p, axis=1)).ravel())
        c.append(float(np.concatenate(band).std()))
        n.append(float(np.median(np.concatenate(diffs))) / 0.6745 / math.sqrt(2.0) if diffs else 0.0)
    return np.asarray(c), np.asarray(n)


def _dips(contrast: np.ndarray) -> np.ndarray:
    """Per plane, ``c[i] / min(max(c[:i]), max(c[i+1:]))`` (inf at the ends): below 1
    where the contrast rises on both sides."""
    c = np.asarray(contrast, float)
    out = np.full(len(c), math.inf)
    if len(c) < 3:
        return out
    left = np.maximum.accumulate(c)[:-2]  # max(c[:i]) for i = 1..n-2
    right = np.maximum.accumulate(c[::-1])[::-1][2:]  # max(c[i+1:])
    side = np.minimum(left, right)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[1:-1] = np.where(side > 0, c[1:-1] / side, math.inf)
    return out


def focus_dip(contrast: np.ndarray) -> float:
    """Depth of the deepest interior minimum of a contrast-through-focus curve: the
    smallest ``c[i] / min(max(c[:i]), max(c[i+1:]))`` over interior planes (below 1:
    contrast rises on both sides; inf for fewer than 3 planes)."""
    return float(_dips(contrast).min())


@dataclass(frozen=True)
class FocusEstimate:
    """Where the cells' focal plane lies in a stack, or why it was not found.

    Attributes
    ----------
    plane : float | None
        Fractional plane index of the focal plane (0 = the first plane), None when no
        contrast minimum lies inside the stack.
    offset_um : float | None
        The focal plane's distance from the stack's centre, in um (positive: towards the
        last plane). Moving the stack's centre by this much centres it on the cells.
    dip : float
        The minimum's depth (`focus_dip`): lower is clearer.
    reason : str
        Why there is no estimate ("" when there is one).
    """

    plane: float | None
    offset_um: float | None
    dip: float
    reason: str = ""

    def to_dict(self) -> dict[str, float | str | None]:
        return {"focus_plane": None if self.plane is None else round(self.plane, 3),
                "focus_offset_um": None if self.offset_um is None else round(self.offset_um, 3),
                "focus_dip": round(min(self.dip, 1e9), 4), "focus_reason": self.reason}


def estimate_focus(stack: np.ndarray, z_step_um: float = 1.0,
                   contrast: np.ndarray | None = None) -> FocusEstimate:
    """The cells' focal plane in a (z, y, x) brightfield stack (see the module docstring).

    The deepest contrast minimum below `FOCUS_DIP_RATIO`, refined to a fraction of a plane
    by the parabola through it and its neighbours. ``contrast`` saves recomputing
    `plane_contrast` when the caller has it.
    """
    nz = int(np.shape(stack)[0])
    if nz < MIN_FOCUS_PLANES:
        return FocusEstimate(None, None, math.inf, f"{nz} planes: too few to find the focus "
                                                   f"(needs {MIN_FOCUS_PLANES})")
    c = plane_contrast(stack)[0] if contrast is None else np.asarray(contrast, float)
    dips = _dips(c)
    i = int(np.argmin(dips))
    dip = float(dips[i])
    if not dip < FOCUS_DIP_RATIO:
        return FocusEstimate(None, None, dip, f"no contrast minimum inside the stack (deepest dip "
                                              f"{min(dip, 9.99):.2f} >= {FOCUS_DIP_RATIO}): the "
                                              f"cells are outside it, or it holds none")
    a, b, d = c[i - 1], c[i], c[i + 1]
    curvature = a - 2 * b + d
    shift = 0.5 * (a - d) / curvature if curvature > 0 else 0.0
    plane = i + float(np.clip(shift, -0.5, 0.5))
    return FocusEstimate(plane, (plane - (nz - 1) / 2) * float(z_step_um), dip)


#: The halo pattern must carry at least this share of the band-passed planes' variance
#: (`halo_profile`): cells through focus 0.73-0.90 on every simulated condition, camera
#: noise alone 0.07-0.15, whose sign "flips" anywhere.
MIN_HALO_SHARE = 0.4
#: How far beyond the stack's first or last plane `focus_from_halos` extrapolates the
#: focal plane (planes): further out, too little of the cells is in the stack to say.
MAX_EXTRAPOLATION_PLANES = 3.0


def halo_profile(stack: np.ndarray) -> tuple[np.ndarray, float]:
    """Per plane, how much of the stack's main band-passed pattern it shows, signed,
    scaled so the largest is +-1; and the share of the band-passed variance that
    pattern carries (near 1: one pattern through the stack; near 1/planes: noise).

    A weak phase object's brightfield image is, near focus, its phase's Laplacian times
    the defocus: one pattern whose sign flips at the focal plane (dark halos below,
    bright above) and whose amount grows with the distance to it, peaks a few um away
    and fades slowly beyond. The pattern is the first principal component of the
    band-passed planes (the `plane_contrast` band, over `_crops`); the profile is each
    plane's coefficient on it.
    """
    band = []
    for plane in stack:
        parts = []
        for crop in _crops(plane):
            p = crop.astype(np.float32)
            parts.append((ndi.gaussian_filter(p, 1.0, truncate=3.0) - ndi.gaussian_filter(p, 6.0, truncate=3.0)).ravel())
        band.append(np.concatenate(parts))
    planes = np.asarray(band, np.float64)
    planes -= planes.mean(axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(planes, full_matrices=False)
    profile = u[:, 0] * s[0]
    peak = float(np.abs(profile).max())
    total = float(np.sum(s**2))
    share = float(s[0] ** 2) / total if total > 0 else 0.0
    return (profile / peak if peak > 0 else profile), share


def focus_from_halos(stack: np.ndarray, z_step_um: float = 1.0) -> FocusEstimate:
    """The focal plane where the halos' sign flips (`halo_profile`), also when it lies at
    the stack's end or up to `MAX_EXTRAPOLATION_PLANES` beyond it, where `estimate_focus`
    finds no contrast minimum (the minimum needs planes on both sides of it).

    The flip next to the profile's peak is interpolated linearly between its two planes.
    Without a flip in the stack, the focus lies beyond the end on the peak's steep side
    (the amount rises fast from focus to the peak and fades slowly after it): the
    parabola through the three end planes is followed out to zero (measured on the
    simulator at 8 um off the cells: within 0.1 plane of the in-stack estimate, and
    0.05 plane of the truth when extrapolated). Phase contrast shows no flip and no
    steep side: no estimate, as from `estimate_focus`.
    """
    nz = int(np.shape(stack)[0])
    if nz < MIN_FOCUS_PLANES:
        return FocusEstimate(None, None, math.inf, f"{nz} planes: too few to find the focus "
                                                   f"(needs {MIN_FOCUS_PLANES})")
    a, share = halo_profile(stack)
    if share < MIN_HALO_SHARE:
        return FocusEstimate(None, None, math.inf, f"no halo pattern through the stack (it carries {share:.0%} "
                                                   f"of the detail, needs {MIN_HALO_SHARE:.0%}): no cells, or noise")
    peak = int(np.argmax(np.abs(a)))
    sign = np.sign(a[peak])
    flips = []
    for step in (-1, 1):
        i = peak
        while 0 <= i + step < nz and np.sign(a[i + step]) == sign:
            i += step
        if 0 <= i + step < nz:
            flips.append(i + step * a[i] / (a[i] - a[i + step]))
    plane: float | None = min(flips, key=lambda z: abs(z - peak)) if flips else _extrapolated_flip(np.abs(a), peak)
    if plane is None:
        return FocusEstimate(None, None, math.inf, "the halos do not change sign inside or just beyond the "
                                                   "stack: the cells are far outside it, or it holds none")
    reason = "" if 0 <= plane <= nz - 1 else f"extrapolated {abs(plane - np.clip(plane, 0, nz - 1)):.1f} planes beyond the stack"
    return FocusEstimate(float(plane), (float(plane) - (nz - 1) / 2) * float(z_step_um), math.inf, reason)


def _extrapolated_flip(amount: np.ndarray, peak: int) -> float | None:
    """Where |profile| reaches zero beyond the end on the peak's steep side, or None."""
    n = len(amount)
    if peak in (0, n - 1):
        return None  # still rising at the end: the peak, and the focus, are further out
    steep_low = (amount[peak] - amount[0]) / peak > (amount[peak] - amount[-1]) / (n - 1 - peak)
    end_planes = amount[:3] if steep_low else amount[::-1][:3]
    if not end_planes[0] < end_planes[1]:
        return None
    # parabola through the end planes at x = 0, 1, 2 (x grows into the stack), followed to zero outward
    c2 = (end_planes[0] - 2 * end_planes[1] + end_planes[2]) / 2
    c1 = end_planes[1] - end_planes[0] - c2
    c0 = end_planes[0]
    roots = np.roots([c2, c1, c0]) if abs(c2) > 1e-9 else np.array([-c0 / c1])
    outward = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and -MAX_EXTRAPOLATION_PLANES <= r.real <= 0]
    if not outward:
        beyond = c0 / (end_planes[1] - end_planes[0])  # the straight line instead
        if beyond > MAX_EXTRAPOLATION_PLANES:
            return None
        outward = [-beyond]
    x = max(outward)  # the root nearest the stack
    return x if steep_low else (n - 1) - x


#: A phase-contrast stack's sharpest plane is its focal plane when its contrast stands
#: this far above both end planes' (`phase_focus`).
PHASE_PEAK_RATIO = 1.2


def phase_focus(stack: np.ndarray, z_step_um: float = 1.0) -> FocusEstimate:
    """The focal plane of a Zernike phase-contrast stack: its sharpest plane, refined by
    the parabola through it and its neighbours. The ring turns the cells' phase into
    intensity directly, so phase contrast is strongest in focus and fades on both sides,
    the reverse of brightfield's minimum. None when the sharpest plane is an end plane
    (the focus is there or beyond) or stands less than `PHASE_PEAK_RATIO` above them."""
    nz = int(np.shape(stack)[0])
    if nz < MIN_FOCUS_PLANES:
        return FocusEstimate(None, None, math.inf, f"{nz} planes: too few to find the focus "
                                                   f"(needs {MIN_FOCUS_PLANES})")
    c = plane_contrast(stack)[0]
    i = int(np.argmax(c))
    if i in (0, nz - 1):
        return FocusEstimate(None, None, math.inf, f"phase contrast is sharpest at the stack's "
                                                   f"{'first' if i == 0 else 'last'} plane: the focus is there or beyond")
    ends = max(float(c[0]), float(c[-1]))
    if not c[i] >= PHASE_PEAK_RATIO * ends:
        return FocusEstimate(None, None, math.inf, f"no clear sharpest plane (peak {c[i] / max(ends, 1e-12):.2f}x "
                                                   f"the end planes, needs {PHASE_PEAK_RATIO}x)")
    a, b, d = c[i - 1], c[i], c[i + 1]
    curvature = a - 2 * b + d
    shift = 0.5 * (a - d) / curvature if curvature < 0 else 0.0
    plane = i + float(np.clip(shift, -0.5, 0.5))
    return FocusEstimate(plane, (plane - (nz - 1) / 2) * float(z_step_um), math.inf)


def locate_cells(stack: np.ndarray, z_step_um: float, modality: str | None = None,
                 contrast: np.ndarray | None = None) -> FocusEstimate:
    """The cells' focal plane: the contrast minimum (`estimate_focus`), else where the
    halos change sign, up to a few planes beyond the stack's ends (`focus_from_halos`);
    for phase contrast, the sharpest plane (`phase_focus`).

    The minimum needs planes on both sides of the focus, so a stack that ends at the
    cells or just short of them got none: the worker predicted it as it was (DNA r ~0
    at 8 um off the cells, bench/robustness.py) and focus tracking never moved back to
    them. The halos' sign places the focus there within about a plane on the simulator.
    ``modality`` (`livestain.modality`): ``"phase"`` goes to `phase_focus`; None (the
    daemon, for every streamed stack) takes a contrast minimum as brightfield, and
    detects the modality only for stacks without one, before the halos' extrapolation,
    which misreads phase contrast (it placed a 2 um-step phase stack's cells 19 um off).
    Detecting it for every stack cost the daemon ~80 ms per stack. ``contrast``
    (`plane_contrast`) saves recomputing it when the caller has it.
    """
    if modality == "phase":
        return phase_focus(stack, z_step_um)
    focus = estimate_focus(stack, z_step_um, contrast)
    if focus.plane is not None:
        return focus
    if modality is None:
        from livestain.modality import PHASE, detect_modality  # it builds on this module

        if detect_modality(stack, z_step_um, contrast).modality == PHASE:
            return phase_focus(stack, z_step_um)
    halos = focus_from_halos(stack, z_step_um)
    return halos if halos.plane is not None else focus

"""Predict from the z window the model was trained on, centred on the cells.

A 3D model learns its training stacks' geometry: how many micrometres of z they span
and where the cells sit in them. Fed a taller stack, or one off-centre on the cells,
it sees something it never learned, and its r collapses (bundled model, measured in
bench/robustness.py: DNA r 0.97 at its 16 um stack, 0.26 at 32 um, ~0 at 8 um off).

So before predicting, the stack's focal plane is found from the brightfield itself
(`livestain.focus.estimate_focus`), the planes spanning the model's training z extent
around it are cut out (planes beyond the stack's ends: `window_planes`), the model
predicts that window, and the prediction is put back in place. Planes of the stack
outside the window lie far from the cells: they get the window's own background (the
median of its nearest edge plane, per structure), not a guess of the network on data
it never saw. Where the contrast minimum cannot be seen (the cells at the stack's end
or just beyond it), the halos' change of sign places them (`livestain.focus.locate_cells`); stacks
without either (phase contrast, no cells, the cells far outside the stack) are
predicted as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from livestain.focus import MIN_FOCUS_PLANES, FocusEstimate, estimate_focus, focus_dip, plane_contrast

#: z extent (um) assumed for a model whose checkpoint does not record its training
#: stacks' (the bundled recipe's: 16 planes, 1 um apart).
DEFAULT_EXTENT_UM = 16.0


def training_geometry(stacks: Sequence[np.ndarray], z_step_um: float) -> dict[str, float | None]:
    """What a checkpoint records of its training stacks' z geometry: their extent
    (``train_extent_um``, the median), where the cells' focal plane sat in them
    (``train_focus_offset_um`` from the stack's centre, the median over stacks where it
    was found; 0 when none), and their brightfield contrast dip at focus
    (``train_focus_dip``, `livestain.focus.focus_dip`, the median over stacks of
    `MIN_FOCUS_PLANES` planes or more; None when none has that many: the median, so a
    randomised recipe whose stacks mostly hold the focus counts as having a dip).

    Why the dip: the input checks flag a stack without one as out of focus, which is
    right for stacks like the simulator's (a dip of 0.28-0.44 at focus) and wrong for a
    model trained on stacks that never had a clear one (a real 6-plane defocus series
    10-25 um apart: 0.71-0.79 binned, 0.96-1.07 native; its held-out field, DNA r 0.81,
    was flagged at confidence 0.17-0.19). The checks read this record to tell the two
    apart (`inference.ood.check_stack`'s ``model_focus_dip``, `inference.ood.CLEAR_DIP_RATIO`)."""
    # each stack's contrast once, for the focus and the dip (too thin a stack shows neither)
    contrasts = [plane_contrast(s)[0] if s.shape[0] >= MIN_FOCUS_PLANES else None for s in stacks]
    offsets = [f.offset_um for f in (estimate_focus(s, z_step_um, c) for s, c in zip(stacks, contrasts))
               if f.offset_um is not None]
    dips = [focus_dip(c) for c in contrasts if c is not None]
    return {"train_extent_um": float(np.median([s.shape[0] * z_step_um for s in stacks])),
            "train_focus_offset_um": round(float(np.median(offsets)), 3) if offsets else 0.0,
            "train_focus_dip": round(float(min(np.median(dips), 1e9)), 3) if dips else None}


def training_extent_um(meta_extra: dict, voxel_z_um: float) -> float:
    """The z extent of a model's training stacks, from its checkpoint's provenance:
    ``train_extent_um`` when recorded, else the training patch's z size, else
    `DEFAULT_EXTENT_UM`."""
    if (extent := meta_extra.get("train_extent_um")) is not None:
        return float(extent)
    patch = (meta_extra.get("settings") or {}).get("patch")
    if patch:
        return float(patch[0]) * float(voxel_z_um)
    return DEFAULT_EXTENT_UM


def model_window_um(meta) -> tuple[float, float]:
    """(z extent, focus offset from the centre) in um of the window a model was trained
    on, from its checkpoint's ``meta`` (`training_extent_um`, ``train_focus_offset_um``):
    what `plan_window` needs to cut that window again."""
    return (training_extent_um(meta.extra, meta.voxel_size_um[0]),
            float(meta.extra.get("train_focus_offset_um", 0.0)))


@dataclass(frozen=True)
class Window:
    """Planes ``indices`` of the stack (clipped: repeats at the ends) make the window;
    plane ``i`` of the window is plane ``first + i`` of the stack when that exists."""

    first: int
    indices: np.ndarray
    focus: FocusEstimate

    @property
    def size(self) -> int:
        return len(self.indices)


def plan_window(stack: np.ndarray, z_step_um: float, extent_um: float,
                focus: FocusEstimate | None = None, focus_offset_um: float = 0.0) -> Window | None:
    """The window to predict from, or None to predict the whole stack as it is (no
    focus found, or the stack already is the model's window).

    ``focus_offset_um`` is where the cells' focal plane sat in the model's training
    stacks, from their centre (`training_geometry`): the window puts it there again.
    """
    nz = stack.shape[0]
    focus = focus or estimate_focus(stack, z_step_um)
    if focus.plane is None:
        return None
    size = max(1, int(round(extent_um / float(z_step_um))))
    centre = focus.plane - float(focus_offset_um) / float(z_step_um)
    first = int(round(centre - (size - 1) / 2))
    if size == nz and first == 0:
        return None
    indices = np.clip(np.arange(first, first + size), 0, nz - 1)
    return Window(first, indices, focus)


#: Smoothing (pixels) that separates a plane's illumination from its halos when a plane
#: beyond the stack is made by reflection (`window_planes`).
ILLUMINATION_SIGMA_PX = 8.0


#: When the focus lies beyond the stack's end, missing planes up to this far from it are
#: made by reflection (`window_planes`); further out the weak-object picture fails
#: (measured: reflecting every missing plane cost DNA r 0.96 -> 0.75-0.83 at 4 um off
#: the cells; 2, 3 and 4 um gave worst DNA r 0.81, 0.81, 0.73 over +-8 um).
REFLECT_UM = 3.0


def window_planes(stack: np.ndarray, window: Window, z_step_um: float) -> np.ndarray:
    """The window's planes: the stack's where it has them. Beyond its ends, the edge
    plane repeated, except when the focus itself lies beyond the end (extrapolated by
    `livestain.focus.locate_cells`): then planes within `REFLECT_UM` of the focus are the plane as far
    on the other side of it with its halos reversed, and further out the outermost
    plane so far is repeated.

    Near focus a cell's brightfield is its illumination plus halos whose sign flips at
    the focal plane and whose size grows with the distance to it, so the plane a
    distance d below the focus is, to first order, the illumination minus the halos of
    the plane d above it. When the cells sit at the stack's end (8 um off them), the
    planes next to the focus on one side are missing; repeating the edge plane there
    put halos of the wrong sign where the model looks for the nucleus.
    """
    from scipy import ndimage as ndi

    nz = stack.shape[0]
    wanted = np.arange(window.first, window.first + window.size)
    out = stack[np.clip(wanted, 0, nz - 1)].astype(np.float32)
    focus = window.focus.plane
    if focus is None or 0 <= focus <= nz - 1:
        # the stack holds the focus and planes on both sides of it: the edge plane is
        # the better stand-in (measured at 8 um off: DNA r 0.91 repeated, 0.81 reflected)
        return out
    reach = REFLECT_UM / float(z_step_um)
    inside = np.flatnonzero((wanted >= 0) & (wanted < nz))
    if inside.size == 0:
        return out
    # outward from the stack's ends, so "the outermost plane so far" is always filled
    for order in (range(inside[0] - 1, -1, -1), range(inside[-1] + 1, len(wanted))):
        previous = None
        for i in order:
            mirror = int(round(2 * focus - wanted[i]))
            if abs(wanted[i] - focus) <= reach and 0 <= mirror < nz:
                plane = stack[mirror].astype(np.float32)
                out[i] = 2 * ndi.gaussian_filter(plane, ILLUMINATION_SIGMA_PX, truncate=3.0) - plane
            elif previous is not None:
                out[i] = out[previous]
            previous = i
    return out


def place(window_prediction: np.ndarray, window: Window, nz: int) -> np.ndarray:
    """(s, nz, y, x) from the window's (s, w, y, x) prediction (see the module docstring)."""
    s, w = window_prediction.shape[:2]
    out = np.empty((s, nz, *window_prediction.shape[2:]), np.float32)
    lo, hi = max(0, window.first), min(nz, window.first + w)
    if hi > lo:
        out[:, lo:hi] = window_prediction[:, lo - window.first : hi - window.first]
    below = np.median(window_prediction[:, 0].reshape(s, -1), axis=1)
    above = np.median(window_prediction[:, -1].reshape(s, -1), axis=1)
    out[:, :lo] = below[:, None, None, None]
    out[:, hi:] = above[:, None, None, None]
    return out


def z_step_of(voxel_size_um: Sequence[float] | None, model_voxel_um: Sequence[float]) -> float:
    """The stack's z step: its declared one, else the model's (the stack is then
    assumed to be at the model's voxel size, as `Predictor` assumes)."""
    return float((voxel_size_um or model_voxel_um)[0])

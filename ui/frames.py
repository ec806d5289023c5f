"""What the three views show for one stack + prediction, computed without Qt.

`FrameRenderer` turns the shown records, the z plane, the projection mode, the
crosshair and the structure styles into grey images, their levels and RGBA overlays
for the XY, XZ and YZ views. Anything that depends only on a frame (levels,
projections, the sharpest plane) is cached by the record's serial number, so a slider
step costs only slicing and compositing, never another percentile or projection.
Large frames are sliced with a stride (`render.display_step`) before anything else.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from livestain.ui import render
from livestain.ui.colors import structure_color
from livestain.ui.history import Received
from livestain.ui.structure_panel import StructureStyle

#: Derived images and levels kept between redraws (a few frames' worth).
CACHE_ENTRIES = 64

Levels = tuple[float, float]
Rect = tuple[float, float, float, float]  # x, y, width, height in full-resolution units
T = TypeVar("T")


@dataclass
class ViewImages:
    """One view's content: a grey image (None without a stack), its levels, an overlay."""

    base: np.ndarray | None
    levels: Levels
    overlay: np.ndarray
    rect: Rect


@dataclass
class Frame:
    """Everything the window draws for one redraw."""

    xy: ViewImages
    xz: ViewImages
    yz: ViewImages
    shape: tuple[int, int, int]  # (nz, ny, nx) at full resolution
    z: int  # the plane shown (the sharpest one in "focus" mode)
    z_scale: float  # z step / pixel size: height of one plane in the section views
    auto_levels: dict[str, Levels] = field(default_factory=dict)  # per structure, for display


class FrameRenderer:
    """Computes `Frame`s, reusing compositing buffers and cached per-frame results."""

    def __init__(self, display_max_px: int = render.DISPLAY_MAX_PX) -> None:
        self.display_max_px = display_max_px
        self._cache: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._comp = {k: render.Compositor() for k in ("xy", "xz", "yz")}

    def clear(self) -> None:
        self._cache.clear()

    def render(
        self,
        stack: Received | None,
        pred: Received | None,
        z: int,
        mode: str,
        cross: tuple[int, int] | None,
        styles: Mapping[str, StructureStyle],
    ) -> Frame | None:
        """The images for ``stack`` and/or ``pred`` (None when both are None).

        ``cross`` is the full-resolution (x, y) the sections pass through (default: the
        centre); structures missing from ``styles`` are drawn with default styles.
        """
        if stack is None and pred is None:
            return None
        nz, ny, nx = stack.array.shape if stack is not None else pred.array.shape[1:]
        z = min(max(z, 0), nz - 1)
        if mode == "focus" and stack is not None:
            z = self._cached(("focus", stack.serial), lambda: render.best_focus_plane(stack.array))
        cx, cy = cross or (nx // 2, ny // 2)
        cx, cy = min(max(cx, 0), nx - 1), min(max(cy, 0), ny - 1)
        az = _z_scale(stack or pred)  # type: ignore[arg-type]
        s = render.display_step(ny, nx, self.display_max_px)
        auto: dict[str, Levels] = {}
        shown = self._shown(pred, styles)
        sec_levels = self._volume_levels(stack)

        # XY: a plane (or the sharpest one) or a projection
        projection = mode in ("max", "mean")
        if stack is None:
            base, levels = None, (0.0, 1.0)
        elif projection:
            key = ("proj", stack.serial, mode, s)
            base = self._cached(key, lambda: render.project(stack.array[:, ::s, ::s], mode))
            levels = self._cached(("levels", key), lambda: render.auto_levels(base, render.BASE_PERCENTILES))
        else:
            base, levels = stack.array[z, ::s, ::s], sec_levels
        xy = ViewImages(base, levels, self._overlay_xy(pred, shown, z, mode, (ny, nx), auto), (0, 0, nx, ny))

        # XZ (rows are z) through row cy, YZ (columns are z) through column cx
        xz_base = stack.array[:, cy, ::s] if stack is not None else None
        yz_base = stack.array[:, ::s, cx].T if stack is not None else None
        xz = ViewImages(xz_base, sec_levels, self._section(pred, shown, "xz", cy / ny, (nz, -(-nx // s)), auto),
                        (0, 0, nx, nz * az))
        yz = ViewImages(yz_base, sec_levels, self._section(pred, shown, "yz", cx / nx, (-(-ny // s), nz), auto),
                        (0, 0, nz * az, ny))
        return Frame(xy, xz, yz, (nz, ny, nx), z, az, auto)

    # -- helpers ----------------------------------------------------------------------

    def _cached(self, key: tuple[Any, ...], make: Callable[[], T]) -> T:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._cache[key] = make()
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return value

    def _volume_levels(self, stack: Received | None) -> Levels:
        if stack is None:
            return (0.0, 1.0)
        return self._cached(("levels", stack.serial),
                            lambda: render.auto_levels(stack.array, render.BASE_PERCENTILES))

    @staticmethod
    def _shown(pred: Received | None, styles: Mapping[str, StructureStyle]
               ) -> list[tuple[int, StructureStyle]]:
        """(channel, style) of each visible structure of ``pred``."""
        if pred is None:
            return []
        out = []
        for i, name in enumerate(pred.header.structures):
            style = styles.get(name) or StructureStyle(structure_color(name))
            if style.visible:
                out.append((i, style))
        return out

    def _levels(self, pred: Received, i: int, style: StructureStyle, source: np.ndarray,
                tag: tuple[Any, ...], auto: dict[str, Levels]) -> Levels:
        if not style.auto:
            return style.vmin, max(style.vmax, style.vmin + 1e-6)
        key = ("slevels", pred.serial, i, style.percentiles, *tag)
        lv = self._cached(key, lambda: render.auto_levels(source, style.percentiles, render.MIN_OVERLAY_SPAN))
        auto.setdefault(pred.header.structures[i], lv)
        return lv

    def _overlay_xy(self, pred: Received | None, shown: list[tuple[int, StructureStyle]], z: int,
                    mode: str, shape: tuple[int, int], auto: dict[str, Levels]) -> np.ndarray:
        comp = self._comp["xy"]
        if pred is None:
            s = render.display_step(*shape, self.display_max_px)
            return comp.composite(-(-shape[0] // s), -(-shape[1] // s), [], [], [], [])
        arr = pred.array
        s = render.display_step(*arr.shape[2:], self.display_max_px)
        if mode in ("max", "mean"):
            key = ("proj", pred.serial, mode, s)
            proj = self._cached(key, lambda: render.project(arr[:, :, ::s, ::s], mode, axis=1))
            planes = [proj[i] for i, _ in shown]
            levels = [self._levels(pred, i, st, proj[i], (mode,), auto) for i, st in shown]
        else:
            zp = min(z, arr.shape[1] - 1)
            planes = [arr[i, zp, ::s, ::s] for i, _ in shown]
            levels = [self._levels(pred, i, st, arr[i], ("volume",), auto) for i, st in shown]
        return comp.composite(-(-arr.shape[2] // s), -(-arr.shape[3] // s), planes,
                              [st.color for _, st in shown], [st.opacity for _, st in shown], levels)

    def _section(self, pred: Received | None, shown: list[tuple[int, StructureStyle]], which: str,
                 frac: float, empty_shape: tuple[int, int], auto: dict[str, Levels]) -> np.ndarray:
        """XZ (``frac`` = y / ny) or YZ (``frac`` = x / nx) section of the prediction, at
        the volume's levels; a transparent ``empty_shape`` image without a prediction."""
        comp = self._comp[which]
        if pred is None:
            return comp.composite(*empty_shape, [], [], [], [])
        arr = pred.array
        s = render.display_step(*arr.shape[2:], self.display_max_px)
        if which == "xz":
            sections = arr[:, :, min(int(frac * arr.shape[2]), arr.shape[2] - 1), ::s]
        else:
            sections = arr[:, :, ::s, min(int(frac * arr.shape[3]), arr.shape[3] - 1)].transpose(0, 2, 1)
        levels = [self._levels(pred, i, st, arr[i], ("volume",), auto) for i, st in shown]
        return comp.composite(*sections.shape[1:], [sections[i] for i, _ in shown],
                              [st.color for _, st in shown], [st.opacity for _, st in shown], levels)


def _z_scale(rec: Received) -> float:
    """Plane height in pixel units (z step / x pixel size), kept within sane bounds."""
    vz, _, vx = rec.header.voxel_size_um
    return float(np.clip(vz / vx, 0.05, 50.0)) if vz > 0 and vx > 0 else 1.0

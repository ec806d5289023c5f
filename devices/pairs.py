"""Paired training data from the simulator: noisy brightfield stacks + structure truth.

The brightfield stack goes through the same camera model as the simulated camera, so a
model trained here sees what the daemon will stream; the targets are the noise-free
blurred label densities (what an ideal fluorescence image of each structure would be).
Optionally each structure's fluorescence stack is also rendered as the camera would see
it (shot + read noise, uint16), as `livestain simulate` writes it.
Imports no pymmcore: it renders from `devices.sample` and `devices.optics` directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .optics import FieldRenderer, OpticsConfig, to_camera_counts
from .sample import STRUCTURES, SampleGeometry, make_field


@dataclass
class Pair:
    """One field: ``brightfield`` (z, y, x) uint16 and ``targets`` (s, z, y, x) float32.

    ``fluorescence`` (s, z, y, x) uint16 is the camera's view of each structure when
    `simulate_pairs` was asked for it (``noisy_fluorescence=True``), else None.
    """

    brightfield: np.ndarray
    targets: np.ndarray
    structures: tuple[str, ...]
    voxel_size_um: tuple[float, float, float]
    tile: tuple[int, int]
    z_um: np.ndarray | None = None
    fluorescence: np.ndarray | None = None


def default_z_planes(center_um: float = 4.0, n: int = 16, step_um: float = 1.0) -> np.ndarray:
    """The demo's z-plan: ``n`` planes ``step_um`` apart, centred on the cells."""
    return center_um + (np.arange(n) - (n - 1) / 2) * step_um


def simulate_pairs(
    tiles: Sequence[tuple[int, int]],
    seed: int = 0,
    z_planes_um: Sequence[float] | None = None,
    exposure_ms: float = 10.0,
    geometry: SampleGeometry | None = None,
    optics: OpticsConfig | None = None,
    structures: Sequence[str] = STRUCTURES,
    *,
    t_s: float = 0.0,
    noisy_fluorescence: bool = False,
    fluorescence_exposure_ms: float | None = None,
) -> Iterator[Pair]:
    """Render one `Pair` per stage tile, reproducibly from ``seed``.

    ``t_s`` renders the cells where they have moved to after that many seconds (0: as
    generated; no light dose, so no bleaching). Brightfield noise is drawn first, so
    asking for noisy fluorescence leaves the brightfield stacks unchanged.
    """
    geo = geometry or SampleGeometry()
    opt = optics or OpticsConfig()
    zs = np.asarray(default_z_planes() if z_planes_um is None else z_planes_um, float)
    step = float(np.diff(zs).mean()) if len(zs) > 1 else geo.voxel_um[0]
    fl_ms = exposure_ms if fluorescence_exposure_ms is None else fluorescence_exposure_ms
    for tile in tiles:
        rng = np.random.default_rng([seed, tile[0] & 0xFFFF, tile[1] & 0xFFFF, 7])
        field = make_field(seed, tile, geo)
        r = FieldRenderer(field, opt)
        shifts = field.displacement(t_s) if t_s else None
        photons = opt.bf_photons_per_ms * exposure_ms
        bf = np.stack(
            [to_camera_counts(r.brightfield(z, shifts), photons, opt, rng) for z in zs]
        )
        tg = np.stack(
            [np.stack([r.fluorescence(s, z, shifts) for z in zs]) for s in structures]
        ).astype(np.float32)
        fl = None
        if noisy_fluorescence:
            per = opt.fl_photons_per_ms * fl_ms
            fl = np.stack(
                [np.stack([to_camera_counts(p, per, opt, rng) for p in t]) for t in tg]
            )
        yield Pair(bf, tg, tuple(structures), (step, *geo.voxel_um[1:]), tile, zs, fl)

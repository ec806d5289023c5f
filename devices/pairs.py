"""Paired training data from the simulator: noisy brightfield stacks + structure truth.

The brightfield stack goes through the same camera model as the simulated camera, so a
model trained here sees what the daemon will stream; the targets are the noise-free
blurred label densities (what an ideal fluorescence image of each structure would be).
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
    """One field: ``brightfield`` (z, y, x) uint16 and ``targets`` (s, z, y, x) float32."""

    brightfield: np.ndarray
    targets: np.ndarray
    structures: tuple[str, ...]
    voxel_size_um: tuple[float, float, float]
    tile: tuple[int, int]


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
) -> Iterator[Pair]:
    """Render one `Pair` per stage tile, reproducibly from ``seed``."""
    geo = geometry or SampleGeometry()
    opt = optics or OpticsConfig()
    zs = np.asarray(default_z_planes() if z_planes_um is None else z_planes_um, float)
    step = float(np.diff(zs).mean()) if len(zs) > 1 else geo.voxel_um[0]
    for tile in tiles:
        rng = np.random.default_rng([seed, tile[0] & 0xFFFF, tile[1] & 0xFFFF, 7])
        r = FieldRenderer(make_field(seed, tile, geo), opt)
        photons = opt.bf_photons_per_ms * exposure_ms
        bf = np.stack([to_camera_counts(r.brightfield(z), photons, opt, rng) for z in zs])
        tg = np.stack([np.stack([r.fluorescence(s, z) for z in zs]) for s in structures])
        yield Pair(bf, tg.astype(np.float32), tuple(structures), (step, *geo.voxel_um[1:]), tile)

"""Simulated training fields shaped like a user's own, to pretrain on before fine-tuning.

Why: the bundled model reads simulated 16-plane stacks 1 um apart; a user's data are
rarely that (a sparse defocus series, a few planes, another pixel size). On a real
brightfield defocus series with one training field, a network first trained on
simulated fields rendered at the data's *own* plane offsets and pixel size, then
fine-tuned, has a better worst crop and steadier seeds than one from scratch; with more
fields, and on cells unlike the simulator's, it does not help (docs/transfer.md).
`livestain train --sim-pretrain N` does that step: it renders ``N`` fields here and
trains on them before the user's fields.

What is assumed of the user's stack: its planes are evenly spaced at the voxel z size
and centred on the plane of the single-plane truth (the stain imaged in focus on the
cells); the simulated focus is drawn within ``focus_jitter_um`` of the cells' middle,
so a stack that is not exactly centred is still covered. The truth is the noise-free
label density at the cells' middle, blurred by the widefield PSF: what an in-focus
DAPI / Hoechst (or membrane, mitochondria) image is.

Lives beside, not inside, ``livestain.inference``: it imports the simulator
(``livestain.devices``, numpy and scipy only), which the inference package does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

#: Default number of simulated fields and their size (pixels): what the bench measured.
DEFAULT_FIELDS = 16
DEFAULT_SIZE = 256
#: The simulator's own pixel size is 0.325 um; finer rendering than this buys nothing,
#: coarser is rendered finer and binned (fine structures are not aliased).
RENDER_PIXEL_UM = 0.325


def simulated_structure(name: str) -> str:
    """The simulator's name for ``name`` (``dapi`` -> ``dna``), or a ValueError naming what it has."""
    from livestain.devices.sample import STRUCTURES
    from livestain.inference.structures import canonical

    c = canonical(name)
    if c not in STRUCTURES:
        raise ValueError(f"the simulator renders {', '.join(STRUCTURES)} (and their aliases), not {name!r}: "
                         "drop --sim-pretrain, or train a model of those structures")
    return c


def simulated_like(
    offsets_um: Sequence[float],
    pixel_um: float,
    structures: Sequence[str],
    n_fields: int = DEFAULT_FIELDS,
    size: int = DEFAULT_SIZE,
    modality: str = "brightfield",
    focus_jitter_um: float = 1.0,
    seed: int = 4242,
    on_field: Callable[[int, int], None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_fields`` simulated ``(brightfield (z, y, x) camera counts, truth (s, y, x))`` pairs.

    ``offsets_um``: each brightfield plane's defocus from the truth's plane (negative =
    below); ``pixel_um``: the user's pixel size, rendered at up to 0.325 um and binned to
    it; ``modality``: brightfield, phase or dic (`devices.optics.MODALITIES`); a "dic"
    field draws its shear, bias and direction (oblique light varies with the condenser).
    ``on_field(done, total)`` reports progress.
    """
    from dataclasses import replace

    from livestain.devices.optics import MODALITIES, FieldRenderer, OpticsConfig, bin_pixels, to_camera_counts
    from livestain.devices.randomize import cells_mid_um
    from livestain.devices.sample import CellPopulation, SampleGeometry, make_field

    if modality not in MODALITIES:
        raise ValueError(f"--sim-modality must be one of {', '.join(MODALITIES)}; got {modality!r}")
    if not 0.02 <= pixel_um <= 5.0:
        raise ValueError(f"pixel size {pixel_um} um is outside 0.02-5 um: check the data's voxel size "
                         "(--voxel-size Z,Y,X)")
    if n_fields < 1 or size < 32:
        raise ValueError("simulate at least 1 field of at least 32 pixels")
    names = [simulated_structure(s) for s in structures]
    k = max(1, math.ceil(pixel_um / RENDER_PIXEL_UM - 1e-6))  # render k x finer, then bin
    geo = SampleGeometry(shape=(SampleGeometry().shape[0], size * k, size * k),
                         voxel_um=(SampleGeometry().voxel_um[0], pixel_um / k, pixel_um / k))
    base = OpticsConfig(modality=modality, magnification=OpticsConfig().camera_pixel_um * k / pixel_um)
    offsets = np.asarray(offsets_um, float)
    rng = np.random.default_rng(seed)
    grid = geo.plane_z_um()

    def binned(a: np.ndarray) -> np.ndarray:  # the mean of k x k blocks: the user's pixel
        return bin_pixels(a, k) / np.float32(k * k)

    out = []
    for i in range(n_fields):
        field = make_field(seed, (i, 11), geo, CellPopulation())
        mid = cells_mid_um(field)
        mid = float(np.mean(grid)) if mid is None else mid
        optics = base
        if modality == "dic":
            optics = replace(base, dic_shear_um=float(rng.uniform(0.15, 0.5)),
                             dic_bias_rad=float(rng.uniform(0.3, 1.5)), dic_angle_deg=float(rng.uniform(0, 360)))
        zs = mid + float(rng.uniform(-focus_jitter_um, focus_jitter_um)) + offsets
        beyond = max(grid[0] - zs.min(), zs.max() - grid[-1], 0.0)
        renderer = FieldRenderer(field, optics, z_margin_um=beyond + 1.0 if beyond > 0 else 0.0)
        noise = np.random.default_rng([seed, i, 11])
        photons = optics.bf_photons_per_ms * 10.0 * (optics.phase_ring_amplitude**2 if modality == "phase" else 1.0)
        bf = np.stack([to_camera_counts(binned(renderer.brightfield(float(z))), photons, optics, noise)
                       for z in zs]).astype(np.float32)
        truth = np.stack([binned(renderer.fluorescence(s, mid)) for s in names]).astype(np.float32)
        out.append((bf, truth))
        if on_field is not None:
            on_field(i + 1, n_fields)
    return out


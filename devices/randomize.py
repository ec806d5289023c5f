"""Domain randomisation for the simulator: fields drawn from wide acquisition ranges.

The bundled model was trained on one acquisition (16 planes 1 um apart centred on the
cells, 0.325 um pixels, NA 0.5 brightfield, 10 ms) and is right only there (issue 11).
Users' stacks differ in every one of those, so training and measuring need fields
drawn from wide ranges of them. This module holds the ranges (`Ranges`), draws one
field's parameters as a plain JSON-able dict (`draw`), turns a dict into the sample,
optics and z-plan it describes (`apply`) and renders the field (`render`).

The dict is the record: ``livestain simulate --randomize`` writes it next to every
field, and `render` of the same dict, seed and tile gives the same stacks again.
`training_default` is the dict of the bundled model's acquisition, so a benchmark can
vary one factor at a time from it (``bench/robustness.py``).

What is drawn (see `Ranges` for the figures):

* geometry: focus offset of the stack from the cells' mid-plane, z range, z step
  (planes capped at ``max_planes``), pixel size (rendered at <= 0.45 um and binned,
  as a camera pixel integrates; the field stays ``size`` x ``size`` pixels, so a small
  pixel sees less of the dish);
* optics: objective NA, condenser NA (as a fraction of the objective's), brightfield
  or Zernike phase contrast (`devices.optics`), uneven illumination (a tilt and a
  vignette), out-of-focus dust (dark blurred spots the same in every plane);
* camera: exposure, bit depth, offset, read noise, gain (set so the brightest 0.1% of
  the middle plane fill a drawn fraction of the range, as a user adjusts it);
* sample: typical, dense touching colonies, sparse rounded cells, or an empty field;
  cell density, body and nucleus sizes, refractive-index contrast, an empty region.

Not drawn (the simulator has no model of them): DIC, multiple scattering, spherical
aberration from index mismatch, tilted samples, cell types other than the one
adherent-cell model, per-structure emission wavelengths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .optics import FieldRenderer, OpticsConfig, to_camera_counts
from .pairs import Pair
from .sample import STRUCTURES, CellPopulation, SampleField, SampleGeometry, make_field

#: Stage z of the training stack's centre (``livestain simulate --z-center`` default).
NOMINAL_CENTER_UM = 4.0
#: Cells per 10^4 um^2 of the default sample (4 cells on a 256 x 0.325 um tile).
DEFAULT_DENSITY = 4.0 / (256 * 0.325) ** 2 * 1e4
#: Finest pixel the sample is rendered at before binning to a coarser camera pixel.
MAX_RENDER_PIXEL_UM = 0.45
#: Axial voxel of the sample grid (um); planes in between are interpolated.
SAMPLE_VZ_UM = 0.5


@dataclass(frozen=True)
class Ranges:
    """The ranges `draw` samples from. Pairs are (low, high); ``p_*`` are probabilities.

    Log-uniform where a quantity is a scale (z step, pixel, exposure), uniform
    otherwise. Sample kinds: ``dense`` (touching colony), ``rounded`` (sparse rounded
    cells), ``empty`` (no cells), else ``typical``.
    """

    focus_offset_um: tuple[float, float] = (-10.0, 10.0)
    z_range_um: tuple[float, float] = (6.0, 40.0)
    z_step_um: tuple[float, float] = (0.2, 2.0)
    max_planes: int = 64
    pixel_um: tuple[float, float] = (0.1, 0.7)
    na_objective: tuple[float, float] = (0.3, 1.2)
    condenser_fraction: tuple[float, float] = (0.2, 0.9)
    p_phase: float = 0.3
    phase_ring_amplitude: tuple[float, float] = (0.3, 0.7)
    illumination_tilt: tuple[float, float] = (0.0, 0.3)
    illumination_vignette: tuple[float, float] = (0.0, 0.3)
    dust_spots: tuple[int, int] = (0, 8)
    dust_radius_um: tuple[float, float] = (2.0, 15.0)
    dust_contrast: tuple[float, float] = (0.02, 0.3)
    exposure_ms: tuple[float, float] = (1.0, 50.0)
    fl_exposure_ms: tuple[float, float] = (2.0, 50.0)
    bit_depths: tuple[int, ...] = (8, 10, 12, 14, 16)
    offset_fraction: tuple[float, float] = (0.0, 0.1)
    bright_fill: tuple[float, float] = (0.15, 0.8)
    read_noise_e: tuple[float, float] = (0.7, 6.0)
    p_dense: float = 0.25
    p_rounded: float = 0.2
    p_empty: float = 0.05
    p_empty_region: float = 0.15
    empty_region: tuple[float, float] = (0.2, 0.5)
    density_typical: tuple[float, float] = (3.0, 9.0)
    density_dense: tuple[float, float] = (18.0, 30.0)
    density_sparse: tuple[float, float] = (1.0, 4.0)
    nucleus_frac: tuple[float, float] = (0.3, 0.7)
    ri_scale: tuple[float, float] = (0.5, 1.6)


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def _logu(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1]))))


def _population(rng: np.random.Generator, r: Ranges) -> dict[str, Any]:
    """The sample part of a draw: kind, density and cell shapes."""
    u = float(rng.uniform())
    c = _u(rng, r.nucleus_frac)  # centre of this field's nucleus-size range
    nuc = [round(max(r.nucleus_frac[0], c - 0.07), 4), round(min(r.nucleus_frac[1], c + 0.07), 4)]
    ri = round(_u(rng, r.ri_scale), 4)
    empty = round(_u(rng, r.empty_region), 4) if rng.uniform() < r.p_empty_region else 0.0
    if u < r.p_empty:
        return {"kind": "empty", "n_cells": [0, 1], "density_per_1e4um2": 0.0,
                "ri_scale": ri, "empty_fraction": 0.0}
    if u < r.p_empty + r.p_dense:
        return {"kind": "dense", "density_per_1e4um2": round(_u(rng, r.density_dense), 3),
                "body_xy_um": [6.0, 10.0], "body_z_um": [2.5, 4.5], "nucleus_frac": nuc,
                "ri_scale": ri, "max_overlap": 0.35, "attempts_per_cell": 10, "empty_fraction": 0.0}
    if u < r.p_empty + r.p_dense + r.p_rounded:
        return {"kind": "rounded", "density_per_1e4um2": round(_u(rng, r.density_sparse), 3),
                "body_xy_um": [5.0, 8.0], "body_z_um": [4.5, 7.5], "nucleus_frac": nuc,
                "ri_scale": ri, "empty_fraction": empty}
    return {"kind": "typical", "density_per_1e4um2": round(_u(rng, r.density_typical), 3),
            "body_xy_um": [7.0, 11.0], "body_z_um": [3.0, 4.5], "nucleus_frac": nuc,
            "ri_scale": ri, "empty_fraction": empty}


def draw(rng: np.random.Generator, ranges: Ranges | None = None) -> dict[str, Any]:
    """One field's acquisition and sample, drawn from ``ranges``; a JSON-able dict.

    Only ``rng`` decides the result, so a seeded generator reproduces it.
    """
    r = ranges or Ranges()
    step = _logu(rng, r.z_step_um)
    z_range = _u(rng, r.z_range_um)
    n_planes = int(min(r.max_planes, max(2, round(z_range / step) + 1)))
    na = _u(rng, r.na_objective)
    phase = bool(rng.uniform() < r.p_phase)
    bits = int(rng.choice(r.bit_depths))
    n_dust = int(rng.integers(r.dust_spots[0], r.dust_spots[1] + 1))
    dust = [[round(float(rng.uniform()), 4), round(float(rng.uniform()), 4),
             round(_u(rng, r.dust_radius_um), 3), round(_u(rng, r.dust_contrast), 4)]
            for _ in range(n_dust)]
    params: dict[str, Any] = {
        "focus_reference": "cells",
        "focus_offset_um": round(_u(rng, r.focus_offset_um), 3),
        "z_step_um": round(step, 4),
        "n_planes": n_planes,
        "pixel_um": round(_logu(rng, r.pixel_um), 4),
        "na_objective": round(na, 4),
        "na_condenser": round(na * _u(rng, r.condenser_fraction), 4),
        "modality": "phase" if phase else "brightfield",
        "phase_ring_amplitude": round(_u(rng, r.phase_ring_amplitude), 4) if phase else None,
        "illumination_tilt": round(_u(rng, r.illumination_tilt), 4),
        "illumination_angle_rad": round(float(rng.uniform(0, 2 * np.pi)), 4),
        "illumination_vignette": round(_u(rng, r.illumination_vignette), 4),
        "dust": dust,
        "exposure_ms": round(_logu(rng, r.exposure_ms), 4),
        "fl_exposure_ms": round(_logu(rng, r.fl_exposure_ms), 4),
        "bit_depth": bits,
        "offset_adu": round(_u(rng, r.offset_fraction) * (2**bits - 1), 2),
        "bright_fill": round(_u(rng, r.bright_fill), 4),
        "gain_e_per_adu": None,  # set by `render` from the fill: it depends on the photons
        "read_noise_e": round(_u(rng, r.read_noise_e), 4),
        "population": _population(rng, r),
    }
    params["z_range_um"] = round((n_planes - 1) * params["z_step_um"], 4)
    return params


def training_default() -> dict[str, Any]:
    """The bundled model's acquisition as a parameter dict (`livestain simulate`'s
    defaults): what a benchmark varies one factor at a time from."""
    o = OpticsConfig()
    return {
        "focus_reference": "nominal",
        "focus_offset_um": 0.0,
        "z_step_um": 1.0,
        "n_planes": 16,
        "z_range_um": 15.0,
        "pixel_um": o.pixel_size_um,
        "na_objective": o.na_objective,
        "na_condenser": o.na_condenser,
        "modality": "brightfield",
        "phase_ring_amplitude": None,
        "illumination_tilt": 0.0,
        "illumination_angle_rad": 0.0,
        "illumination_vignette": 0.0,
        "dust": [],
        "exposure_ms": 10.0,
        "fl_exposure_ms": 10.0,
        "bit_depth": 16,
        "offset_adu": o.offset_adu,
        "bright_fill": None,
        "gain_e_per_adu": 1.0,
        "read_noise_e": o.read_noise_e,
        "population": {"kind": "typical", "n_cells": [3, 6]},
    }


@dataclass(frozen=True)
class Scene:
    """What a parameter dict builds: the sample grid, the cells, the optics, binning."""

    geometry: SampleGeometry
    population: CellPopulation
    optics: OpticsConfig
    bin: int
    size: int


def apply(params: dict[str, Any], size: int = 256) -> Scene:
    """Sample grid, cell population and optics of ``params`` for a ``size``-pixel field.

    The grid keeps the default's z extent (stage -5 to 14.5 um) unless taller cells
    need more; planes outside it are rendered by the optics (see `render`).
    """
    pixel = float(params["pixel_um"])
    k = max(1, math.ceil(pixel / MAX_RENDER_PIXEL_UM - 1e-9))
    pop_p = dict(params["population"])
    area = (size * pixel) ** 2
    if "n_cells" in pop_p:
        n_cells = tuple(int(v) for v in pop_p["n_cells"])
    else:
        n = max(1, round(float(pop_p["density_per_1e4um2"]) * area / 1e4))
        n_cells = (n, n + 1)
    fields = {f.name for f in dataclasses.fields(CellPopulation)}
    kw = {key: (tuple(v) if isinstance(v, list) else v) for key, v in pop_p.items() if key in fields}
    kw["n_cells"] = n_cells
    pop = CellPopulation(**kw)
    z0 = -5.0
    top = max(14.5, 2.0 * pop.body_z_um[1] + 3.0)
    nz = int(round((top - z0) / SAMPLE_VZ_UM)) + 1
    geo = SampleGeometry(shape=(nz, size * k, size * k),
                         voxel_um=(SAMPLE_VZ_UM, pixel / k, pixel / k), z0_um=z0)
    base = OpticsConfig()
    optics = dataclasses.replace(
        base,
        na_objective=float(params["na_objective"]),
        na_condenser=float(params["na_condenser"]),
        modality=params["modality"],
        phase_ring_amplitude=float(params["phase_ring_amplitude"] or base.phase_ring_amplitude),
        read_noise_e=float(params["read_noise_e"]),
        offset_adu=float(params["offset_adu"]),
        magnification=base.camera_pixel_um / pixel,
    )
    return Scene(geo, pop, optics, k, size)


def cells_mid_um(field: SampleField) -> float | None:
    """Stage z of the cells' mid-plane: the |RI contrast|-weighted mean height (where
    brightfield's contrast passes through its minimum); None for an empty field."""
    w = np.abs(field.delta_n).sum(axis=(1, 2), dtype=np.float64)
    if w.sum() <= 0:
        return None
    return float((field.geometry.plane_z_um() * w).sum() / w.sum())


def z_planes(params: dict[str, Any], mid_um: float | None) -> tuple[np.ndarray, float]:
    """The stack's plane positions (stage z, um) and its centre."""
    ref = NOMINAL_CENTER_UM
    if params["focus_reference"] == "cells" and mid_um is not None:
        ref = mid_um
    centre = ref + float(params["focus_offset_um"])
    n, step = int(params["n_planes"]), float(params["z_step_um"])
    return centre + (np.arange(n) - (n - 1) / 2) * step, centre


def _bin(img: np.ndarray, k: int) -> np.ndarray:
    """Mean of k x k pixel blocks: a coarse camera pixel integrating a fine grid."""
    if k == 1:
        return img
    ny, nx = img.shape[0] // k, img.shape[1] // k
    return img[: ny * k, : nx * k].reshape(ny, k, nx, k).mean(axis=(1, 3))


def illumination(params: dict[str, Any], size: int, pixel_um: float) -> np.ndarray:
    """Multiplicative (y, x) field of uneven illumination and dust, the same at every
    focus (the lamp's falloff and dirt on the condenser or camera window do not move
    with the objective)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yn, xn = yy / max(size - 1, 1) - 0.5, xx / max(size - 1, 1) - 0.5
    a = float(params["illumination_angle_rad"])
    field = 1.0 + float(params["illumination_tilt"]) * (np.cos(a) * xn + np.sin(a) * yn)
    field *= 1.0 - float(params["illumination_vignette"]) * 2.0 * (xn**2 + yn**2)
    for y, x, radius, contrast in params["dust"]:
        r2 = ((yy - y * size) ** 2 + (xx - x * size) ** 2) * pixel_um**2
        field *= 1.0 - contrast * np.exp(-r2 / (2.0 * radius**2))
    return field.astype(np.float32)


def render(
    params: dict[str, Any],
    seed: int,
    tile: tuple[int, int] = (0, 0),
    size: int = 256,
    noisy_fluorescence: bool = False,
) -> tuple[Pair, dict[str, Any]]:
    """The field ``params`` describes, and its record: ``params`` plus what rendering
    decided (stack centre, cells' mid-plane, cell count, gain, render binning).

    Cells come from ``(seed, tile)`` as in `devices.pairs.simulate_pairs`, camera noise
    from the same generator it uses, so equal inputs give equal stacks.
    """
    scene = apply(params, size)
    field = make_field(seed, tile, scene.geometry, scene.population)
    mid = cells_mid_um(field)
    zs, centre = z_planes(params, mid)
    o = scene.optics
    sigma_z = 0.66 * o.n_medium * o.emission_um / o.na_objective**2
    grid = scene.geometry.plane_z_um()
    beyond = max(grid[0] - zs.min(), zs.max() - grid[-1], 0.0)
    margin = min(beyond, 5.0 * sigma_z) + 1.0 if beyond > 0 else 0.0
    renderer = FieldRenderer(field, o, z_margin_um=margin)
    k = scene.bin
    pixel = float(params["pixel_um"])
    light = illumination(params, size, pixel)
    photons = o.bf_photons_per_ms * float(params["exposure_ms"])
    if o.modality == "phase":
        photons *= o.phase_ring_amplitude**2  # the ring dims the background
    max_count = 2 ** int(params["bit_depth"]) - 1
    rel = [_bin(renderer.brightfield(z), k) * light for z in zs]
    gain = params.get("gain_e_per_adu")
    if gain is None:  # the user sets gain so the brightest 0.1% fill a fraction of the range
        bright = float(np.percentile(rel[len(rel) // 2], 99.9))
        fill = float(params["bright_fill"]) * (max_count - float(params["offset_adu"]))
        gain = max(photons * bright / max(fill, 1.0), 0.05)
    gain = float(gain)
    rng = np.random.default_rng([seed, tile[0] & 0xFFFF, tile[1] & 0xFFFF, 7])
    bf = np.stack([
        to_camera_counts(r, photons, o, rng, divide=gain, max_count=max_count) for r in rel
    ])
    tg = np.stack([
        np.stack([_bin(renderer.fluorescence(s, z), k) for z in zs]) for s in STRUCTURES
    ]).astype(np.float32)
    fl = None
    if noisy_fluorescence:
        per = o.fl_photons_per_ms * float(params["fl_exposure_ms"])
        fl = np.stack([np.stack([to_camera_counts(p, per, o, rng) for p in t]) for t in tg])
    step = float(params["z_step_um"])
    pair = Pair(bf, tg, STRUCTURES, (step, pixel, pixel), tile, zs, fl)
    record = {
        **params,
        "gain_e_per_adu": gain,  # unrounded: rendering the record gives the same counts
        "z_center_um": round(centre, 4),
        "cells_mid_um": None if mid is None else round(mid, 4),
        "n_cells": field.n_cells,
        "render_bin": k,
        "shape_zyx": list(bf.shape),
        "field_um": round(size * pixel, 3),
    }
    return pair, record

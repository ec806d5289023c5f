"""A seeded 3D synthetic cell sample: what the simulated microscope looks at.

Each stage position (a *tile* of the stage plane, one camera field wide) holds its own
field of a few adherent cells, generated from ``(seed, tile_x, tile_y)`` so the same
position always shows the same cells and different positions show different ones.

A field is two sets of co-registered volumes on one voxel grid:

* ``delta_n``: refractive-index contrast over the medium, the source of brightfield
  contrast (cells are nearly transparent, so this is all brightfield has to work with);
* ``labels[structure]``: fluorophore density per structure (``dna``, ``membrane``,
  ``mitochondria``), the source of each fluorescence channel.

Both come from the same geometry (cell body, nucleus, nucleoli, plasma membrane,
mitochondria, lipid droplets), which is what lets a network learn one from the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Fluorescence structures the sample carries, in channel order.
STRUCTURES: tuple[str, ...] = ("dna", "membrane", "mitochondria")

#: Refractive index increments over the medium (n_medium ~ 1.337), typical literature
#: values for mammalian cells (cytoplasm ~1.36-1.38, nucleoli and lipid droplets higher).
RI_CYTOPLASM = 0.025
RI_NUCLEUS_EXTRA = -0.004
RI_NUCLEOLUS_EXTRA = 0.015
RI_MITO_EXTRA = 0.012
RI_LIPID_EXTRA = 0.09
RI_MEMBRANE_EXTRA = 0.008


@dataclass(frozen=True)
class SampleGeometry:
    """The voxel grid a field is sampled on.

    Attributes
    ----------
    shape : tuple[int, int, int]
        (z, y, x) voxels; y/x match the camera sensor so one tile fills one field.
    voxel_um : tuple[float, float, float]
        (z, y, x) voxel size in micrometres; y/x equal the camera's pixel size.
    z0_um : float
        Stage z (um) of the first voxel plane, the coverslip surface.
    """

    shape: tuple[int, int, int] = (40, 256, 256)
    voxel_um: tuple[float, float, float] = (0.5, 0.325, 0.325)
    z0_um: float = -5.0

    @property
    def field_um(self) -> tuple[float, float]:
        """Width of one tile in (y, x) micrometres."""
        return (self.shape[1] * self.voxel_um[1], self.shape[2] * self.voxel_um[2])

    def plane_z_um(self) -> np.ndarray:
        """Stage z (um) of every voxel plane."""
        return self.z0_um + np.arange(self.shape[0]) * self.voxel_um[0]


@dataclass
class SampleField:
    """One stage tile's worth of cells: RI contrast and label densities."""

    geometry: SampleGeometry
    delta_n: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    n_cells: int = 0


def _ellipsoid(
    zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, c: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """Normalised radius squared of each voxel relative to an ellipsoid (<=1 inside)."""
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2


def make_field(
    seed: int, tile: tuple[int, int] = (0, 0), geometry: SampleGeometry | None = None
) -> SampleField:
    """Generate the cells of one stage tile, reproducibly from ``(seed, tile)``."""
    geo = geometry or SampleGeometry()
    rng = np.random.default_rng([seed & 0xFFFFFFFF, tile[0] & 0xFFFF, tile[1] & 0xFFFF])
    nz, ny, nx = geo.shape
    vz, vy, vx = geo.voxel_um
    # physical coordinates (um) of the voxel grid, z measured from the coverslip
    zc = (np.arange(nz) * vz)[:, None, None]
    yc = (np.arange(ny) * vy)[None, :, None]
    xc = (np.arange(nx) * vx)[None, None, :]

    delta_n = np.zeros(geo.shape, np.float32)
    labels = {s: np.zeros(geo.shape, np.float32) for s in STRUCTURES}
    body_mask = np.zeros(geo.shape, bool)
    field_y, field_x = geo.field_um
    n_cells = int(rng.integers(3, 6))
    cells = 0
    for _ in range(n_cells * 6):  # rejection sampling: avoid heavy overlaps
        if cells >= n_cells:
            break
        r_body = np.array([rng.uniform(3.0, 4.5), rng.uniform(7, 11), rng.uniform(7, 11)])
        c_body = np.array(
            [
                5.0 + r_body[0] * 0.9,  # resting on the coverslip at z = 5 um
                rng.uniform(r_body[1], field_y - r_body[1]),
                rng.uniform(r_body[2], field_x - r_body[2]),
            ]
        )
        lo = np.maximum(((c_body - r_body - 1.0) / geo.voxel_um).astype(int), 0)
        hi = np.minimum(((c_body + r_body + 1.0) / geo.voxel_um).astype(int) + 1, geo.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        zz, yy, xx = zc[box[0]], yc[:, box[1]], xc[:, :, box[2]]
        rho = _ellipsoid(zz, yy, xx, c_body, r_body)
        inside = rho <= 1.0
        if (body_mask[box] & inside).sum() > 0.15 * inside.sum():
            continue
        cells += 1
        body_mask[box] |= inside
        dn = delta_n[box]
        dn[inside] += RI_CYTOPLASM
        # plasma membrane: a thin shell at the body surface (~0.5 um thick)
        shell = inside & (rho > (1.0 - 0.5 / r_body.min()) ** 2)
        labels["membrane"][box][shell] = 1.0
        dn[shell] += RI_MEMBRANE_EXTRA
        # nucleus, off-centre, and 1-3 nucleoli inside it
        r_nuc = r_body * np.array([0.7, rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.55)])
        c_nuc = c_body + np.array([0.0, *rng.uniform(-0.2, 0.2, 2) * r_body[1:]])
        nucleus = _ellipsoid(zz, yy, xx, c_nuc, r_nuc) <= 1.0
        labels["dna"][box][nucleus] = rng.uniform(0.7, 1.0)
        dn[nucleus] += RI_NUCLEUS_EXTRA
        for _ in range(int(rng.integers(1, 4))):
            r_nl = np.full(3, rng.uniform(0.6, 1.1))
            c_nl = c_nuc + rng.uniform(-0.4, 0.4, 3) * r_nuc
            nucleolus = (_ellipsoid(zz, yy, xx, c_nl, r_nl) <= 1.0) & nucleus
            dn[nucleolus] += RI_NUCLEOLUS_EXTRA
            labels["dna"][box][nucleolus] *= 0.4  # nucleoli are DNA-poor
        cytoplasm = inside & ~nucleus & ~shell
        # mitochondria: short random-walk tubules in the cytoplasm (~0.5 um wide)
        mito = np.zeros(inside.shape, bool)
        for _ in range(int(rng.integers(15, 30))):
            p = c_body + rng.uniform(-0.8, 0.8, 3) * r_body * np.array([0.5, 1, 1])
            step = rng.normal(size=3) * np.array([0.2, 1, 1])
            for _ in range(int(rng.integers(4, 10))):
                step = step + rng.normal(size=3) * np.array([0.1, 0.5, 0.5])
                step *= 0.6 / (np.linalg.norm(step) + 1e-9)
                p = p + step
                mito |= _ellipsoid(zz, yy, xx, p, np.array([0.5, 0.35, 0.35])) <= 1.0
        mito &= cytoplasm
        labels["mitochondria"][box][mito] = 1.0
        dn[mito] += RI_MITO_EXTRA
        # lipid droplets: a few small bright-RI spheres, unlabelled
        for _ in range(int(rng.integers(0, 4))):
            c_ld = c_body + rng.uniform(-0.6, 0.6, 3) * r_body * np.array([0.3, 1, 1])
            droplet = (_ellipsoid(zz, yy, xx, c_ld, np.full(3, 0.5)) <= 1.0) & cytoplasm
            dn[droplet] += RI_LIPID_EXTRA
    return SampleField(geometry=geo, delta_n=delta_n, labels=labels, n_cells=cells)

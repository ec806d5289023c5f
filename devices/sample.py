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

Time
----
The field is also split into rigid *components*: per cell, its body (cytoplasm,
membrane, nucleus, nucleoli, lipid droplets) and a few groups of its mitochondrial
tubules. The volumes above are the sum of the components at time 0, and `SampleMotion`
moves each component laterally with time:

* every cell migrates (a seeded velocity of 0.1-0.5 um/min plus a slow meander of
  1-2 um with a 10-30 min period), and the whole field drifts slowly (stage/thermal
  drift, ~0.02-0.05 um/min, the same at every position of one seed);
* every mitochondrial group jitters around its place in its cell (two sinusoids per
  axis, 0.15-0.35 um each, periods 20-120 s), on top of its cell's migration.

Displacements are closed-form functions of time (no state to integrate), so any time
can be rendered in any order, and they are exactly zero at t = 0: a field at t = 0
looks exactly as it did before motion existed. Motion is rigid and lateral (no
division, no shape change): an honest first model that makes a time-lapse move, cheap
enough to render at camera speed (see `devices.optics`). The RNG stream of the motion
is separate from the one that builds the cells, so adding it changed no cell.
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

#: Mitochondrial tubules of one cell are split into this many independently moving groups.
MITO_GROUPS = 3


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
        Stage z (um) of the first voxel plane; cells rest on the coverslip at stage
        z = 0 (`make_field`), so the default grid starts 5 um below it.
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


@dataclass(frozen=True)
class CellPopulation:
    """What kind of cells a field holds, and how many.

    The defaults are the sample every earlier dataset (and the bundled model) was made
    of: 3-5 flat adherent cells per tile, few overlaps. `devices.randomize` draws other
    populations (dense touching colonies, sparse rounded cells, empty regions, weaker or
    stronger refractive-index contrast) so a model can be trained and measured beyond it.
    With the defaults `make_field` draws exactly the same random numbers as before.

    Attributes
    ----------
    n_cells : tuple[int, int]
        Cells per field, drawn from ``[lo, hi)``; ``(0, 1)`` is an empty field.
    body_xy_um, body_z_um : tuple[float, float]
        Ranges of the cell body's lateral and axial semi-axes; a z semi-axis near the
        lateral ones is a rounded (mitotic, weakly attached) cell.
    nucleus_frac : tuple[float, float]
        Range of the nucleus's lateral semi-axes as a fraction of the body's.
    ri_scale : float
        Every refractive-index increment is multiplied by this (cell type, medium).
    max_overlap : float
        Fraction of a new cell's volume allowed to overlap cells already drawn; larger
        values pack cells into a touching colony.
    attempts_per_cell : int
        Rejection-sampling tries per requested cell.
    empty_fraction : float
        Fraction of the field's width (at high x) kept free of cell centres: an empty
        region of medium beside the cells.
    """

    n_cells: tuple[int, int] = (3, 6)
    body_xy_um: tuple[float, float] = (7.0, 11.0)
    body_z_um: tuple[float, float] = (3.0, 4.5)
    nucleus_frac: tuple[float, float] = (0.4, 0.55)
    ri_scale: float = 1.0
    max_overlap: float = 0.15
    attempts_per_cell: int = 6
    empty_fraction: float = 0.0


@dataclass
class Component:
    """One rigidly moving part of a field: a cell body or a group of its mitochondria.

    Attributes
    ----------
    kind : str
        ``"cell"`` (body, nucleus, membrane, nucleoli, droplets) or ``"mito"``.
    cell : int
        Index of the cell the component belongs to.
    offset : tuple[int, int, int]
        (z, y, x) voxel index of the first voxel of the local arrays in the field.
    delta_n : np.ndarray
        Local RI contrast (z, y, x) of this component alone.
    labels : dict[str, np.ndarray]
        Local label densities of the structures this component carries, same shape as
        ``delta_n``. Summed over components (placed at their offsets) they give the
        field's ``labels`` exactly: where cells overlap, a voxel belongs to the cell that
        was drawn last, as in the field.
    """

    kind: str
    cell: int
    offset: tuple[int, int, int]
    delta_n: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Where the local arrays sit in the field's voxel grid."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.delta_n.shape))  # type: ignore[return-value]


@dataclass
class SampleMotion:
    """Closed-form lateral displacement (um) of every component over time.

    ``displacement(t)[i]`` is the (y, x) shift of component ``i`` at ``t`` seconds,
    zero at t = 0. Cells migrate and meander, mitochondrial groups also jitter, and the
    whole field drifts. See the module docstring for the figures.
    """

    cell_of: np.ndarray  # (n_comp,) cell index of each component
    drift: np.ndarray  # (2,) um/s, whole field
    velocity: np.ndarray  # (n_cells, 2) um/s
    meander_amp: np.ndarray  # (n_cells, 2) um
    meander_omega: np.ndarray  # (n_cells,) rad/s
    meander_phase: np.ndarray  # (n_cells, 2) rad
    jitter_amp: np.ndarray  # (n_comp, 2, 2) um: component, axis, sinusoid
    jitter_omega: np.ndarray  # (n_comp, 2, 2) rad/s
    jitter_phase: np.ndarray  # (n_comp, 2, 2) rad

    def displacement(self, t_s: float) -> np.ndarray:
        """(n_comp, 2) lateral (y, x) shift in um of every component at ``t_s``."""
        t = float(t_s)
        c = self.cell_of
        cell = self.velocity * t + self.meander_amp * (
            np.sin(self.meander_omega[:, None] * t + self.meander_phase)
            - np.sin(self.meander_phase)
        )
        jitter = (
            self.jitter_amp
            * (np.sin(self.jitter_omega * t + self.jitter_phase) - np.sin(self.jitter_phase))
        ).sum(axis=2)
        if len(cell) == 0:
            return jitter + self.drift * t
        return cell[c] + jitter + self.drift * t


@dataclass
class SampleField:
    """One stage tile's worth of cells: RI contrast and label densities (at t = 0),
    their split into rigid `components`, and how those move (`motion`)."""

    geometry: SampleGeometry
    delta_n: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    n_cells: int = 0
    components: list[Component] = field(default_factory=list)
    motion: SampleMotion | None = None

    def displacement(self, t_s: float) -> np.ndarray:
        """(n_components, 2) lateral (y, x) shift in um of each component at ``t_s``."""
        if self.motion is None:
            return np.zeros((len(self.components), 2))
        return self.motion.displacement(t_s)


def _ellipsoid(
    zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, c: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """Normalised radius squared of each voxel relative to an ellipsoid (<=1 inside)."""
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2


def _span(r: float, width: float) -> tuple[float, float]:
    """Where a centre may lie so a body of radius r stays in the field (the middle, if
    the field is narrower than the body)."""
    return (r, width - r) if width >= 2 * r else (width / 2, width / 2)


def make_field(
    seed: int,
    tile: tuple[int, int] = (0, 0),
    geometry: SampleGeometry | None = None,
    population: CellPopulation | None = None,
) -> SampleField:
    """Generate the cells of one stage tile, reproducibly from ``(seed, tile)``.

    Cells rest on the coverslip at stage z = 0, whatever ``geometry.z0_um`` is, so a
    grid that starts lower or reaches higher holds the same cells at the same heights.
    """
    geo = geometry or SampleGeometry()
    pop = population or CellPopulation()
    coverslip = -geo.z0_um  # grid z (um from the first plane) of stage z = 0
    rng = np.random.default_rng([seed & 0xFFFFFFFF, tile[0] & 0xFFFF, tile[1] & 0xFFFF])
    nz, ny, nx = geo.shape
    vz, vy, vx = geo.voxel_um
    # physical coordinates (um) of the voxel grid, z measured from the coverslip
    zc = (np.arange(nz) * vz)[:, None, None]
    yc = (np.arange(ny) * vy)[None, :, None]
    xc = (np.arange(nx) * vx)[None, None, :]

    delta_n = np.zeros(geo.shape, np.float32)
    labels = {s: np.zeros(geo.shape, np.float32) for s in STRUCTURES}
    # which cell wrote each label voxel last (labels are assigned, not added)
    owner = {s: np.full(geo.shape, -1, np.int8) for s in STRUCTURES}
    body_mask = np.zeros(geo.shape, bool)
    field_y, field_x = geo.field_um
    n_cells = int(rng.integers(*pop.n_cells))
    usable_x = field_x * (1.0 - pop.empty_fraction)
    cells = 0
    # per cell: box, local RI of the body, local RI and masks of each mitochondria group
    drawn: list[tuple[tuple[slice, ...], np.ndarray, list[np.ndarray]]] = []
    for _ in range(n_cells * pop.attempts_per_cell):  # rejection sampling: avoid heavy overlaps
        if cells >= n_cells:
            break
        r_body = np.array(
            [rng.uniform(*pop.body_z_um), rng.uniform(*pop.body_xy_um), rng.uniform(*pop.body_xy_um)]
        )
        c_body = np.array(
            [
                coverslip + r_body[0] * 0.9,  # resting on the coverslip
                rng.uniform(*_span(r_body[1], field_y)),
                rng.uniform(*_span(r_body[2], usable_x)),
            ]
        )
        lo = np.maximum(((c_body - r_body - 1.0) / geo.voxel_um).astype(int), 0)
        hi = np.minimum(((c_body + r_body + 1.0) / geo.voxel_um).astype(int) + 1, geo.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        zz, yy, xx = zc[box[0]], yc[:, box[1]], xc[:, :, box[2]]
        rho = _ellipsoid(zz, yy, xx, c_body, r_body)
        inside = rho <= 1.0
        if (body_mask[box] & inside).sum() > pop.max_overlap * inside.sum():
            continue
        cell = cells
        cells += 1
        body_mask[box] |= inside
        dn = delta_n[box]
        own = {s: owner[s][box] for s in STRUCTURES}
        body = np.zeros(inside.shape, np.float32)  # this cell's RI without mitochondria
        dn[inside] += RI_CYTOPLASM
        body[inside] += RI_CYTOPLASM
        # plasma membrane: a thin shell at the body surface (~0.5 um thick)
        shell = inside & (rho > (1.0 - 0.5 / r_body.min()) ** 2)
        labels["membrane"][box][shell] = 1.0
        own["membrane"][shell] = cell
        dn[shell] += RI_MEMBRANE_EXTRA
        body[shell] += RI_MEMBRANE_EXTRA
        # nucleus, off-centre, and 1-3 nucleoli inside it
        r_nuc = r_body * np.array(
            [0.7, rng.uniform(*pop.nucleus_frac), rng.uniform(*pop.nucleus_frac)]
        )
        c_nuc = c_body + np.array([0.0, *rng.uniform(-0.2, 0.2, 2) * r_body[1:]])
        nucleus = _ellipsoid(zz, yy, xx, c_nuc, r_nuc) <= 1.0
        labels["dna"][box][nucleus] = rng.uniform(0.7, 1.0)
        own["dna"][nucleus] = cell
        dn[nucleus] += RI_NUCLEUS_EXTRA
        body[nucleus] += RI_NUCLEUS_EXTRA
        for _ in range(int(rng.integers(1, 4))):
            r_nl = np.full(3, rng.uniform(0.6, 1.1))
            c_nl = c_nuc + rng.uniform(-0.4, 0.4, 3) * r_nuc
            nucleolus = (_ellipsoid(zz, yy, xx, c_nl, r_nl) <= 1.0) & nucleus
            dn[nucleolus] += RI_NUCLEOLUS_EXTRA
            body[nucleolus] += RI_NUCLEOLUS_EXTRA
            labels["dna"][box][nucleolus] *= 0.4  # nucleoli are DNA-poor
        cytoplasm = inside & ~nucleus & ~shell
        # mitochondria: short random-walk tubules in the cytoplasm (~0.5 um wide),
        # dealt round-robin into MITO_GROUPS groups that move independently
        groups = [np.zeros(inside.shape, bool) for _ in range(MITO_GROUPS)]
        for i_tubule in range(int(rng.integers(15, 30))):
            tubule = groups[i_tubule % MITO_GROUPS]
            p = c_body + rng.uniform(-0.8, 0.8, 3) * r_body * np.array([0.5, 1, 1])
            step = rng.normal(size=3) * np.array([0.2, 1, 1])
            for _ in range(int(rng.integers(4, 10))):
                step = step + rng.normal(size=3) * np.array([0.1, 0.5, 0.5])
                step *= 0.6 / (np.linalg.norm(step) + 1e-9)
                p = p + step
                tubule |= _ellipsoid(zz, yy, xx, p, np.array([0.5, 0.35, 0.35])) <= 1.0
        taken = np.zeros(inside.shape, bool)
        for g in range(MITO_GROUPS):  # exclusive: a voxel in two groups joins the first
            groups[g] &= cytoplasm & ~taken
            taken |= groups[g]
        mito = taken
        labels["mitochondria"][box][mito] = 1.0
        own["mitochondria"][mito] = cell
        dn[mito] += RI_MITO_EXTRA
        # lipid droplets: a few small bright-RI spheres, unlabelled
        for _ in range(int(rng.integers(0, 4))):
            c_ld = c_body + rng.uniform(-0.6, 0.6, 3) * r_body * np.array([0.3, 1, 1])
            droplet = (_ellipsoid(zz, yy, xx, c_ld, np.full(3, 0.5)) <= 1.0) & cytoplasm
            dn[droplet] += RI_LIPID_EXTRA
            body[droplet] += RI_LIPID_EXTRA
        drawn.append((box, body, groups))

    components = _components(drawn, labels, owner)
    if pop.ri_scale != 1.0:
        delta_n *= np.float32(pop.ri_scale)
        for comp in components:
            comp.delta_n *= np.float32(pop.ri_scale)
    motion = _motion(seed, tile, components, cells)
    return SampleField(
        geometry=geo, delta_n=delta_n, labels=labels, n_cells=cells,
        components=components, motion=motion,
    )


def _crop(comp: Component) -> Component:
    """Shrink a component's local arrays to the bounding box of its non-zero voxels."""
    used = comp.delta_n != 0
    for v in comp.labels.values():
        used |= v != 0
    if not used.any():
        return comp
    idx = [np.flatnonzero(used.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    sl = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
    return Component(
        kind=comp.kind,
        cell=comp.cell,
        offset=tuple(o + s.start for o, s in zip(comp.offset, sl)),  # type: ignore[arg-type]
        delta_n=np.ascontiguousarray(comp.delta_n[sl]),
        labels={k: np.ascontiguousarray(v[sl]) for k, v in comp.labels.items()},
    )


def _components(
    drawn: list[tuple[tuple[slice, ...], np.ndarray, list[np.ndarray]]],
    labels: dict[str, np.ndarray],
    owner: dict[str, np.ndarray],
) -> list[Component]:
    """Each cell's body and mitochondria groups, with exactly the labels it owns."""
    comps: list[Component] = []
    for cell, (box, body, groups) in enumerate(drawn):
        offset = tuple(s.start for s in box)
        mine = {s: np.where(owner[s][box] == cell, labels[s][box], 0).astype(np.float32)
                for s in STRUCTURES}
        comps.append(_crop(Component("cell", cell, offset, body,  # type: ignore[arg-type]
                                     {"dna": mine["dna"], "membrane": mine["membrane"]})))
        for g in groups:
            if not g.any():
                continue
            dn = np.where(g, np.float32(RI_MITO_EXTRA), np.float32(0)).astype(np.float32)
            mito = np.where(g, mine["mitochondria"], 0).astype(np.float32)
            comps.append(_crop(Component("mito", cell, offset, dn, {"mitochondria": mito})))  # type: ignore[arg-type]
    return comps


def _motion(seed: int, tile: tuple[int, int], comps: list[Component], n_cells: int) -> SampleMotion:
    """Seeded motion parameters, from an RNG stream of their own (cells stay as they were)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, tile[0] & 0xFFFF, tile[1] & 0xFFFF, 0x6D6F76])
    drift_rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x647269])  # same at every tile
    n = len(comps)

    def directions(k: int) -> np.ndarray:
        a = rng.uniform(0, 2 * np.pi, k)
        return np.stack([np.sin(a), np.cos(a)], axis=1)

    a = drift_rng.uniform(0, 2 * np.pi)
    drift = drift_rng.uniform(0.02, 0.05) / 60.0 * np.array([np.sin(a), np.cos(a)])
    velocity = directions(n_cells) * rng.uniform(0.1, 0.5, (n_cells, 1)) / 60.0
    meander_amp = rng.uniform(1.0, 2.0, (n_cells, 2))
    meander_omega = 2 * np.pi / rng.uniform(600.0, 1800.0, n_cells)
    meander_phase = rng.uniform(0, 2 * np.pi, (n_cells, 2))
    is_mito = np.array([c.kind == "mito" for c in comps], float)[:, None, None]
    jitter_amp = rng.uniform(0.15, 0.35, (n, 2, 2)) * is_mito
    jitter_omega = 2 * np.pi / rng.uniform(20.0, 120.0, (n, 2, 2))
    jitter_phase = rng.uniform(0, 2 * np.pi, (n, 2, 2))
    return SampleMotion(
        cell_of=np.array([c.cell for c in comps], int),
        drift=drift,
        velocity=velocity,
        meander_amp=meander_amp,
        meander_omega=meander_omega,
        meander_phase=meander_phase,
        jitter_amp=jitter_amp,
        jitter_omega=jitter_omega,
        jitter_phase=jitter_phase,
    )

"""Image formation for the simulated microscope: brightfield and widefield fluorescence.

Brightfield: a weak-object, first-Born model with defocus
---------------------------------------------------------
Live cells are nearly transparent: each thin slice of the sample at height ``z_j``
delays the light by a phase ``phi_j = 2 pi / lambda * delta_n_j * dz`` and absorbs
almost nothing. For weak objects the image is linear in the object, and each slice
contributes as if it were a thin object seen at defocus ``d_j = z_j - z_focus``
(first Born approximation; slices add, multiple scattering is ignored). In Fourier
space the contribution of a slice is

    I_j(k) = 2 sin(pi lambda d_j |k|^2 / n) phi_j(k) - 2 cos(...) mu_j(k)

the phase and absorption contrast transfer functions of defocus, band-limited by the
objective pupil (|k| <= NA / lambda) and damped by a partial-coherence envelope
``exp(-(pi d_j NA_cond |k| / n)^2)`` for a condenser of numerical aperture ``NA_cond``.
This reproduces what a microscopist sees: almost no contrast in focus (sin 0 = 0),
contrast that grows with |defocus| and reverses sign across focus (a bright halo on
one side, dark on the other), and loss of fine detail far from focus. For small
defocus it reduces to the transport-of-intensity equation.

Why this model and not multislice propagation: for cells (delta_n ~ 0.01-0.09 over a
few um, phase well under 1 rad per slice) the first Born approximation holds, and its
linearity is what makes motion cheap (below). Multiple scattering (strong lipid
droplets) and the exact partial-coherence integral over the condenser are what it
leaves out.

Motion, at camera speed
-----------------------
Because the image is linear in the RI volume, it is the sum of the images of the
sample's rigid components (`devices.sample.Component`: cell bodies and mitochondria
groups), and a lateral shift of a component is a phase ramp on its spectrum (the
Fourier shift theorem). So each component's slice spectra are computed once per field,
only inside the pupil (the rest of the spectrum never reaches the image: about a
quarter of the frequencies at NA 0.5), and a plane at time t costs: one weighted sum of
each component's slice spectra (cached per focus position, so a time-lapse pays it once
per plane of its z-plan), one phase ramp per component, and one inverse FFT. The
transfer function of a defocus is cached too (a z-stack on the voxel grid reuses a few
dozen). With every shift zero the sum is the field's image at t = 0, equal to the
image of the whole volume up to float32 rounding.

Fluorescence
------------
Label density blurred by a Gaussian approximation of the widefield PSF
(sigma_xy = 0.21 lambda / NA, sigma_z = 0.66 n lambda / NA^2), scaled by exposure.
Blurring is linear and shift-invariant too, so each component is blurred once in a
small box around it (equal to blurring the whole field, boundary handling included),
and a plane is the sum of each component's box, shifted (whole pixels by placement,
the sub-pixel rest by a phase ramp on the box) and placed in the tile. The tile is
periodic, as the brightfield FFT is: a cell that leaves one edge comes back at the
other.

Phase contrast
--------------
The same weak-object model with a Zernike phase ring: the ring advances the
undiffracted light by a quarter wave and dims it to amplitude ``a``, turning the
phase transfer ``2 sin(chi)`` into ``-(2 / a) cos(chi)`` (dense structures dark on a
grey background, contrast largest in focus instead of vanishing there) and the
background intensity into ``a**2``. Diffracted light at low spatial frequencies passes
through the ring too and is shifted like the background, so it keeps brightfield's
transfer: the blend between the two, ``1 - exp(-(k / k_ring)^2)`` with ``k_ring`` the
ring's width in the pupil, makes phase contrast's halo around cells. Whole cells are
not weak phase objects under a ring, so the linear term is mapped through the exact
thin-object intensity (`_phase_ring_intensity`), which stays positive. One different
transfer function on the same RI volume, so it costs what brightfield costs.

DIC and oblique illumination
----------------------------
Differential interference contrast interferes two copies of the wave sheared by
``Delta`` with a phase bias ``beta``; its background-normalised intensity is
``1 + [a(x - Delta/2) + a(x + Delta/2)] + B [phi(x + Delta/2) - phi(x - Delta/2)]`` to
first order, ``B = sin(beta) / (1 - cos(beta))``: the relief look, one edge of each cell
bright and the opposite edge dark, with contrast in focus. In Fourier space the
amplitude part keeps brightfield's transfer times ``cos(pi k.Delta)`` and the phase part
gains an odd, imaginary transfer ``2 i B sin(pi k.Delta) cos(chi)``. Oblique
transmitted light and Hoffman modulation contrast give the same phase-gradient relief
to first order, so this modality stands for them too (its shear and bias set the
relief's resolution and strength; the direction is ``dic_angle_deg``). Large phase
steps are mapped through the exact two-beam intensity
``(1 - cos(delta + beta)) / (1 - cos(beta))`` (`_dic_intensity`), which stays positive.

Both end in a camera model: photons -> Poisson shot noise -> Gaussian read noise +
offset -> uint16.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .sample import SampleField


#: Transmitted-light contrast mechanisms the simulator renders.
MODALITIES = ("brightfield", "phase", "dic")


@dataclass(frozen=True)
class OpticsConfig:
    """Objective, condenser and camera parameters of the simulated microscope.

    Attributes
    ----------
    wavelength_um : float
        Brightfield illumination wavelength.
    emission_um : float
        Fluorescence emission wavelength (one for all channels, for simplicity).
    na_objective, na_condenser : float
        Numerical apertures; their ratio sets the partial coherence.
    n_medium : float
        Refractive index of the immersion/culture medium.
    bf_photons_per_ms : float
        Brightfield photons per pixel per ms of exposure: the illumination background.
    fl_photons_per_ms : float
        Fluorescence photons per pixel per ms at unit label density, in focus.
    read_noise_e, offset_adu : float
        Camera read noise (electrons, 1 e-/ADU gain) and offset.
    absorption : float
        Small amplitude contrast per unit delta_n, so focus is not perfectly invisible.
    magnification, camera_pixel_um : float
        Objective magnification and camera pixel pitch; the pixel size in the sample is
        ``camera_pixel_um / magnification`` (0.325 um: 6.5 um sCMOS pixels, 20x).
    modality : str
        ``"brightfield"``, ``"phase"`` (Zernike phase contrast) or ``"dic"`` (DIC, which
        stands for oblique illumination too; see the module docstring): the
        transmitted-light channel's contrast mechanism.
    phase_ring_amplitude, phase_ring_width_na : float
        Phase contrast only: amplitude transmission of the phase ring (the background
        is ``amplitude**2`` of brightfield's) and its width in NA units (the halo's size).
    dic_shear_um, dic_bias_rad, dic_angle_deg : float
        DIC only: the shear between the two beams (sets how fine the relief is), the
        bias phase (smaller = stronger relief on a darker background) and the shear's
        direction in the image (0 = along x, 90 = along y).
    """

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {self.modality!r}")
        if self.modality == "dic" and not 0.0 < self.dic_bias_rad < np.pi:
            raise ValueError(f"dic_bias_rad must lie between 0 and pi, got {self.dic_bias_rad}")

    wavelength_um: float = 0.55
    emission_um: float = 0.52
    na_objective: float = 0.5
    na_condenser: float = 0.3
    n_medium: float = 1.337
    bf_photons_per_ms: float = 300.0
    fl_photons_per_ms: float = 40.0
    read_noise_e: float = 1.6
    offset_adu: float = 100.0
    absorption: float = 0.01
    magnification: float = 20.0
    camera_pixel_um: float = 6.5
    modality: str = "brightfield"
    phase_ring_amplitude: float = 0.5
    phase_ring_width_na: float = 0.05
    dic_shear_um: float = 0.25
    dic_bias_rad: float = 0.4
    dic_angle_deg: float = 45.0

    @property
    def pixel_size_um(self) -> float:
        """Size of one (unbinned) camera pixel in the sample plane."""
        return self.camera_pixel_um / self.magnification


def _key(v: float) -> int:
    """Cache key of a position in um (1 nm resolution)."""
    return int(round(float(v) * 1000.0))


class FieldRenderer:
    """Renders noise-free brightfield and fluorescence planes of one `SampleField`.

    ``shifts_um`` (n_components, 2) moves each component of the field laterally (y, x);
    None or zeros render the field as generated (t = 0). `devices.simulated` gets the
    shifts from the field's `SampleMotion` at the scope's clock.
    """

    #: Bytes of per-focus component spectra kept (a time-lapse's z-plan fits).
    plane_cache_bytes: int = 24 * 2**20
    #: Bytes of defocus transfer functions kept.
    transfer_cache_bytes: int = 16 * 2**20

    def __init__(
        self, sample: SampleField, optics: OpticsConfig | None = None, z_margin_um: float = 0.0
    ) -> None:
        """``z_margin_um`` extends the fluorescence blur that far past both ends of the
        sample's z grid (the medium there holds no label), so a focus outside the grid
        shows the PSF's tail of the cells instead of nothing; 0 renders as before."""
        self.sample = sample
        self.optics = o = optics or OpticsConfig()
        self._z_pad = int(np.ceil(max(z_margin_um, 0.0) / sample.geometry.voxel_um[0]))
        geo = sample.geometry
        nz, ny, nx = geo.shape
        vz, vy, vx = geo.voxel_um
        self._plane_z = geo.plane_z_um()
        self._shape2 = (ny, nx)
        ky = np.fft.fftfreq(ny, d=vy)
        kx = np.fft.rfftfreq(nx, d=vx)
        self._nkx = len(kx)
        k2 = ky[:, None] ** 2 + kx[None, :] ** 2
        # the pupil's support: the only frequencies that reach the image
        self._support = np.flatnonzero(np.sqrt(k2).ravel() <= o.na_objective / o.wavelength_um)
        self._k2 = k2.ravel()[self._support].astype(np.float32)
        iy, ix = np.divmod(self._support, self._nkx)
        self._ky, self._kx = ky[iy].astype(np.float32), kx[ix].astype(np.float32)
        # per component: first slice and slice spectra inside the pupil, as float32
        # (n_j, 2, K) real/imaginary planes (einsum on these is ~6x faster than complex)
        scale = np.float32(2 * np.pi / o.wavelength_um * vz)
        self._bf: list[tuple[int, int, np.ndarray]] = []  # (component, j0, spectra)
        for i, comp in enumerate(sample.components):
            if not comp.delta_n.any():
                continue
            z0, y0, x0 = comp.offset
            lz, ly, lx = comp.delta_n.shape
            full = np.zeros((lz, ny, nx), np.float32)
            full[:, y0 : y0 + ly, x0 : x0 + lx] = comp.delta_n * scale
            spec = sfft.rfft2(full).reshape(lz, -1)[:, self._support]
            self._bf.append((i, z0, np.ascontiguousarray(np.stack([spec.real, spec.imag], 1), np.float32)))
        self._bf_index = np.array([i for i, _, _ in self._bf], int)
        self._j_lo = min((j0 for _, j0, _ in self._bf), default=0)
        self._j_hi = max((j0 + len(sp) for _, j0, sp in self._bf), default=0)
        self._transfer: OrderedDict[int, np.ndarray] = OrderedDict()
        self._planes: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fl_boxes: dict[str, list[tuple[int, int, int, np.ndarray]]] = {}
        self._lock = threading.RLock()  # the caches: a camera thread and a caller may render

    # -- brightfield ---------------------------------------------------------------
    def _transfer_of(self, d: float) -> np.ndarray:
        """Defocus transfer function (inside the pupil) of a slice ``d`` um from focus:
        (K,) real, or for DIC (2, K) real and imaginary parts."""
        key = _key(d)
        t = self._transfer.get(key)
        if t is None:
            o = self.optics
            d = np.float32(d)
            arg = np.float32(np.pi * o.wavelength_um / o.n_medium) * d * self._k2
            envelope = np.exp(
                -np.float32((np.pi * o.na_condenser / o.n_medium) ** 2) * d * d * self._k2
            )
            bf = 2.0 * np.sin(arg) - 2.0 * o.absorption * np.cos(arg)
            if o.modality == "phase":
                a = np.float32(o.phase_ring_amplitude)
                k_ring = np.float32(o.phase_ring_width_na / o.wavelength_um)
                shifted = np.float32(1.0) - np.exp(-self._k2 / (k_ring * k_ring))
                pc = (-2.0 * np.cos(arg) - 2.0 * o.absorption * np.sin(arg)) / a
                bf = shifted * pc + (1.0 - shifted) * bf
            if o.modality == "dic":
                theta = np.deg2rad(o.dic_angle_deg)
                k_shear = np.float32(np.pi * o.dic_shear_um) * (
                    np.float32(np.cos(theta)) * self._kx + np.float32(np.sin(theta)) * self._ky)
                b = np.float32(np.sin(o.dic_bias_rad) / (1.0 - np.cos(o.dic_bias_rad)))
                amplitude = bf * np.cos(k_shear)
                phase = 2.0 * b * np.sin(k_shear) * (np.cos(arg) + o.absorption * np.sin(arg))
                bf = np.stack([amplitude, phase])
            t = (bf * envelope).astype(np.float32)
            self._transfer[key] = t
            while len(self._transfer) * t.nbytes > self.transfer_cache_bytes:
                self._transfer.popitem(last=False)
        return t

    def _component_spectra(self, z_focus_um: float) -> np.ndarray:
        """(n_bf_components, 2, K) real/imaginary image spectrum of each component."""
        with self._lock:
            return self._component_spectra_locked(z_focus_um)

    def _component_spectra_locked(self, z_focus_um: float) -> np.ndarray:
        if not self._bf:  # an empty field: nothing but background
            return np.zeros((0, 2, len(self._support)), np.float32)
        key = _key(z_focus_um)
        cached = self._planes.get(key)
        if cached is not None:
            self._planes.move_to_end(key)
            return cached
        lo = self._j_lo
        t = np.stack(
            [self._transfer_of(self._plane_z[j] - z_focus_um) for j in range(lo, self._j_hi)]
        )
        out = np.empty((len(self._bf), 2, len(self._support)), np.float32)
        for row, (_, j0, spec) in enumerate(self._bf):
            tj = t[j0 - lo : j0 - lo + len(spec)]
            if tj.ndim == 2:
                np.einsum("jk,jrk->rk", tj, spec, out=out[row])
            else:  # complex transfer (DIC): (tr + i ti)(sr + i si)
                tr, ti = tj[:, 0], tj[:, 1]
                out[row, 0] = np.einsum("jk,jk->k", tr, spec[:, 0]) - np.einsum("jk,jk->k", ti, spec[:, 1])
                out[row, 1] = np.einsum("jk,jk->k", tr, spec[:, 1]) + np.einsum("jk,jk->k", ti, spec[:, 0])
        self._planes[key] = out
        while len(self._planes) * out.nbytes > self.plane_cache_bytes and len(self._planes) > 1:
            self._planes.popitem(last=False)
        return out

    def brightfield(self, z_focus_um: float, shifts_um: np.ndarray | None = None) -> np.ndarray:
        """Relative intensity (1.0 = background) of the plane in focus at ``z_focus_um``."""
        parts = self._component_spectra(z_focus_um)
        if shifts_um is None or not np.any(shifts_um) or not len(self._bf):
            re, im = parts.sum(axis=0)
        else:
            s = np.asarray(shifts_um, np.float32)[self._bf_index]
            phase = np.float32(-2 * np.pi) * (
                s[:, :1] * self._ky[None, :] + s[:, 1:] * self._kx[None, :]
            )
            c, si = np.cos(phase), np.sin(phase)
            pr, pi = parts[:, 0], parts[:, 1]
            re = np.einsum("ck,ck->k", pr, c) - np.einsum("ck,ck->k", pi, si)
            im = np.einsum("ck,ck->k", pr, si) + np.einsum("ck,ck->k", pi, c)
        full = np.zeros(self._shape2[0] * self._nkx, np.complex64)
        full.real[self._support] = re
        full.imag[self._support] = im
        img = sfft.irfft2(full.reshape(self._shape2[0], self._nkx), s=self._shape2)
        if self.optics.modality == "phase":
            return _phase_ring_intensity(img, self.optics.phase_ring_amplitude)
        if self.optics.modality == "dic":
            return _dic_intensity(img, self.optics.dic_bias_rad)
        return (1.0 + img).astype(np.float32)

    # -- fluorescence --------------------------------------------------------------
    def _boxes(self, structure: str) -> list[tuple[int, int, int, np.ndarray]]:
        """Per component carrying ``structure``: (component, y0, x0, blurred box (z,y,x)).

        Each box is the component's labels blurred by the PSF over the full z range and a
        margin of 4 sigma in y/x (clipped to the tile, reflecting at its edges like a
        blur of the whole field), then zero-padded by 2 px for sub-pixel shifts.
        """
        with self._lock:
            if structure not in self._fl_boxes:
                self._fl_boxes[structure] = self._blur_boxes(structure)
            return self._fl_boxes[structure]

    def _blur_boxes(self, structure: str) -> list[tuple[int, int, int, np.ndarray]]:
        o = self.optics
        geo = self.sample.geometry
        nz, ny, nx = geo.shape
        vz, vy, vx = geo.voxel_um
        s_xy = 0.21 * o.emission_um / o.na_objective
        s_z = 0.66 * o.n_medium * o.emission_um / o.na_objective**2
        sigma = (s_z / vz, s_xy / vy, s_xy / vx)
        margin = int(4.0 * max(sigma[1], sigma[2]) + 0.5) + 1
        pad = self._z_pad
        boxes = []
        for i, comp in enumerate(self.sample.components):
            lab = comp.labels.get(structure)
            if lab is None or not lab.any():
                continue
            z0, y0, x0 = comp.offset
            lz, ly, lx = lab.shape
            ya, yb = max(y0 - margin, 0), min(y0 + ly + margin, ny)
            xa, xb = max(x0 - margin, 0), min(x0 + lx + margin, nx)
            vol = np.zeros((nz + 2 * pad, yb - ya, xb - xa), np.float32)
            vol[pad + z0 : pad + z0 + lz, y0 - ya : y0 - ya + ly, x0 - xa : x0 - xa + lx] = lab
            blurred = ndimage.gaussian_filter(vol, sigma)
            boxes.append((i, ya - 2, xa - 2, np.pad(blurred, ((0, 0), (2, 2), (2, 2)))))
        return boxes

    def fluorescence(
        self, structure: str, z_focus_um: float, shifts_um: np.ndarray | None = None
    ) -> np.ndarray:
        """Blurred label density (in-focus unit density ~ 1) at ``z_focus_um``."""
        if structure not in self.sample.labels:
            raise KeyError(
                f"No fluorescence channel {structure!r}; the sample has "
                f"{sorted(self.sample.labels)}"
            )
        geo = self.sample.geometry
        ny, nx = self._shape2
        out = np.zeros(self._shape2, np.float32)
        zi = (z_focus_um - self._plane_z[0]) / geo.voxel_um[0] + self._z_pad
        if zi <= 0 or zi >= geo.shape[0] + 2 * self._z_pad - 1:
            return out
        i0 = int(np.floor(zi))
        w = np.float32(zi - i0)
        px = np.asarray(geo.voxel_um[1:], float)
        for i, y0, x0, box in self._boxes(structure):
            plane = (1 - w) * box[i0] + w * box[i0 + 1]
            s = None if shifts_um is None else np.asarray(shifts_um[i], float) / px
            if s is None or not s.any():
                _add_wrapped(out, plane, y0, x0)
                continue
            whole = np.round(s)
            frac = s - whole
            if frac.any():
                plane = _subpixel_shift(plane, frac)
            _add_wrapped(out, plane, y0 + int(whole[0]), x0 + int(whole[1]))
        return out


def _phase_ring_intensity(linear: np.ndarray, a: float) -> np.ndarray:
    """Phase-contrast intensity (1.0 = background) from its linear (weak-object) term.

    A whole cell delays light by 1-3 rad, where the weak-object linearisation of
    phase contrast, ``1 - 2 phi / a``, goes negative. The linear term gives the filtered
    phase ``phi = -a * linear / 2`` (halo included), and the exact intensity of a phase
    ``phi`` under a ring of amplitude ``a`` advancing the background a quarter wave,
    ``|exp(i phi) - 1 - i a|^2 / a^2``, keeps it physical: dark cells, bright reversal
    where the phase is large, never below zero. Equal to the linear model to first order.
    """
    phi = -np.float32(a / 2.0) * linear
    out = (2.0 - 2.0 * np.cos(phi) - 2.0 * a * np.sin(phi) + a * a) / (a * a)
    return out.astype(np.float32)


def _dic_intensity(linear: np.ndarray, bias_rad: float) -> np.ndarray:
    """DIC intensity (1.0 = background) from its linear term.

    Across a whole cell's edge the sheared beams differ by a phase ``delta`` where
    ``1 + linear`` would go negative; the exact two-beam intensity
    ``(1 - cos(delta + beta)) / (1 - cos(beta))``, with ``delta = linear / B`` the phase
    difference the linear term ``B * delta`` stands for, stays positive and equals
    ``1 + linear`` to first order.
    """
    c = 1.0 - np.cos(bias_rad)
    b = np.sin(bias_rad) / c
    delta = linear / np.float32(b)
    return ((1.0 - np.cos(delta + np.float32(bias_rad))) / np.float32(c)).astype(np.float32)


def _subpixel_shift(a: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``a`` moved by a fraction of a pixel (y, x), by a phase ramp on its spectrum."""
    ky = np.fft.fftfreq(a.shape[0])[:, None]
    kx = np.fft.rfftfreq(a.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (ky * shift[0] + kx * shift[1]))
    return sfft.irfft2(sfft.rfft2(a) * ramp, s=a.shape).astype(np.float32)


def _add_wrapped(out: np.ndarray, plane: np.ndarray, y0: int, x0: int) -> None:
    """``out[y0:, x0:] += plane`` on a periodic tile (indices wrap at the edges)."""
    ny, nx = out.shape
    h, w = plane.shape
    if 0 <= y0 and y0 + h <= ny and 0 <= x0 and x0 + w <= nx:
        out[y0 : y0 + h, x0 : x0 + w] += plane
        return
    rows = (np.arange(h) + y0) % ny
    cols = (np.arange(w) + x0) % nx
    np.add.at(out, np.ix_(rows, cols), plane)


def bin_pixels(image: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor`` x ``factor`` pixel blocks (the charge of a binned pixel)."""
    if factor == 1:
        return image
    ny, nx = image.shape[0] // factor, image.shape[1] // factor
    return image[: ny * factor, : nx * factor].reshape(ny, factor, nx, factor).sum(axis=(1, 3))


def to_camera_counts(
    relative: np.ndarray,
    photons_per_unit: float,
    optics: OpticsConfig,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
    *,
    read_noise_scale: float = 1.0,
    divide: float = 1.0,
    max_count: int = 65535,
) -> np.ndarray:
    """Photons -> Poisson shot noise -> read noise + offset -> clipped uint16 counts.

    ``read_noise_scale`` and ``divide`` serve binned frames (see `SimCamera`): the read
    noise of a digitally summed block grows with its side, and averaging divides the
    electrons before the offset is added. ``max_count`` is the camera's bit depth limit.
    """
    photons = np.clip(relative, 0, None) * photons_per_unit
    electrons = rng.poisson(photons).astype(np.float32)
    electrons += rng.normal(0.0, optics.read_noise_e * read_noise_scale, electrons.shape).astype(
        np.float32
    )
    if divide != 1.0:
        electrons /= np.float32(divide)
    electrons += optics.offset_adu
    counts = np.clip(np.rint(electrons), 0, max_count).astype(np.uint16)
    if out is not None:
        out[...] = counts
        return out
    return counts

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

Fluorescence
------------
Label density blurred by a Gaussian approximation of the widefield PSF
(sigma_xy = 0.21 lambda / NA, sigma_z = 0.66 n lambda / NA^2), scaled by exposure.

Both end in a camera model: photons -> Poisson shot noise -> Gaussian read noise +
offset -> uint16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .sample import SampleField


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
    """

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


class FieldRenderer:
    """Renders noise-free brightfield and fluorescence planes of one `SampleField`.

    Slice spectra and blurred label volumes are computed once per field and reused for
    every plane, so a plane costs one weighted sum of slice spectra and one inverse FFT.
    """

    def __init__(self, sample: SampleField, optics: OpticsConfig | None = None) -> None:
        self.sample = sample
        self.optics = o = optics or OpticsConfig()
        geo = sample.geometry
        nz, ny, nx = geo.shape
        vz, vy, vx = geo.voxel_um
        self._plane_z = geo.plane_z_um()
        ky = np.fft.fftfreq(ny, d=vy)[:, None]
        kx = np.fft.rfftfreq(nx, d=vx)[None, :]
        self._k2 = (ky**2 + kx**2).astype(np.float32)
        self._pupil = (np.sqrt(self._k2) <= o.na_objective / o.wavelength_um).astype(
            np.float32
        )
        phase = (2 * np.pi / o.wavelength_um * vz) * sample.delta_n
        self._phase_hat = np.fft.rfft2(phase).astype(np.complex64)
        self._fl_blurred: dict[str, np.ndarray] = {}

    # -- brightfield ---------------------------------------------------------------
    def brightfield(self, z_focus_um: float) -> np.ndarray:
        """Relative intensity (1.0 = background) of the plane in focus at ``z_focus_um``."""
        o = self.optics
        d = (self._plane_z - z_focus_um).astype(np.float32)[:, None, None]
        arg = (np.pi * o.wavelength_um / o.n_medium) * d * self._k2
        envelope = np.exp(
            -((np.pi * o.na_condenser / o.n_medium) ** 2) * d**2 * self._k2
        )
        transfer = (2.0 * np.sin(arg) - 2.0 * o.absorption * np.cos(arg)) * envelope
        spectrum = (transfer * self._phase_hat).sum(axis=0) * self._pupil
        shape = self.sample.geometry.shape[1:]
        return 1.0 + np.fft.irfft2(spectrum, s=shape).astype(np.float32)

    # -- fluorescence --------------------------------------------------------------
    def _blurred(self, structure: str) -> np.ndarray:
        if structure not in self._fl_blurred:
            o = self.optics
            vz, vy, vx = self.sample.geometry.voxel_um
            s_xy = 0.21 * o.emission_um / o.na_objective
            s_z = 0.66 * o.n_medium * o.emission_um / o.na_objective**2
            self._fl_blurred[structure] = ndimage.gaussian_filter(
                self.sample.labels[structure], (s_z / vz, s_xy / vy, s_xy / vx)
            )
        return self._fl_blurred[structure]

    def fluorescence(self, structure: str, z_focus_um: float) -> np.ndarray:
        """Blurred label density (in-focus unit density ~ 1) at ``z_focus_um``."""
        if structure not in self.sample.labels:
            raise KeyError(
                f"No fluorescence channel {structure!r}; the sample has "
                f"{sorted(self.sample.labels)}"
            )
        vol = self._blurred(structure)
        zi = (z_focus_um - self._plane_z[0]) / self.sample.geometry.voxel_um[0]
        if zi <= 0 or zi >= vol.shape[0] - 1:
            return np.zeros(vol.shape[1:], np.float32)
        i0 = int(np.floor(zi))
        w = np.float32(zi - i0)
        return (1 - w) * vol[i0] + w * vol[i0 + 1]


def to_camera_counts(
    relative: np.ndarray,
    photons_per_unit: float,
    optics: OpticsConfig,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Photons -> Poisson shot noise -> read noise + offset -> clipped uint16 counts."""
    photons = np.clip(relative, 0, None) * photons_per_unit
    electrons = rng.poisson(photons).astype(np.float32)
    electrons += rng.normal(0.0, optics.read_noise_e, electrons.shape).astype(np.float32)
    electrons += optics.offset_adu
    counts = np.clip(np.rint(electrons), 0, 65535).astype(np.uint16)
    if out is not None:
        out[...] = counts
        return out
    return counts

"""The built-in simulated microscope: pymmcore-plus pure-Python devices over a 3D sample.

`build_simulated_core()` returns a `UniMMCore` with a camera, a Z focus stage, an XY
stage, a light path (a state device whose positions are ``Brightfield`` and one per
fluorescence structure) and a shutter, plus a ``Channel`` config group and a pixel
size, so any useq-schema plan runs on it through pymmcore-plus's MDA runner exactly as
it would on real hardware.

All devices are thin views onto one `SimulatedScope`, the shared physical state
(where the stage is, which light is on, which sample tile is under the objective, what
time it is, how much light each position has had). The camera renders what that state
implies, on demand, from `devices.optics`.

Time and light
--------------
``scope.clock()`` is the sample's time in seconds (default: seconds since the scope was
made; tests inject their own, e.g. ``scope.clock = lambda: 12.0``). Cells migrate and
mitochondria move with it (`devices.sample.SampleMotion`). Every exposure is entered in
a dose ledger (`devices.dose`): fluorescence bleaches its channel and, past a dose,
stops the cells at that position; brightfield adds no dose. Read the ledger with
``scope.dose_ledger()`` or, through any core, ``core.getProperty("Camera",
"DoseLedger")`` (JSON).

Camera
------
Software ROI (``core.setROI``), binning 1/2/4 (``Binning``; ``BinningMode`` ``Sum``, as
on-chip charge binning with one read noise per binned pixel, or ``Average``, digital
averaging; ``core.getPixelSizeUm()`` follows the binning), exposure, bit depth
(``BitDepth`` 10-16, counts clip at 2^bits - 1, reported by ``getImageBitDepth``), and a
pixel size of camera pixel / magnification (6.5 um / 20x = 0.325 um).

Hardware-sequenced z-stacks
---------------------------
With ``SimulatedScope(z_sequence_max_length=N)`` (N > 0) the focus drive is
sequenceable (a position list, and a linear sequence): pymmcore-plus then runs a z-stack
as one camera sequence acquisition, the camera stepping the stage on every frame as a
trigger would. Off by default, because per-snap behaviour (the daemon's snap retries,
fault injection with ``failing_snaps``) does not apply inside a camera sequence.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

from ._quiet import quiet_unicore
from .dose import DoseLedger, PhotoConfig, bleach_factor, tile_key
from .optics import FieldRenderer, OpticsConfig, bin_pixels, to_camera_counts
from .sample import STRUCTURES, CellPopulation, SampleGeometry, make_field

BRIGHTFIELD = "Brightfield"
#: Light-path / channel preset names, brightfield first, then one per structure.
CHANNELS: tuple[str, ...] = (BRIGHTFIELD, *(s.capitalize() for s in STRUCTURES))

CAMERA, FOCUS, XY, LIGHT_PATH, SHUTTER = "Camera", "Z", "XY", "LightPath", "Shutter"
CHANNEL_GROUP = "Channel"
BINNINGS = (1, 2, 4)
BIT_DEPTHS = (10, 12, 14, 16)


class Stopwatch:
    """Seconds since it was made: the default clock of a scope."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self._t0


class ZSequence:
    """A focus position sequence loaded into the stage, stepped by camera frames."""

    def __init__(self) -> None:
        self.positions: tuple[float, ...] = ()
        self.running = False
        self._i = 0

    def load(self, positions: Sequence[float]) -> None:
        self.positions = tuple(float(p) for p in positions)

    def start(self) -> None:
        if not self.positions:
            raise RuntimeError("no focus sequence loaded")
        self._i = 0
        self.running = True

    def stop(self) -> None:
        self.running = False

    def next_position(self) -> float | None:
        """Where the next triggered frame is taken (wrapping round), None if stopped."""
        if not self.running:
            return None
        z = self.positions[self._i % len(self.positions)]
        self._i += 1
        return z


@dataclass
class SimulatedScope:
    """The shared physical state of the simulated microscope and its sample.

    Attributes
    ----------
    seed : int
        Sample seed: the same seed always yields the same cells at the same positions.
    geometry : SampleGeometry
        Voxel grid of one tile; the camera's sensor is the tile's (y, x) shape.
    optics : OpticsConfig
        Objective, condenser and camera noise parameters.
    clock : Callable[[], float]
        The sample's time in seconds; default: seconds since this scope was made.
    photo : PhotoConfig
        Bleaching and phototoxicity of the sample.
    intensity_pct : float
        Lamp power in percent (LightPath ``Intensity``): scales photons and dose.
    binning, binning_mode, bit_depth :
        Camera settings (see the module docstring).
    z_sequence_max_length : int
        > 0 makes the focus drive sequenceable (hardware z-stacks).
    z_drift_um_per_s : float
        The sample drifts up (positive) or down in z at this rate of its clock from the
        first frame on, as a warming stage or a settling dish does over a long run
        (``livestain demo --scenario focus-drift``); the focus drive does not know.
    """

    seed: int = 0
    geometry: SampleGeometry = field(default_factory=SampleGeometry)
    optics: OpticsConfig = field(default_factory=OpticsConfig)
    z_um: float = 4.0
    xy_um: tuple[float, float] = (0.0, 0.0)
    light_path: str = BRIGHTFIELD
    shutter_open: bool = False
    exposure_ms: float = 10.0
    #: Fault injection: 0-based numbers of snaps that fail like a camera timeout.
    failing_snaps: set[int] = field(default_factory=set)
    snap_count: int = 0
    clock: Callable[[], float] = field(default_factory=Stopwatch, repr=False)
    photo: PhotoConfig = field(default_factory=PhotoConfig)
    intensity_pct: float = 100.0
    binning: int = 1
    binning_mode: str = "Sum"
    bit_depth: int = 16
    z_sequence_max_length: int = 0
    z_drift_um_per_s: float = 0.0
    drift_t0_s: float | None = None  # the sample clock at the first frame: drift starts there
    #: the cells of every tile (None: `CellPopulation`'s defaults, the bundled model's)
    population: CellPopulation | None = None
    #: from this sample time on (seconds after the first frame), ``novel_population``
    #: replaces ``population`` (``livestain demo --scenario novel-cells``)
    novel_population: CellPopulation | None = None
    novel_after_s: float = 0.0
    #: > 0: in every window of this many seconds (after the first frame), the frames of
    #: its second third are blank (no light) and of its last third saturated (``livestain
    #: demo --scenario out-of-distribution``)
    faulty_every_s: float = 0.0
    #: a hardware autofocus device (as a Nikon PFS or Zeiss Definite Focus): its full
    #: focus puts the stage where the sample's reference plane is now, drift included
    autofocus: bool = False
    #: the stage z the autofocus reference maps to at the first frame (the plan's centre)
    autofocus_reference_um: float = 4.0
    z_sequence: ZSequence = field(default_factory=ZSequence, repr=False)
    ledger: DoseLedger = field(default_factory=DoseLedger, repr=False)
    _renderers: OrderedDict[tuple[int, int], FieldRenderer] = field(
        default_factory=OrderedDict, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        px = self.optics.pixel_size_um
        if abs(self.geometry.voxel_um[1] - px) > 1e-6 or abs(self.geometry.voxel_um[2] - px) > 1e-6:
            raise ValueError(
                f"sample voxel size {self.geometry.voxel_um[1:]} um must equal the camera "
                f"pixel size {self.optics.camera_pixel_um} um / {self.optics.magnification}x "
                f"= {px} um"
            )

    #: Light-path positions (the Channel group's presets).
    channels: ClassVar[tuple[str, ...]] = CHANNELS

    @property
    def pixel_size_um(self) -> float:
        """Unbinned pixel size in the sample (camera pixel / magnification)."""
        return self.optics.pixel_size_um

    def now(self) -> float:
        return float(self.clock())

    def sensor_shape(self) -> tuple[int, int]:
        """Camera frame shape at the current binning."""
        ny, nx = self.geometry.shape[1:]
        return (ny // self.binning, nx // self.binning)

    def tile_at(self, x_um: float, y_um: float) -> tuple[int, int]:
        """Which sample tile lies under the objective at stage (x, y)."""
        fy, fx = self.geometry.field_um
        return (round(y_um / fy), round(x_um / fx))

    def novel(self, t_s: float | None = None) -> bool:
        """Whether the novel population has replaced the first one at ``t_s`` (default: now)."""
        if self.novel_population is None or self.drift_t0_s is None:
            return False
        return (self.now() if t_s is None else t_s) - self.drift_t0_s >= self.novel_after_s

    def renderer(self, tile: tuple[int, int], t_s: float | None = None) -> FieldRenderer:
        """The (cached, at most 8 tiles) renderer of one tile's cells at ``t_s``."""
        novel = self.novel(t_s)
        key = (tile, novel)
        with self._lock:
            if key in self._renderers:
                self._renderers.move_to_end(key)
                return self._renderers[key]
        population = self.novel_population if novel else self.population
        sample = make_field(self.seed + (7919 if novel else 0), tile, self.geometry, population)
        r = FieldRenderer(sample, self.optics)
        with self._lock:
            self._renderers[key] = r
            while len(self._renderers) > 8:
                self._renderers.popitem(last=False)
        return r

    # -- time and light -----------------------------------------------------------
    def displacement(self, tile: tuple[int, int], t_s: float) -> np.ndarray:
        """(n_components, 2) lateral shift (um) of the tile's cells at ``t_s``; harmed
        cells stay where they were when harmed."""
        harmed = self.ledger.harmed_at(tile)
        t = t_s if harmed is None else min(t_s, harmed)
        return self.renderer(tile, t_s).sample.displacement(t)

    def sample_z(self, stage_z_um: float, t_s: float) -> float:
        """Where the focal plane at stage z ``stage_z_um`` lies in the sample at ``t_s``
        (the sample's own z, which drifts by ``z_drift_um_per_s``)."""
        if not self.z_drift_um_per_s or self.drift_t0_s is None:
            return stage_z_um
        return stage_z_um - self.z_drift_um_per_s * max(0.0, t_s - self.drift_t0_s)

    def _fault(self, t_s: float) -> str:
        """"blank", "saturated" or "" at ``t_s`` (see ``faulty_every_s``)."""
        if self.faulty_every_s <= 0 or self.drift_t0_s is None:
            return ""
        phase = ((t_s - self.drift_t0_s) % self.faulty_every_s) / self.faulty_every_s
        return "blank" if 1 / 3 <= phase < 2 / 3 else "saturated" if phase >= 2 / 3 else ""

    def focus_reference_um(self) -> float:
        """Where a hardware autofocus puts the stage now: its reference plane, moved by the
        sample's drift since the first frame."""
        t = self.now()
        if not self.z_drift_um_per_s or self.drift_t0_s is None:
            return self.autofocus_reference_um
        return self.autofocus_reference_um + self.z_drift_um_per_s * max(0.0, t - self.drift_t0_s)

    def dose_ledger(self) -> dict:
        """Cumulative light dose per position and channel (see `devices.dose`)."""
        return self.ledger.as_dict()

    def _bleach(self, structure: str, tile: tuple[int, int], channel: str) -> float:
        k = self.photo.bleach_dose_ms[structure]
        d = self.ledger.dose(tile, channel)
        return bleach_factor(d, d, k)

    def _relative(
        self, channel: str, z_um: float, tile: tuple[int, int], t_s: float
    ) -> tuple[np.ndarray, float]:
        """Noise-free relative image and photons per unit (before bleaching)."""
        r = self.renderer(tile, t_s)
        shifts = self.displacement(tile, t_s)
        power = self.intensity_pct / 100.0
        z_um = self.sample_z(z_um, t_s)
        if channel == BRIGHTFIELD:
            rel, per_ms = r.brightfield(z_um, shifts), self.optics.bf_photons_per_ms
        else:
            rel = r.fluorescence(channel.lower(), z_um, shifts)
            per_ms = self.optics.fl_photons_per_ms
        return rel, per_ms * self.exposure_ms * power

    def expected_plane(
        self, channel: str, z_um: float, tile: tuple[int, int], t_s: float | None = None
    ) -> np.ndarray:
        """Noise-free image, in photons per (unbinned) pixel, of one channel at one focus:
        the sample at time ``t_s`` (default: now), bleached by the dose so far."""
        t = self.now() if t_s is None else float(t_s)
        rel, photons = self._relative(channel, z_um, tile, t)
        if channel != BRIGHTFIELD:
            photons *= self._bleach(channel.lower(), tile, channel)
        return rel * np.float32(photons)

    def snap_into(self, buffer: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
        """Fill ``buffer`` with one noisy uint16 frame of the current state."""
        n = self.snap_count
        self.snap_count += 1
        if n in self.failing_snaps:
            raise TimeoutError(f"simulated camera timeout on snap #{n}")
        z_next = self.z_sequence.next_position()
        if z_next is not None:  # a triggered frame: the stage steps to its next position
            self.z_um = z_next
        tile = self.tile_at(*self.xy_um)
        t = self.now()
        if self.drift_t0_s is None:
            self.drift_t0_s = t
        channel = self.light_path
        meta: dict[str, object] = {
            "livestain_tile": tile_key(tile),
            "livestain_channel": channel,
            "livestain_time_s": round(t, 6),
        }
        fault = self._fault(t)
        if fault:
            meta["livestain_fault"] = fault
        if self.shutter_open and fault != "blank":
            rel, photons = self._relative(channel, self.z_um, tile, t)
            if fault == "saturated":
                photons *= 1000.0
            fluorescent = channel != BRIGHTFIELD
            before, after = self.ledger.expose(
                tile, channel, self.exposure_ms * self.intensity_pct / 100.0, t,
                self.photo.harm_dose_ms, fluorescent,
            )
            if fluorescent:
                photons *= bleach_factor(before, after, self.photo.bleach_dose_ms[channel.lower()])
                meta["livestain_dose"] = round(after, 6)
        else:
            rel, photons = np.zeros(self.geometry.shape[1:], np.float32), 0.0
        b = self.binning
        average = self.binning_mode == "Average"
        to_camera_counts(
            bin_pixels(rel, b), photons, self.optics, rng, out=buffer,
            read_noise_scale=float(b) if average else 1.0,
            divide=float(b * b) if average else 1.0,
            max_count=2**self.bit_depth - 1,
        )
        return meta


class _AutoShutterSequence:
    """Camera mixin: close a shutter the core opened for a sequence after its last frame.

    pymmcore-plus 0.18 does not open Python shutters around sequence acquisitions;
    `SimulatedCore` does, and hands the camera the closing.
    """

    _close_after_sequence: Callable[[], None] | None = None

    def start_sequence(self, n: int | None, get_buffer: Callable) -> Iterator[Mapping]:
        close, self._close_after_sequence = self._close_after_sequence, None
        try:
            for i, meta in enumerate(super().start_sequence(n, get_buffer)):  # type: ignore[misc]
                if close is not None and n is not None and i + 1 >= n:
                    close()
                    close = None
                yield meta
        finally:
            if close is not None:
                close()


class SimCamera(_AutoShutterSequence, SimpleCameraDevice):
    """A 16-bit camera that images the simulated sample."""

    def __init__(self, scope: SimulatedScope) -> None:
        super().__init__()
        self._scope = scope
        self._rng = np.random.default_rng(scope.seed + 1)
        self.set_property_limits("Exposure", (0.001, 60000.0))
        self.set_property_limits("Binning", (1, 4))
        self.register_property(
            "BinningMode", getter=SimCamera._get_binning_mode, setter=SimCamera._set_binning_mode,
            allowed_values=("Sum", "Average"), property_type=str,
        )
        self.register_property(
            "BitDepth", getter=SimCamera._get_bit_depth, setter=SimCamera._set_bit_depth,
            limits=(min(BIT_DEPTHS), max(BIT_DEPTHS)), property_type=int,
        )
        self.register_property(
            "DoseLedger", getter=SimCamera._get_dose_ledger, property_type=str, is_read_only=True
        )

    def sensor_shape(self) -> tuple[int, int]:
        return self._scope.sensor_shape()

    def dtype(self) -> str:
        return "uint16"

    def get_exposure(self) -> float:
        return self._scope.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        if float(exposure) <= 0:
            raise ValueError(f"exposure must be positive, got {exposure} ms")
        self._scope.exposure_ms = float(exposure)

    def get_binning(self) -> int:
        return self._scope.binning

    def set_binning(self, value: int) -> None:
        b = int(float(value))
        if b not in BINNINGS or b != float(value):
            raise ValueError(f"binning {value!r} is not one of {BINNINGS}")
        if b != self._scope.binning:
            self.clear_roi()  # as Micro-Manager cameras do: a ROI is in binned pixels
        self._scope.binning = b

    def _get_binning_mode(self) -> str:
        return self._scope.binning_mode

    def _set_binning_mode(self, value: str) -> None:
        self._scope.binning_mode = str(value)

    def _get_bit_depth(self) -> int:
        return self._scope.bit_depth

    def _set_bit_depth(self, value: int) -> None:
        bits = int(float(value))
        if bits not in BIT_DEPTHS or bits != float(value):
            raise ValueError(f"bit depth {value!r} is not one of {BIT_DEPTHS}")
        self._scope.bit_depth = bits

    def _get_dose_ledger(self) -> str:
        return json.dumps(self._scope.dose_ledger())

    def snap(self, buffer: np.ndarray) -> Mapping:
        return self._scope.snap_into(buffer, self._rng)


class SimFocus(StageDevice):
    """Z focus drive (um); moves are instantaneous. Sequenceable when the scope says so."""

    def __init__(self, scope) -> None:  # noqa: ANN001  (SimulatedScope or ReplayScope)
        super().__init__()
        self._scope = scope

    def get_position_um(self) -> float:
        return self._scope.z_um

    def set_position_um(self, val: float) -> None:
        self._scope.z_um = float(val)

    def home(self) -> None:
        self._scope.z_um = 0.0

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        pass

    # -- hardware sequencing ------------------------------------------------------
    def get_sequence_max_length(self) -> int:
        return int(self._scope.z_sequence_max_length)

    def send_sequence(self, sequence: tuple[float, ...]) -> None:
        if len(sequence) > self.get_sequence_max_length():
            raise ValueError(
                f"focus sequence of {len(sequence)} > max {self.get_sequence_max_length()}"
            )
        self._scope.z_sequence.load(sequence)

    def start_sequence(self) -> None:
        self._scope.z_sequence.start()

    def stop_sequence(self) -> None:
        self._scope.z_sequence.stop()

    def is_linear_sequenceable(self) -> bool:
        return self.get_sequence_max_length() > 0

    def set_linear_sequence(self, dZ_um: float, nSlices: int) -> None:  # noqa: N803
        if not self.is_linear_sequenceable():
            raise NotImplementedError("this focus drive is not sequenceable")
        z = self._scope.z_um
        self.send_sequence(tuple(z + i * float(dZ_um) for i in range(int(nSlices))))


class SimXYStage(XYStageDevice):
    """XY stage (um); each camera-field-sized tile of the plane shows different cells."""

    def __init__(self, scope) -> None:  # noqa: ANN001
        super().__init__()
        self._scope = scope

    def get_position_um(self) -> tuple[float, float]:
        return self._scope.xy_um

    def set_position_um(self, x: float, y: float) -> None:
        self._scope.xy_um = (float(x), float(y))

    def home(self) -> None:
        self._scope.xy_um = (0.0, 0.0)

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        pass

    def set_origin_x(self) -> None:
        pass

    def set_origin_y(self) -> None:
        pass


class SimLightPath(StateDevice):
    """Selects the illumination: transmitted brightfield or one fluorescence channel.

    ``Intensity`` (percent of full lamp power) scales the photons and the light dose.
    """

    def __init__(self, scope, intensity: bool = True) -> None:  # noqa: ANN001
        self._channels: tuple[str, ...] = tuple(scope.channels)
        super().__init__(dict(enumerate(self._channels)))
        self._scope = scope
        if intensity:
            self.register_property(
                "Intensity", getter=SimLightPath._get_intensity,
                setter=SimLightPath._set_intensity, limits=(0.0, 100.0), property_type=float,
            )

    def get_state(self) -> int:
        return self._channels.index(self._scope.light_path)

    def set_state(self, position: int) -> None:
        self._scope.light_path = self._channels[int(position)]

    def _get_intensity(self) -> float:
        return self._scope.intensity_pct

    def _set_intensity(self, value: float) -> None:
        self._scope.intensity_pct = float(value)


class SimShutter(ShutterDevice):
    """The lamp shutter; the camera sees only offset and read noise while closed."""

    def __init__(self, scope) -> None:  # noqa: ANN001
        super().__init__()
        self._scope = scope

    def get_open(self) -> bool:
        return self._scope.shutter_open

    def set_open(self, open: bool) -> None:
        self._scope.shutter_open = bool(open)


def _autoshutter_core_class() -> type:
    """`UniMMCore` whose snaps and sequences honour auto-shutter for Python shutters.

    pymmcore-plus 0.18 opens a C++ shutter around a snap or a sequence acquisition, but
    not a Python one: with auto-shutter on, every simulated frame would be dark. This
    subclass opens the shutter for the duration of the snap or sequence, as
    Micro-Manager does, and reports the camera's bit depth rather than its dtype's.
    """
    from pymmcore_plus.experimental.unicore import UniMMCore

    class SimulatedCore(UniMMCore):
        _sequence_shutter: str = ""

        def snapImage(self) -> None:
            shutter = self.getShutterDevice() if self.getAutoShutter() else ""
            opened = bool(shutter) and not self.getShutterOpen(shutter)
            if opened:
                self.setShutterOpen(shutter, True)
            try:
                super().snapImage()
            finally:
                if opened:
                    self.setShutterOpen(shutter, False)

        def _open_for_sequence(self, camera: str) -> None:
            shutter = self.getShutterDevice() if self.getAutoShutter() else ""
            if not shutter or self.getShutterOpen(shutter):
                return
            self.setShutterOpen(shutter, True)
            self._sequence_shutter = shutter
            cam = self._py_camera(camera)
            if isinstance(cam, _AutoShutterSequence):
                cam._close_after_sequence = self._close_sequence_shutter

        def _close_sequence_shutter(self) -> None:
            shutter, self._sequence_shutter = self._sequence_shutter, ""
            if shutter:
                self._do_shutter_open(shutter, False)

        def _do_start_sequence_acquisition(
            self, cameraLabel: str, numImages: int, intervalMs: float, stopOnOverflow: bool  # noqa: N803
        ) -> None:
            self._open_for_sequence(cameraLabel)
            super()._do_start_sequence_acquisition(cameraLabel, numImages, intervalMs, stopOnOverflow)

        def _do_start_continuous_sequence_acquisition(self, intervalMs: float = 0) -> None:  # noqa: N803
            self._open_for_sequence(self.getCameraDevice())
            super()._do_start_continuous_sequence_acquisition(intervalMs)

        def _do_stop_sequence_acquisition(self, cameraLabel: str) -> None:  # noqa: N803
            super()._do_stop_sequence_acquisition(cameraLabel)
            self._close_sequence_shutter()

        def getImageBitDepth(self) -> int:
            cam = self._py_camera()
            if cam is not None and cam.has_property("BitDepth"):
                return int(cam.get_property_value("BitDepth"))
            return super().getImageBitDepth()

    return SimulatedCore


def _load_scope_devices(core, scope, camera) -> None:  # noqa: ANN001
    """Load camera, focus, XY, light path and shutter over ``scope``; Channel group."""
    core.loadPyDevice(CAMERA, camera)
    core.loadPyDevice(FOCUS, SimFocus(scope))
    core.loadPyDevice(XY, SimXYStage(scope))
    core.loadPyDevice(LIGHT_PATH, SimLightPath(scope, intensity=hasattr(scope, "intensity_pct")))
    core.loadPyDevice(SHUTTER, SimShutter(scope))
    core.initializeAllDevices()
    core.setCameraDevice(CAMERA)
    core.setFocusDevice(FOCUS)
    core.setXYStageDevice(XY)
    core.setShutterDevice(SHUTTER)
    core.setAutoShutter(True)
    core.defineConfigGroup(CHANNEL_GROUP)
    for name in scope.channels:
        core.defineConfig(CHANNEL_GROUP, name, LIGHT_PATH, "Label", name)
    core.setChannelGroup(CHANNEL_GROUP)


def build_simulated_core(scope: SimulatedScope | None = None):  # -> UniMMCore
    """A ready-to-use `UniMMCore` driving the simulated microscope.

    Sets the shutter (the MDA engine needs one), the ``Channel`` group with one preset
    per light-path position, and a pixel size (OME writers need a non-zero one).
    """
    scope = scope or SimulatedScope()
    with quiet_unicore():
        core = _autoshutter_core_class()()
    _load_scope_devices(core, scope, SimCamera(scope))
    core.setConfig(CHANNEL_GROUP, BRIGHTFIELD)
    core.definePixelSizeConfig("Sim20x")
    core.setPixelSizeUm("Sim20x", scope.pixel_size_um)
    core.setPixelSizeConfig("Sim20x")
    core.livestain_scope = scope  # type: ignore[attr-defined]
    if scope.autofocus:
        _add_hardware_autofocus(core, scope)
    return core


#: The simulated hardware autofocus device's name.
AUTOFOCUS_DEVICE = "SimAutoFocus"


def _add_hardware_autofocus(core, scope: SimulatedScope) -> None:  # noqa: ANN001
    """Give ``core`` a hardware autofocus device (``scope.autofocus``).

    The pure-Python device layer (unicore) has no autofocus device type, so the few core
    calls pymmcore-plus's MDA engine makes for useq's ``autofocus_plan`` (`fullFocus`,
    the continuous-focus switches, `getAutoFocusDevice`) are answered here, from the
    simulator's own state: a full focus moves the stage to the sample's reference plane.
    """
    core.getAutoFocusDevice = lambda: AUTOFOCUS_DEVICE
    core.isContinuousFocusLocked = lambda: False
    core.isContinuousFocusEnabled = lambda: False
    core.enableContinuousFocus = lambda enable: None
    core.setAutoFocusOffset = lambda offset: None

    def full_focus() -> None:
        core.setZPosition(scope.focus_reference_um())

    core.fullFocus = full_focus

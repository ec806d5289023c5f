"""The built-in simulated microscope: pymmcore-plus pure-Python devices over a 3D sample.

`build_simulated_core()` returns a `UniMMCore` with a camera, a Z focus stage, an XY
stage, a light path (a state device whose positions are ``Brightfield`` and one per
fluorescence structure) and a shutter, plus a ``Channel`` config group and a pixel
size, so any useq-schema plan runs on it through pymmcore-plus's MDA runner exactly as
it would on real hardware.

All devices are thin views onto one `SimulatedScope`, the shared physical state
(where the stage is, which light is on, which sample tile is under the objective).
The camera renders what that state implies, on demand, from `devices.optics`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

from ._quiet import quiet_unicore
from .optics import FieldRenderer, OpticsConfig, to_camera_counts
from .sample import STRUCTURES, SampleGeometry, make_field

BRIGHTFIELD = "Brightfield"
#: Light-path / channel preset names, brightfield first, then one per structure.
CHANNELS: tuple[str, ...] = (BRIGHTFIELD, *(s.capitalize() for s in STRUCTURES))

CAMERA, FOCUS, XY, LIGHT_PATH, SHUTTER = "Camera", "Z", "XY", "LightPath", "Shutter"
CHANNEL_GROUP = "Channel"


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
    _renderers: OrderedDict[tuple[int, int], FieldRenderer] = field(
        default_factory=OrderedDict, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pixel_size_um(self) -> float:
        return self.geometry.voxel_um[2]

    def tile_at(self, x_um: float, y_um: float) -> tuple[int, int]:
        """Which sample tile lies under the objective at stage (x, y)."""
        fy, fx = self.geometry.field_um
        return (round(y_um / fy), round(x_um / fx))

    def renderer(self, tile: tuple[int, int]) -> FieldRenderer:
        """The (cached, at most 8 tiles) renderer of one tile's cells."""
        with self._lock:
            if tile in self._renderers:
                self._renderers.move_to_end(tile)
                return self._renderers[tile]
        sample = make_field(self.seed, tile, self.geometry)
        r = FieldRenderer(sample, self.optics)
        with self._lock:
            self._renderers[tile] = r
            while len(self._renderers) > 8:
                self._renderers.popitem(last=False)
        return r

    def expected_plane(self, channel: str, z_um: float, tile: tuple[int, int]) -> np.ndarray:
        """Noise-free image, in photons per pixel, of one channel at one focus."""
        r = self.renderer(tile)
        if channel == BRIGHTFIELD:
            rel, per_ms = r.brightfield(z_um), self.optics.bf_photons_per_ms
        else:
            rel, per_ms = r.fluorescence(channel.lower(), z_um), self.optics.fl_photons_per_ms
        return rel * (per_ms * self.exposure_ms)

    def snap_into(self, buffer: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
        """Fill ``buffer`` with one noisy uint16 frame of the current state."""
        n = self.snap_count
        self.snap_count += 1
        if n in self.failing_snaps:
            raise TimeoutError(f"simulated camera timeout on snap #{n}")
        tile = self.tile_at(*self.xy_um)
        if self.shutter_open:
            photons = self.expected_plane(self.light_path, self.z_um, tile)
        else:
            photons = np.zeros(buffer.shape, np.float32)
        to_camera_counts(photons, 1.0, self.optics, rng, out=buffer)
        return {"livestain_tile": f"{tile[0]},{tile[1]}", "livestain_channel": self.light_path}


class SimCamera(SimpleCameraDevice):
    """A 16-bit camera that images the simulated sample."""

    def __init__(self, scope: SimulatedScope) -> None:
        super().__init__()
        self._scope = scope
        self._rng = np.random.default_rng(scope.seed + 1)

    def sensor_shape(self) -> tuple[int, int]:
        return self._scope.geometry.shape[1:]  # type: ignore[return-value]

    def dtype(self) -> str:
        return "uint16"

    def get_exposure(self) -> float:
        return self._scope.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._scope.exposure_ms = float(exposure)

    def snap(self, buffer: np.ndarray) -> Mapping:
        return self._scope.snap_into(buffer, self._rng)


class SimFocus(StageDevice):
    """Z focus drive (um); moves are instantaneous."""

    def __init__(self, scope: SimulatedScope) -> None:
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


class SimXYStage(XYStageDevice):
    """XY stage (um); each camera-field-sized tile of the plane shows different cells."""

    def __init__(self, scope: SimulatedScope) -> None:
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
    """Selects the illumination: transmitted brightfield or one fluorescence channel."""

    def __init__(self, scope: SimulatedScope) -> None:
        super().__init__(dict(enumerate(CHANNELS)))
        self._scope = scope

    def get_state(self) -> int:
        return CHANNELS.index(self._scope.light_path)

    def set_state(self, position: int) -> None:
        self._scope.light_path = CHANNELS[int(position)]


class SimShutter(ShutterDevice):
    """The lamp shutter; the camera sees only offset and read noise while closed."""

    def __init__(self, scope: SimulatedScope) -> None:
        super().__init__()
        self._scope = scope

    def get_open(self) -> bool:
        return self._scope.shutter_open

    def set_open(self, open: bool) -> None:
        self._scope.shutter_open = bool(open)


def _autoshutter_core_class() -> type:
    """`UniMMCore` whose snaps honour auto-shutter for Python shutter devices.

    pymmcore-plus 0.18 opens a C++ shutter around a snap, but not a Python one: with
    auto-shutter on, every simulated frame would be dark. This subclass opens the
    shutter for the duration of the snap, as Micro-Manager does.
    """
    from pymmcore_plus.experimental.unicore import UniMMCore

    class SimulatedCore(UniMMCore):
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

    return SimulatedCore


def build_simulated_core(scope: SimulatedScope | None = None):  # -> UniMMCore
    """A ready-to-use `UniMMCore` driving the simulated microscope.

    Sets the shutter (the MDA engine needs one), the ``Channel`` group with one preset
    per light-path position, and a pixel size (OME writers need a non-zero one).
    """
    scope = scope or SimulatedScope()
    with quiet_unicore():
        core = _autoshutter_core_class()()
    core.loadPyDevice(CAMERA, SimCamera(scope))
    core.loadPyDevice(FOCUS, SimFocus(scope))
    core.loadPyDevice(XY, SimXYStage(scope))
    core.loadPyDevice(LIGHT_PATH, SimLightPath(scope))
    core.loadPyDevice(SHUTTER, SimShutter(scope))
    core.initializeAllDevices()
    core.setCameraDevice(CAMERA)
    core.setFocusDevice(FOCUS)
    core.setXYStageDevice(XY)
    core.setShutterDevice(SHUTTER)
    core.setAutoShutter(True)
    core.defineConfigGroup(CHANNEL_GROUP)
    for name in CHANNELS:
        core.defineConfig(CHANNEL_GROUP, name, LIGHT_PATH, "Label", name)
    core.setChannelGroup(CHANNEL_GROUP)
    core.setConfig(CHANNEL_GROUP, BRIGHTFIELD)
    core.definePixelSizeConfig("Sim20x")
    core.setPixelSizeUm("Sim20x", scope.pixel_size_um)
    core.setPixelSizeConfig("Sim20x")
    core.livestain_scope = scope  # type: ignore[attr-defined]
    return core

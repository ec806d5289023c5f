"""A replay microscope: recorded z-stacks played back through real pymmcore-plus devices.

`build_replay_core(source)` returns a `UniMMCore` with the same devices as the
simulated scope (camera, Z focus, XY stage, light path, shutter, ``Channel`` group,
pixel size), but the camera returns recorded planes, bit for bit, as if acquiring them:

* the **XY position selects the file**: position ``i`` lies at stage
  ``x = i * field width`` (``width_px * pixel size``), ``y = 0``;
* the **focus position selects the plane**: the recorded plane nearest the stage z.
  Plane positions come from the file: OME ``Plane/PositionZ`` when present, else a
  ``"z_um"`` list in the JSON image description, else ``PhysicalSizeZ`` (OME), the
  ImageJ ``spacing`` or a Micro-Manager ``z-step_um`` as the step, centred on z = 0,
  else 1 um steps centred on z = 0. A single-plane channel answers at every z;
* the **light path selects the channel**: ``Brightfield`` and, where the data have
  them, fluorescence channels (OME channel names; brightfield-like names such as
  ``BF``, ``Bright``, ``TL Brightfield`` become ``Brightfield``; a file without channel
  names is brightfield).

Exposure, lamp and dose do not change recorded pixels; with the shutter closed the
camera returns a dark (zero) frame. The focus drive is sequenceable like the
simulated one when ``z_sequence_max_length`` > 0.

Sources
-------
* a TIFF/OME-TIFF file: one position (ZYX, or CZYX with channel names);
* a folder of sub-folders: one position per sub-folder (sorted), its TIFF files the
  channels; a file named ``X_noisy`` stands for channel ``X`` (the layout of
  ``livestain simulate``: camera images replace the noise-free truth);
* a folder of TIFF files: files are grouped into positions by the part of their name
  before the first ``_`` (``Set1_brightfield_zstack.ome.tif`` and ``Set1_dapi.ome.tif``
  are one position with channels ``Brightfield`` and ``dapi``); a file without ``_`` is
  a position of its own;
* a list of the above entries (file paths, or mappings channel name -> file path), one
  per position.

All positions must share one frame shape, dtype (uint8 or uint16) and pixel size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import tifffile
from pymmcore_plus.experimental.unicore import SimpleCameraDevice

from ._quiet import quiet_unicore
from .simulated import (
    BRIGHTFIELD,
    CHANNEL_GROUP,
    ZSequence,
    _autoshutter_core_class,
    _AutoShutterSequence,
    _load_scope_devices,
)

ReplaySource = Union[str, Path, Sequence[Union[str, Path, Mapping[str, Union[str, Path]]]]]

_BF_NAMES = {"bf", "bright", "brightfield", "bright field", "bright-field", "tl", "trans",
             "transmitted", "tl brightfield", "default", "widefield", ""}
_TIFF = re.compile(r"\.(ome\.)?tiff?$", re.IGNORECASE)


@dataclass
class ReplayChannel:
    """One recorded channel of one position: planes (z, y, x) and their stage z (um)."""

    name: str
    planes: np.ndarray
    z_um: np.ndarray
    source: str

    def nearest(self, z_um: float) -> int:
        """Index of the recorded plane nearest the focus position."""
        return int(np.argmin(np.abs(self.z_um - float(z_um))))


@dataclass
class ReplayPosition:
    name: str
    channels: dict[str, ReplayChannel]


@dataclass
class ReplayData:
    """Recorded positions with one frame shape, dtype and pixel size."""

    positions: list[ReplayPosition]
    pixel_size_um: float
    pixel_size_known: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        ch = next(iter(self.positions[0].channels.values()))
        return ch.planes.shape[1:]  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return next(iter(self.positions[0].channels.values())).planes.dtype

    @property
    def field_width_um(self) -> float:
        return self.shape[1] * self.pixel_size_um

    @property
    def field_height_um(self) -> float:
        return self.shape[0] * self.pixel_size_um

    def channel_names(self) -> tuple[str, ...]:
        """Every channel of any position, ``Brightfield`` first."""
        names: list[str] = []
        for p in self.positions:
            names += [n for n in p.channels if n not in names]
        return tuple(sorted(names, key=lambda n: (n != BRIGHTFIELD, names.index(n))))

    def stage_x_um(self, index: int) -> float:
        """Stage x of position ``index`` (y is 0)."""
        return index * self.field_width_um

    def summary(self) -> str:
        """What a user needs to write a plan: positions, channels, z positions."""
        lines = [f"replay: {len(self.positions)} position(s), frames {self.shape[0]}x"
                 f"{self.shape[1]} {self.dtype}, pixel {self.pixel_size_um:g} um"
                 + ("" if self.pixel_size_known else " (unknown in the files; assumed)")]
        for i, p in enumerate(self.positions):
            chans = ", ".join(
                f"{c.name} ({len(c.z_um)} planes, z {c.z_um.min():g}..{c.z_um.max():g} um)"
                for c in p.channels.values()
            )
            lines.append(f"  position {i} '{p.name}' at x={self.stage_x_um(i):g} y=0: {chans}")
        return "\n".join(lines)


# -- reading ---------------------------------------------------------------------------
def _stem(path: Path) -> str:
    return _TIFF.sub("", path.name)


def _channel_name(raw: str) -> str:
    return BRIGHTFIELD if raw.strip().lower().replace("_", " ") in _BF_NAMES or \
        "bright" in raw.lower() else raw.strip()


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def _read_tiff(path: Path) -> tuple[np.ndarray, list[str | None], np.ndarray | None,
                                    float | None, float | None]:
    """(CZYX array, channel names, plane z positions, z step, pixel size) of a file."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr = series.asarray()
        axes = series.axes.upper()
        names: list[str | None] = []
        z_pos = z_step = px = None
        description: dict = {}
        if tif.ome_metadata:
            image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
            image = image[0] if isinstance(image, list) else image
            pixels = image.get("Pixels", {})
            names = [c.get("Name") for c in _as_list(pixels.get("Channel"))]
            z_step = _float(pixels.get("PhysicalSizeZ"))
            px = _float(pixels.get("PhysicalSizeX"))
            planes = [p for p in _as_list(pixels.get("Plane")) if int(p.get("TheC", 0)) == 0
                      and int(p.get("TheT", 0)) == 0 and "PositionZ" in p]
            if planes and len(planes) == int(pixels.get("SizeZ", 1)):
                planes.sort(key=lambda p: int(p.get("TheZ", 0)))
                z_pos = np.array([float(p["PositionZ"]) for p in planes])
            try:
                description = json.loads(image.get("Description") or "{}")
            except (json.JSONDecodeError, TypeError):
                description = {}
        ij = tif.imagej_metadata or {}
        if ij:
            unit = str(ij.get("unit", "")).lower()
            micron = unit in ("micron", "um", "µm", "\\u00b5m", "microns")
            if z_step is None and micron:
                z_step = _float(ij.get("spacing"))
            try:
                info = json.loads(ij.get("Info", "{}"))
            except (json.JSONDecodeError, TypeError):
                info = {}
            if isinstance(info, dict):
                z_step = z_step or _float(info.get("z-step_um"))
                px = px or _float(info.get("PixelSize_um"))
                if not names:
                    names = [n for n in info.get("ChNames", []) if n != "Default"]
            if px is None and micron:
                res = tif.pages[0].tags.get("XResolution")
                if res is not None:
                    num, den = res.value
                    px = _float(den / num) if num else None
        if isinstance(description, dict) and z_pos is None and "z_um" in description:
            z_pos = np.asarray(description["z_um"], float)
    # to CZYX
    keep = {"C", "Z", "Y", "X"}
    for i, ax in reversed(list(enumerate(axes))):
        if ax in keep:
            continue
        if ax in ("Q", "I") and "Z" not in axes:  # generic planes: a z-stack
            axes = axes[:i] + "Z" + axes[i + 1:]
            continue
        if arr.shape[i] != 1:
            raise ValueError(f"{path}: axis {ax!r} of size {arr.shape[i]} (axes {series.axes}); "
                             f"replay takes one ZYX or CZYX stack per file")
        arr = arr.take(0, axis=i)
        axes = axes[:i] + axes[i + 1:]
    for ax in ("C", "Z"):
        if ax not in axes:
            arr = arr[None]
            axes = ax + axes
    arr = np.ascontiguousarray(np.transpose(arr, [axes.index(a) for a in "CZYX"]))
    names = list(names)[: arr.shape[0]] if names else []
    names += [None] * (arr.shape[0] - len(names))
    if z_pos is not None and len(z_pos) != arr.shape[1]:
        z_pos = None
    return arr, names, z_pos, z_step, px


def _channels_of(path: Path, name_hint: str | None) -> tuple[list[ReplayChannel], float | None]:
    arr, names, z_pos, z_step, px = _read_tiff(path)
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: replay plays camera images (uint8 or uint16), not {arr.dtype}")
    nz = arr.shape[1]
    if z_pos is None:
        z_pos = (np.arange(nz) - (nz - 1) / 2) * (z_step or 1.0)
    order = np.argsort(z_pos, kind="stable")
    out = []
    for c in range(arr.shape[0]):
        raw = names[c] or (name_hint if arr.shape[0] == 1 else None) or \
            (BRIGHTFIELD if arr.shape[0] == 1 else f"C{c}")
        out.append(ReplayChannel(_channel_name(raw), arr[c][order], np.asarray(z_pos)[order],
                                 str(path)))
    return out, px


def _position(name: str, files: Mapping[str | None, Path]) -> tuple[ReplayPosition, list[float]]:
    chans: dict[str, ReplayChannel] = {}
    pxs: list[float] = []
    for hint, f in files.items():
        got, px = _channels_of(Path(f), hint)
        if px:
            pxs.append(px)
        for ch in got:
            if ch.name in chans:
                raise ValueError(f"position {name!r}: channel {ch.name!r} found in both "
                                 f"{chans[ch.name].source} and {ch.source}")
            chans[ch.name] = ch
    return ReplayPosition(name, chans), pxs


def _tiffs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _TIFF.search(p.name))


def _folder_files(folder: Path) -> dict[str | None, Path]:
    """A position folder's files by channel hint; ``X_noisy`` replaces ``X``."""
    files = {_stem(p): p for p in _tiffs(folder)}
    out: dict[str | None, Path] = {}
    for stem, p in files.items():
        if stem.endswith("_noisy"):
            out[stem[: -len("_noisy")]] = p
        elif f"{stem}_noisy" not in files:
            out[stem] = p
    return out


def _entries(source: ReplaySource) -> list[tuple[str, dict[str | None, Path]]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            return [(_stem(path), {None: path})]
        if not path.is_dir():
            raise FileNotFoundError(f"replay source {path} does not exist")
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and _tiffs(d))
        if subdirs:
            return [(d.name, _folder_files(d)) for d in subdirs]
        groups: dict[str, dict[str | None, Path]] = {}
        for f in _tiffs(path):
            stem = _stem(f)
            key, _, rest = stem.partition("_")
            groups.setdefault(key, {})[rest or None] = f
        if not groups:
            raise FileNotFoundError(f"replay source {path} holds no TIFF files")
        return [(k, g) for k, g in groups.items()]
    out = []
    for i, entry in enumerate(source):
        if isinstance(entry, Mapping):
            out.append((f"pos{i}", {str(k): Path(v) for k, v in entry.items()}))
        else:
            out.append((_stem(Path(entry)), {None: Path(entry)}))
    return out


def load_replay(source: ReplaySource) -> ReplayData:
    """Read every position of a replay source (see the module docstring)."""
    positions, pxs = [], []
    for name, files in _entries(source):
        pos, px = _position(name, files)
        positions.append(pos)
        pxs += px
    if not positions:
        raise ValueError(f"replay source {source} holds no stacks")
    shapes = {c.planes.shape[1:] for p in positions for c in p.channels.values()}
    dtypes = {c.planes.dtype for p in positions for c in p.channels.values()}
    if len(shapes) > 1 or len(dtypes) > 1:
        detail = "; ".join(f"{c.source}: {c.planes.shape[1:]} {c.planes.dtype}"
                           for p in positions for c in p.channels.values())
        raise ValueError(f"replay positions must share one frame shape and dtype: {detail}")
    if pxs and (max(pxs) - min(pxs)) > 0.01 * min(pxs):
        raise ValueError(f"replay files disagree on the pixel size: {sorted(set(pxs))} um")
    return ReplayData(positions, pxs[0] if pxs else 1.0, pixel_size_known=bool(pxs))


# -- devices -----------------------------------------------------------------------------
@dataclass
class ReplayScope:
    """Stage, light path and shutter state over recorded data (duck-types
    `SimulatedScope` for the shared focus, XY, light-path and shutter devices)."""

    data: ReplayData
    z_um: float = 0.0
    xy_um: tuple[float, float] = (0.0, 0.0)
    light_path: str = BRIGHTFIELD
    shutter_open: bool = False
    exposure_ms: float = 10.0
    z_sequence_max_length: int = 0
    z_sequence: ZSequence = field(default_factory=ZSequence, repr=False)
    snap_count: int = 0
    channels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.channels = self.data.channel_names()
        if self.light_path not in self.channels:
            self.light_path = self.channels[0]

    def position_at(self, x_um: float, y_um: float) -> int:
        """Index of the recorded position under the objective; ValueError off the data."""
        i = round(x_um / self.data.field_width_um)
        if round(y_um / self.data.field_height_um) != 0 or not 0 <= i < len(self.data.positions):
            xs = ", ".join(f"{self.data.stage_x_um(k):g}" for k in range(len(self.data.positions)))
            raise ValueError(f"no recorded position at stage x={x_um:g}, y={y_um:g} um; "
                             f"the replay has positions at y=0, x = {xs} um")
        return i

    def snap_into(self, buffer: np.ndarray) -> dict[str, object]:
        self.snap_count += 1
        z_next = self.z_sequence.next_position()
        if z_next is not None:
            self.z_um = z_next
        i = self.position_at(*self.xy_um)
        pos = self.data.positions[i]
        ch = pos.channels.get(self.light_path)
        if ch is None:
            raise ValueError(f"position {i} ({pos.name!r}) has no {self.light_path!r} channel; "
                             f"it has {sorted(pos.channels)}")
        k = ch.nearest(self.z_um)
        if self.shutter_open:
            buffer[...] = ch.planes[k]
        else:
            buffer[...] = 0
        return {"livestain_replay_file": ch.source, "livestain_replay_plane": k,
                "livestain_replay_z_um": float(ch.z_um[k]), "livestain_channel": ch.name}


class ReplayCamera(_AutoShutterSequence, SimpleCameraDevice):
    """A camera returning recorded planes exactly (uint8 or uint16, as recorded)."""

    def __init__(self, scope: ReplayScope) -> None:
        super().__init__()
        self._scope = scope

    def sensor_shape(self) -> tuple[int, int]:
        return self._scope.data.shape

    def dtype(self) -> str:
        return str(self._scope.data.dtype)

    def get_exposure(self) -> float:
        return self._scope.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._scope.exposure_ms = float(exposure)

    def snap(self, buffer: np.ndarray) -> Mapping:
        return self._scope.snap_into(buffer)


def build_replay_core(source: ReplaySource | ReplayData, z_sequence_max_length: int = 0):  # -> UniMMCore
    """A `UniMMCore` whose camera plays back ``source`` (see the module docstring).

    The scope is ``core.livestain_replay``; ``core.livestain_replay.data.summary()``
    says where the positions, channels and planes are.
    """
    data = source if isinstance(source, ReplayData) else load_replay(source)
    scope = ReplayScope(data, z_sequence_max_length=z_sequence_max_length)
    first = data.positions[0].channels.get(BRIGHTFIELD) or \
        next(iter(data.positions[0].channels.values()))
    scope.z_um = float(first.z_um[len(first.z_um) // 2])
    with quiet_unicore():
        core = _autoshutter_core_class()()
    _load_scope_devices(core, scope, ReplayCamera(scope))
    core.setConfig(CHANNEL_GROUP, scope.channels[0])
    core.definePixelSizeConfig("Replay")
    core.setPixelSizeUm("Replay", data.pixel_size_um)
    core.setPixelSizeConfig("Replay")
    core.livestain_replay = scope  # type: ignore[attr-defined]
    return core

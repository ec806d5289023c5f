"""Where a run's stacks live on disk: OME-Zarr (the default) or one OME-TIFF per stack.

OME-Zarr (``storage: zarr``), NGFF 0.5, one image per position and kind, which napari,
Fiji (BioFormats) and iohub open as one dataset each::

    OUT/p000/raw.ome.zarr          TCZYX, every acquired channel, one chunk per stack
    OUT/p000/prediction.ome.zarr   TCZYX float32, one channel per structure

A 3-day run of 96 positions at one stack a minute is ~800,000 OME-TIFF files; as Zarr
it is one chunk file per stack, in two folders per position that viewers show as one
movie each. The arrays grow along t (and c, when a check-frame channel first appears)
by rewriting their small ``zarr.json``; a time point not written yet reads as zeros:
the journal, not the array, says what was acquired, and a recorded gap stays a gap.

OME-TIFF (``storage: tiff``), for users who want plain files::

    OUT/p000/t0000_<channel>.ome.tif, OUT/p000/t0000_prediction.ome.tif

Either way a stack is found again by its *reference*, the string the journal keeps
(and the wire header's ``path``): a TIFF path, or ``IMAGE.ome.zarr#t=3&c=brightfield``.
`read_ref` reads either, so catch-up, checks, batch and training need not know which.

Crash safety is the same for both: a stack is recorded as written in the journal only
after its bytes are on disk (TIFF: write to ``.partial``, fsync, rename; Zarr:
tensorstore's file driver writes each chunk to a temporary file and renames it into
place), so kill -9 at any moment leaves every recorded stack readable.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from livestain.colors import hex_color
from livestain.plate import PlateLayout
from livestain.stackio import atomic_file, fsync_dir, read_stack, write_stack

Storage = Literal["zarr", "tiff"]
STORAGES: tuple[str, ...] = ("zarr", "tiff")
#: Zarr chunk compression: none by default (brightfield noise compresses ~1.2x at best,
#: see bench/store.py); ``zstd`` trades CPU for disk on long runs.
Compression = Literal["none", "zstd"]

RAW_IMAGE = "raw.ome.zarr"
PREDICTION_IMAGE = "prediction.ome.zarr"
# an image: OUT/p000/raw.ome.zarr, or a plate's field: OUT/raw.ome.zarr/B/3/0 (`livestain.plate`)
_REF = re.compile(r"^(?P<image>.+\.ome\.zarr(?:/[A-Za-z0-9]+/[A-Za-z0-9]+/\d+)?)#t=(?P<t>\d+)(?:&c=(?P<c>[^&]+))?$")


class StoreError(OSError):
    """A stack the store cannot write or read as asked (a shape that does not fit the
    run's array, an unknown reference); an OSError, so the daemon stops the run with
    the message and loses nothing already written."""


def position_folder(out_dir: Path, p: int) -> Path:
    return out_dir / f"p{p:03d}"


def is_zarr_ref(ref: str | Path) -> bool:
    return _REF.match(str(ref)) is not None


def read_ref(ref: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The stack a journal reference names, and what is known about it: for a TIFF, the
    header it carries; for Zarr, its t, channel(s) and voxel size (the per-stack header
    is in the run's journal). Raises OSError/ValueError for what cannot be read."""
    match = _REF.match(str(ref))
    if match is None:
        return read_stack(ref)
    image = Path(match["image"])
    array = _open_array(image)
    attrs = _image_attrs(image)
    channels: list[str] = list(attrs["channels"])
    t = int(match["t"])
    if t >= array.shape[0]:
        raise StoreError(f"{image} holds {array.shape[0]} time points, not t={t}")
    info: dict[str, Any] = {"t": t, "voxel_size_um": attrs["voxel_size_um"], "source": str(ref)}
    if match["c"] is None:
        return np.asarray(array[t].read().result()), info | {"structures": channels}
    if match["c"] not in channels:
        raise StoreError(f"{image} has no channel {match['c']!r} (it has {', '.join(channels)})")
    c = channels.index(match["c"])
    return np.asarray(array[t, c].read().result()), info | {"channel": match["c"]}


def sibling_image(ref: str | Path, kind: str) -> Path:
    """The image of another kind (``RAW_IMAGE``, ``PREDICTION_IMAGE``) for the same
    position as a Zarr reference: ``p000/raw.ome.zarr`` <-> ``p000/prediction.ome.zarr``,
    or a plate's ``raw.ome.zarr/B/3/0`` <-> ``prediction.ome.zarr/B/3/0``."""
    match = _REF.match(str(ref))
    if match is None:
        raise StoreError(f"{ref} is not a reference into a livestain OME-Zarr image")
    image = Path(match["image"])
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in (RAW_IMAGE, PREDICTION_IMAGE):
            parts[i] = kind
            return Path(*parts)
    raise StoreError(f"{image} is neither a {RAW_IMAGE} nor a {PREDICTION_IMAGE} image")


def zarr_channels(image: Path) -> list[str]:
    """The channel names of a livestain OME-Zarr image ([] if it has none yet)."""
    try:
        return list(_image_attrs(image)["channels"])
    except StoreError:
        return []


def ref_file(ref: str | Path) -> Path | None:
    """The one file that holds the stack a reference names: the TIFF itself, or the Zarr
    chunk (a stack is one chunk); None where the reference cannot name one."""
    match = _REF.match(str(ref))
    if match is None:
        return Path(ref)
    image = Path(match["image"])
    try:
        channels: list[str] = list(_image_attrs(image)["channels"])
    except StoreError:
        return None
    if match["c"] is not None and match["c"] not in channels:
        return None
    c = channels.index(match["c"]) if match["c"] is not None else 0
    # zarr v3 default chunk keys: c<sep><t><sep><c><sep>0<sep>0<sep>0 (one chunk spans z, y, x)
    sep = _chunk_separator(image / "0")
    return image / "0" / sep.join(("c", str(int(match["t"])), str(c), "0", "0", "0"))


@lru_cache(maxsize=4096)
def _chunk_separator(array: Path) -> str:
    """The chunk key separator of a zarr v3 array: "." for livestain's images since
    2026-12-02 (every chunk in the array's own folder), "/" for earlier ones and the spec's
    default (a folder per time point, channel, z and y: four mkdirs per stack). Read once
    per array: it never changes after the array is created."""
    try:
        encoding = json.loads((array / "zarr.json").read_text()).get("chunk_key_encoding") or {}
    except (OSError, ValueError):
        return "/"
    return str((encoding.get("configuration") or {}).get("separator", "/"))


def ref_exists(ref: str | Path) -> bool:
    """Whether the stack a reference names is on disk (an unwritten Zarr chunk reads
    as zeros, so the chunk file itself is asked)."""
    path = ref_file(ref)
    return path is not None and path.is_file()


class RunStore(ABC):
    """Writes one run's raw stacks and predictions; each write returns the reference
    the journal records. Not thread-safe: the daemon's loop is its only writer."""

    kind: Storage

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    @abstractmethod
    def raw_ref(self, t: int, p: int, channel: str) -> str:
        """The reference a raw stack of (t, p, channel) has (or will have) in this store."""

    @abstractmethod
    def prediction_ref(self, t: int, p: int) -> str:
        """The reference the prediction of (t, p) has (or will have) in this store."""

    @abstractmethod
    def write_raw(self, t: int, p: int, channel: str, planes: np.ndarray, *, voxel_size_um: Sequence[float],
                  info: dict[str, Any], plane_positions_um: np.ndarray | None = None) -> str:
        """Store a ZYX stack of one channel; returns its reference."""

    @abstractmethod
    def write_prediction(self, t: int, p: int, array: np.ndarray, *, structures: Sequence[str],
                         voxel_size_um: Sequence[float], info: dict[str, Any]) -> str:
        """Store a CZYX prediction, one channel per structure; returns its reference."""

    def close(self) -> None:  # noqa: B027 - nothing to close for plain files
        """Release open handles (the data is already on disk)."""


class TiffStore(RunStore):
    """One OME-TIFF per stack (the header as JSON in its description): plain files."""

    kind: Storage = "tiff"

    def raw_path(self, t: int, p: int, channel: str) -> Path:
        return position_folder(self.out_dir, p) / f"t{t:04d}_{channel.lower() or 'raw'}.ome.tif"

    def prediction_path(self, t: int, p: int) -> Path:
        return position_folder(self.out_dir, p) / f"t{t:04d}_prediction.ome.tif"

    def raw_ref(self, t: int, p: int, channel: str) -> str:
        return str(self.raw_path(t, p, channel))

    def prediction_ref(self, t: int, p: int) -> str:
        return str(self.prediction_path(t, p))

    def write_raw(self, t, p, channel, planes, *, voxel_size_um, info, plane_positions_um=None) -> str:
        path = self.raw_path(t, p, channel)
        write_stack(path, planes, voxel_size_um=voxel_size_um, info=info, channel_names=[channel],
                    plane_positions_um=plane_positions_um)
        return str(path)

    def write_prediction(self, t, p, array, *, structures, voxel_size_um, info) -> str:
        path = self.prediction_path(t, p)
        write_stack(path, array, voxel_size_um=voxel_size_um, info=info, channel_names=list(structures))
        return str(path)


class ZarrStore(RunStore):
    """One NGFF image per position and kind, written chunk by chunk with tensorstore.

    ``timepoints`` sizes the arrays up front (so a viewer shows the planned length);
    ``interval_s`` is the time scale. ``compression`` is ``none`` or ``zstd``.
    """

    kind: Storage = "zarr"

    def __init__(self, out_dir: Path, *, timepoints: int = 1, interval_s: float = 0.0,
                 compression: Compression = "none", plate: PlateLayout | None = None) -> None:
        super().__init__(out_dir)
        self.timepoints = max(1, int(timepoints))
        self.interval_s = float(interval_s)
        self.compression = compression
        self.plate = plate
        self._arrays: dict[Path, Any] = {}
        self._attrs: dict[Path, dict[str, Any]] = {}  # livestain's metadata block per image
        self._plain: dict[Path, bool] = {}  # per image: chunks written as plain files (`_write_chunk`)
        if plate is not None:  # the plates' groups first: viewers open them before any image exists
            for name in (RAW_IMAGE, PREDICTION_IMAGE):
                plate.write(self.out_dir / name)

    def raw_image(self, p: int) -> Path:
        if self.plate is not None:
            return self.out_dir / RAW_IMAGE / self.plate.image_path(p)
        return position_folder(self.out_dir, p) / RAW_IMAGE

    def prediction_image(self, p: int) -> Path:
        if self.plate is not None:
            return self.out_dir / PREDICTION_IMAGE / self.plate.image_path(p)
        return position_folder(self.out_dir, p) / PREDICTION_IMAGE

    def raw_ref(self, t: int, p: int, channel: str) -> str:
        return f"{self.raw_image(p)}#t={t}&c={channel}"

    def prediction_ref(self, t: int, p: int) -> str:
        return f"{self.prediction_image(p)}#t={t}"

    def write_raw(self, t, p, channel, planes, *, voxel_size_um, info, plane_positions_um=None) -> str:
        image = self.raw_image(p)
        array, c = self._slot(image, t, [channel], planes, voxel_size_um, kind="raw")
        self._write_chunk(image, array, (t, c[0]), planes)
        return self.raw_ref(t, p, channel)

    def write_prediction(self, t, p, array, *, structures, voxel_size_um, info) -> str:
        image = self.prediction_image(p)
        if array.ndim != 4 or array.shape[0] != len(structures):
            raise StoreError(f"a prediction of shape {array.shape} does not have one channel per structure "
                             f"({', '.join(structures)})")
        stored, c = self._slot(image, t, list(structures), array[0], voxel_size_um, kind="prediction")
        if c != list(range(len(structures))):
            raise StoreError(f"{image} holds structures {_image_attrs(image)['channels']}; this prediction "
                             f"has {list(structures)}: write predictions of another model to a new run")
        self._write_chunk(image, stored, (t,), array)
        self._note_model(image, t, info or {})
        return self.prediction_ref(t, p)

    def _write_chunk(self, image: Path, array: Any, index: tuple[int, ...], data: np.ndarray) -> None:
        """Write one whole chunk (a stack, or a prediction with all its structures).

        Uncompressed chunks of our own flat layout are written as the file they are (the
        bytes codec: C order, little-endian) plane by plane, as the TIFF store does:
        tensorstore writes a chunk in one call, and the kernel throttles one large
        dirtying write (a 16 MB stack took 2.5x as long as the same bytes plane by plane).
        Compressed chunks and arrays from before the flat layout go through tensorstore.
        """
        data = np.asarray(data).astype(array.dtype.numpy_dtype, copy=False)
        chunk = self._plain_chunk_file(image, index)
        if chunk is None:
            _write(array[index], data, image)
        else:
            _write_whole_chunk(chunk, data)

    def _plain_chunk_file(self, image: Path, index: tuple[int, ...]) -> Path | None:
        """The file of the chunk at ``index`` (t[, c]) when the array stores chunks as plain
        bytes in its own folder; None otherwise."""
        plain = self._plain.get(image)
        if plain is None:
            plain = self._plain[image] = _plain_chunks(image / "0")
        if not plain:
            return None
        t, c = (*index, 0)[:2]
        return image / "0" / f"c.{t}.{c}.0.0.0"

    def _note_model(self, image: Path, t: int, info: dict[str, Any]) -> None:
        """Provenance in the image itself: each model that predicted into it, from which
        time point, on what (a viewer or script sees it without the journal). The
        metadata is rewritten only when a new model appears (a swap), not per stack."""
        model = info.get("model")
        attrs = self._attrs.get(image)
        if not model or attrs is None:
            return
        models: list[dict[str, Any]] = attrs.setdefault("models", [])
        if models and models[-1]["model"] == model:
            return
        models.append({"model": model, "from_t": t, "device": info.get("device"), "torch": info.get("torch"),
                       "livestain": (info.get("versions") or {}).get("livestain")})
        _write_image_metadata(image, attrs["channels"], attrs["voxel_size_um"], self.interval_s, "prediction",
                              np.dtype(np.float32), models=models)

    # -- arrays ---------------------------------------------------------------------

    def _slot(self, image: Path, t: int, channels: list[str], zyx: np.ndarray, voxel_size_um: Sequence[float],
              kind: str) -> tuple[Any, list[int]]:
        """The array of ``image`` grown to hold time point ``t`` and ``channels``, and
        the channels' indices; created on first use, reopened after a resume."""
        array = self._arrays.get(image)
        if array is None:
            array = _open_array(image) if (image / "zarr.json").exists() else \
                self._create(image, channels, zyx, voxel_size_um, kind)
        if tuple(array.shape[2:]) != tuple(zyx.shape):
            raise StoreError(
                f"a stack of shape {tuple(zyx.shape)} does not fit {image}, whose stacks are "
                f"{tuple(array.shape[2:])} (z, y, x): a run keeps one stack size per position "
                f"(use storage: tiff for plans whose z range or camera ROI changes)")
        # the daemon is the only writer: its image metadata is read once, not per stack
        attrs = self._attrs.get(image) or self._attrs.setdefault(image, _image_attrs(image))
        known: list[str] = attrs["channels"]
        new = [c for c in channels if c not in known]
        if new:
            known = attrs["channels"] = [*known, *new]
            _write_image_metadata(image, known, attrs["voxel_size_um"], self.interval_s, kind,
                                  np.dtype(array.dtype.numpy_dtype), models=attrs.get("models"))
        shape = [max(array.shape[0], t + 1), len(known), *array.shape[2:]]
        if shape != list(array.shape):
            array = array.resize(exclusive_max=shape, expand_only=True).result()
        self._arrays[image] = array
        return array, [known.index(c) for c in channels]

    def _create(self, image: Path, channels: list[str], zyx: np.ndarray, voxel_size_um: Sequence[float],
                kind: str) -> Any:
        import tensorstore as ts

        dtype = np.dtype(zyx.dtype if kind == "raw" else np.float32)
        n_c = len(channels)
        shape = [self.timepoints, n_c, *zyx.shape]
        # one write = one whole chunk: a raw stack of one channel, or a prediction with
        # all its structures (their number is fixed per image, `write_prediction`)
        chunk = [1, 1 if kind == "raw" else n_c, *zyx.shape]
        codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.compression == "zstd":  # blosc's bit shuffle first: camera noise lives in the low bits
            codecs.append({"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle",
                                                              "typesize": dtype.itemsize, "blocksize": 0}})
        image.mkdir(parents=True, exist_ok=True)
        _write_image_metadata(image, channels, [float(v) for v in voxel_size_um], self.interval_s, kind, dtype)
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(image / "0")},
            "metadata": {
                "shape": shape,
                "data_type": dtype.name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                "dimension_names": ["t", "c", "z", "y", "x"],
                # all chunks side by side in 0/ (c.<t>.<c>.0.0.0): the default "/" made four
                # nested folders per stack, a mkdir each, and their entries were never fsynced
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
                "codecs": codecs,
                "fill_value": 0,
            },
            "create": True,
            # a stack of zeros (every plane a gap) is still written: the chunk file is
            # how `ref_exists` knows the stack is on disk
            "store_data_equal_to_fill_value": True,
        }
        array = ts.open(spec).result()
        fsync_dir(image)
        return array

    def close(self) -> None:
        self._arrays.clear()
        self._attrs.clear()
        self._plain.clear()


def _write(target: Any, data: np.ndarray, image: Path) -> None:
    """Write and wait; tensorstore's errors (a full disk among them) as OSError."""
    try:
        target.write(data).result()
    except OSError:
        raise
    except Exception as e:  # tensorstore raises ValueError for I/O failures
        text = str(e)
        if "No space left" in text or "ENOSPC" in text:
            raise OSError(28, f"No space left on device (writing {image})") from None
        raise StoreError(f"could not write to {image}: {text}") from None


def _write_whole_chunk(path: Path, data: np.ndarray) -> None:
    """A chunk's bytes, plane by plane, written atomically (`stackio.atomic_file`). A full
    disk is the OSError it is."""
    planes = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    with atomic_file(path) as fh:
        for plane in planes.reshape(-1, *planes.shape[-2:]):
            fh.write(memoryview(plane).cast("B"))


def _plain_chunks(array: Path) -> bool:
    """Whether a zarr v3 array stores each chunk as its raw bytes (only the bytes codec,
    little-endian) in its own folder (separator ".")."""
    try:
        meta = json.loads((array / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    codecs = meta.get("codecs") or []
    little = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return codecs == little and _chunk_separator(array) == "."


def _open_array(image: Path) -> Any:
    import tensorstore as ts

    if not (image / "0" / "zarr.json").exists():
        raise StoreError(f"{image} is not a livestain OME-Zarr image (no 0/zarr.json)")
    try:
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(image / "0")},
                        "store_data_equal_to_fill_value": True}, open=True).result()
    except Exception as e:
        raise StoreError(f"cannot open {image}: {e}") from None


def _image_attrs(image: Path) -> dict[str, Any]:
    """livestain's own attributes of an image: channels, voxel size, kind."""
    try:
        meta = json.loads((image / "zarr.json").read_text())
        return meta["attributes"]["livestain"]
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"{image}/zarr.json is missing or damaged ({e}); the chunks are intact, "
                         "`livestain audit` lists them") from None


def image_metadata(channels: list[str], voxel_size_um: Sequence[float], interval_s: float, kind: str,
                   dtype: np.dtype) -> dict[str, Any]:
    """The group ``zarr.json`` of an image: NGFF 0.5 ``multiscales`` and ``omero``
    (channel names and colours napari and Fiji show) built with yaozarrs' models, so an
    invalid one fails here rather than in a viewer, plus livestain's own block."""
    from yaozarrs import v05

    z, y, x = (float(v) for v in voxel_size_um)
    axes = [v05.TimeAxis(name="t", unit="second"), v05.ChannelAxis(name="c"),
            *(v05.SpaceAxis(name=n, unit="micrometer") for n in "zyx")]
    multiscale = v05.Multiscale(
        name=kind, axes=axes,
        datasets=[v05.Dataset(path="0", coordinateTransformations=[
            v05.ScaleTransformation(scale=[interval_s or 1.0, 1.0, z, y, x])])],
    )
    if kind == "raw":
        window = {"start": 0.0, "end": float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0,
                  "min": 0.0, "max": float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0}
        colors = ["FFFFFF" if c.lower() in ("brightfield", "bf", "raw") else hex_color(c) for c in channels]
    else:  # z-scored predictions: about -1..4
        window = {"start": -1.0, "end": 4.0, "min": -10.0, "max": 10.0}
        colors = [hex_color(c) for c in channels]
    omero = v05.Omero(channels=[
        v05.OmeroChannel(label=c, color=col, window=v05.OmeroWindow(**window), active=True)
        for c, col in zip(channels, colors)
    ])
    ome = v05.Image(multiscales=[multiscale], omero=omero)
    return {
        "zarr_format": 3, "node_type": "group",
        "attributes": {
            "ome": ome.model_dump(mode="json", exclude_none=True, by_alias=True),
            "livestain": {"kind": kind, "channels": channels, "voxel_size_um": [z, y, x]},
        },
    }


def _write_image_metadata(image: Path, channels: list[str], voxel_size_um: Sequence[float], interval_s: float,
                          kind: str, dtype: np.dtype, models: list[dict[str, Any]] | None = None) -> None:
    """Replace the group metadata atomically (temporary file, fsync, rename)."""
    meta = image_metadata(channels, voxel_size_um, interval_s, kind, dtype)
    if models:
        meta["attributes"]["livestain"]["models"] = models
    with atomic_file(image / "zarr.json") as fh:
        fh.write(json.dumps(meta, indent=1).encode())


def open_store(out_dir: Path, storage: Storage = "zarr", *, timepoints: int = 1, interval_s: float = 0.0,
               compression: Compression = "none", plate: PlateLayout | None = None) -> RunStore:
    """The store a run writes through (``storage`` from the run's policies); a Zarr run
    whose positions name their wells is stored as HCS plates (``plate``)."""
    if storage == "tiff":
        return TiffStore(out_dir)
    if storage == "zarr":
        return ZarrStore(out_dir, timepoints=timepoints, interval_s=interval_s, compression=compression,
                         plate=plate)
    raise ValueError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")


def storage_of(out_dir: Path) -> Storage | None:
    """What an existing run folder holds: ``zarr`` if any position has a Zarr image,
    ``tiff`` if it has OME-TIFF stacks, None for an empty folder."""
    out_dir = Path(out_dir)
    if any(out_dir.glob(f"p[0-9][0-9][0-9]/{RAW_IMAGE}")) or (out_dir / RAW_IMAGE / "zarr.json").is_file():
        return "zarr"
    if any(out_dir.glob("p[0-9][0-9][0-9]/t*_*.ome.tif")):
        return "tiff"
    return None

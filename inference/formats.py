"""Image files users bring: what livestain reads, and the voxel size each format carries.

``livestain predict``, ``train`` and ``evaluate`` read any of these (one z-stack of one
channel each; `read_image` gives the array, `voxel_size` the (z, y, x) size in um):

``NAME.ome.tif`` / ``NAME.ome.tiff``
    OME-TIFF (what livestain writes): voxel size from PhysicalSizeZ/Y/X.
``NAME.tif`` / ``NAME.tiff``
    ImageJ/Fiji TIFF: voxel size from its calibration (Image > Properties: ``spacing``
    for z, the X/YResolution tags in its ``unit`` for y, x). A plain TIFF without
    calibration needs ``--voxel-size Z,Y,X``. A TIFF carrying OME-XML is read as OME-TIFF.
``NAME.png`` or a folder ``NAME/`` of PNG planes
    One grayscale (8- or 16-bit) plane per file; a folder's planes are its ``*.png``
    files in natural order of their names (``z000.png, z001.png, ...`` or ``z1.png ...
    z10.png``): plane k of the stack is the k-th. PNG has no physical size: give
    ``--voxel-size Z,Y,X``.
``NAME.zarr`` / ``NAME.ome.zarr``
    OME-Zarr (NGFF 0.4 with zarr v2, or 0.5 with zarr v3), read with tensorstore: the
    first multiscales image at its full resolution (``datasets[0]``); voxel size from
    its ``scale`` transformations (times the multiscales-wide one, if any) in the axes'
    units. Axes other than z, y, x (t, c) must have length 1.

An explicit ``--voxel-size`` wins over any file's own. Anything else is refused with
a `FormatError` listing these formats. The checks every array then passes (grayscale,
finite, large enough) are `livestain.stackio.validate_stack`'s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from livestain.stackio import StackError, read_stack, voxel_size_of
from livestain.store import is_zarr_ref, read_ref

ACCEPTED = (
    "OME-TIFF (.ome.tif, .ome.tiff), ImageJ/Fiji TIFF with its calibration (.tif, .tiff), "
    "plain TIFF with --voxel-size, PNG (one .png plane, or a folder of .png z-planes named "
    "in order such as z000.png, z001.png) with --voxel-size, and OME-Zarr (.zarr, .ome.zarr; "
    "NGFF 0.4 or 0.5)"
)

#: Suffixes, longest first, so ``x.ome.tif`` is OME-TIFF and not plain TIFF.
_SUFFIXES = (
    (".ome.tiff", "ome-tiff"),
    (".ome.tif", "ome-tiff"),
    (".ome.zarr", "ome-zarr"),
    (".tiff", "tiff"),
    (".tif", "tiff"),
    (".zarr", "ome-zarr"),
    (".png", "png"),
)

#: Lengths in um per unit, for ImageJ's ``unit`` and NGFF's axis ``unit``.
_UM_PER = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "micrometers": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "nanometers": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6,
    "in": 25400.0, "inch": 25400.0,
}

VOXEL_HINT = "give it with --voxel-size Z,Y,X in um (e.g. --voxel-size 1,0.325,0.325; predict, train and evaluate take it)"


class FormatError(StackError):
    """A file in a format livestain does not read, or lacking what it needs (a ValueError)."""


def kind_of(path: str | Path) -> str | None:
    """``ome-tiff``, ``tiff``, ``png``, ``png-planes`` or ``ome-zarr`` for a path livestain
    reads, else None (not an image: a note, a ``.partial`` file, an unknown format)."""
    p = Path(path)
    name = p.name.lower()
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            if kind == "ome-zarr":
                return kind if p.is_dir() else None
            return kind if p.is_file() else None
    if p.is_dir():
        if (p / ".zattrs").is_file() or (p / "zarr.json").is_file():
            return "ome-zarr"
        if any(f.suffix.lower() == ".png" for f in p.iterdir() if f.is_file()):
            return "png-planes"
    return None


def channel_name(path: str | Path) -> str | None:
    """The channel (structure) a file or folder holds: its name without the format's
    suffix (``dna.ome.tif`` -> ``dna``, ``brightfield/`` of PNG planes -> ``brightfield``),
    or None when livestain does not read it."""
    kind = kind_of(path)
    if kind is None:
        return None
    name = Path(path).name
    for suffix, _ in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def unknown_format(path: str | Path, what: str = "image") -> FormatError:
    """The error for a path in no format livestain reads."""
    p = Path(path)
    found = "a folder with no .png planes or OME-Zarr metadata" if p.is_dir() else f"a {p.suffix or 'suffix-less'} file"
    return FormatError(
        f"{p} is {found}, not an {what} format livestain reads; accepted: {ACCEPTED}. "
        "Convert it, e.g. Fiji: File > Save As > Tiff (keeps the calibration)"
    )


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The pixels of one image file or folder as stored, and livestain's header (OME-TIFF
    written by livestain) or ``{"format": kind}``. `FormatError`/`StackError` otherwise."""
    p = Path(path)
    if is_zarr_ref(p):  # one stack of a livestain run stored as OME-Zarr
        return read_ref(p)
    kind = kind_of(p)
    if kind is None:
        raise unknown_format(p)
    if kind in ("ome-tiff", "tiff"):
        array, info = read_stack(p)
        if kind == "tiff":
            _check_imagej_axes(p)
        return array, info or {"format": kind}
    if kind == "png":
        return _read_png(p)[None], {"format": kind}
    if kind == "png-planes":
        planes = png_planes(p)
        arrays = [_read_png(f) for f in planes]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1 or len({a.dtype for a in arrays}) > 1:
            raise FormatError(
                f"the PNG planes in {p} differ in size or bit depth ({', '.join(sorted(map(str, shapes)))}); "
                "every plane of a stack must have the same size and bit depth"
            )
        return np.stack(arrays), {"format": kind, "planes": [f.name for f in planes]}
    return _read_zarr(p)[0], {"format": kind}


def voxel_size(path: str | Path) -> tuple[float, float, float]:
    """(z, y, x) voxel size in um from the file's own metadata, or a ValueError saying how
    to give it. Guessing is worse than failing: the predictor resamples data to the
    model's voxel size, so a wrong one silently rescales every prediction."""
    p = Path(path)
    if is_zarr_ref(p):
        z, y, x = read_ref(p)[1]["voxel_size_um"]
        return float(z), float(y), float(x)
    kind = kind_of(p)
    if kind is None:
        raise unknown_format(p)
    if kind in ("png", "png-planes"):
        raise FormatError(f"{p} is PNG, which stores no physical pixel size; {VOXEL_HINT}")
    if kind == "ome-zarr":
        return _read_zarr(p, pixels=False)[1]
    try:
        return voxel_size_of(p)
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    imagej = _imagej_voxel_size(p)
    if imagej is not None:
        return imagej
    raise FormatError(
        f"{p} has no OME metadata with a physical voxel size (nor an ImageJ calibration with "
        f"z spacing and a length unit): {VOXEL_HINT}, or save it calibrated: Fiji: Image > "
        "Properties (Voxel depth, Pixel width/height, unit micron), then File > Save As > Tiff; "
        "or as OME-TIFF with PhysicalSizeZ/Y/X (livestain.stackio.write_stack)"
    )


# ------------------------------------------------------------------ TIFF (ImageJ)


def _check_imagej_axes(path: Path) -> None:
    """Refuse an ImageJ hyperstack with several channels or time points: its leading
    axis would otherwise be taken for z."""
    with tifffile.TiffFile(path) as tif:
        meta = tif.imagej_metadata or {}
    channels, frames = int(meta.get("channels", 1) or 1), int(meta.get("frames", 1) or 1)
    if channels > 1 or frames > 1:
        raise FormatError(
            f"{path} is an ImageJ hyperstack with {channels} channel(s) and {frames} time point(s); "
            "livestain reads one channel of one time point per file: split it (Fiji: Image > Color > "
            "Split Channels, Image > Duplicate for one frame), or if the planes are really z-slices "
            "fix the dimensions in Image > Properties (Slices)"
        )


def _um_per(unit: Any) -> float | None:
    if not isinstance(unit, str):
        return None
    return _UM_PER.get(unit.strip().lower().replace("micro ", "micro"))


def _imagej_voxel_size(path: Path) -> tuple[float, float, float] | None:
    """(z, y, x) from an ImageJ TIFF's calibration, or None when it has no full one.

    ImageJ stores x/y as pixels per ``unit`` in the X/YResolution tags (the TIFF
    ResolutionUnit tag, inch or centimetre, only counts without a ``unit``) and z as
    ``spacing`` in the same unit."""
    with tifffile.TiffFile(path) as tif:
        meta = tif.imagej_metadata
        page = tif.pages[0]
        try:
            xres, yres = (float(v) for v in page.resolution)
        except (TypeError, ValueError, AttributeError):
            return None
        tag_unit = {2: "inch", 3: "cm"}.get(int(page.resolutionunit or 1))
    if not meta:
        return None
    scale = _um_per(meta.get("unit")) if meta.get("unit") else _um_per(tag_unit)
    spacing = meta.get("spacing")
    if scale is None or spacing is None or xres <= 0 or yres <= 0 or float(spacing) <= 0:
        return None
    return float(spacing) * scale, scale / yres, scale / xres


# ------------------------------------------------------------------ PNG


def png_planes(folder: Path) -> list[Path]:
    """A folder's ``*.png`` files in natural order (``z2`` before ``z10``)."""

    def natural(p: Path) -> list[Any]:
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]

    return sorted((f for f in folder.iterdir() if f.is_file() and f.suffix.lower() == ".png"), key=natural)


def _read_png(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise FormatError(f"reading {path} needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                return np.array(im)
    except OSError as e:
        raise FormatError(f"{path} is not a PNG livestain can read ({e}); re-export it, as PNG or "
                          f"one of: {ACCEPTED}") from None
    raise FormatError(
        f"{path} is a {mode} PNG (colour or palette); livestain needs grayscale planes (one "
        "intensity per pixel): save them as 8- or 16-bit grayscale, e.g. Fiji: Image > Type > 16-bit"
    )


# ------------------------------------------------------------------ OME-Zarr


def _zarr_attrs(root: Path) -> tuple[dict[str, Any], str]:
    """The OME attributes of an OME-Zarr group and its zarr driver (``zarr``: v2, ``zarr3``)."""
    v3 = root / "zarr.json"
    try:
        if v3.is_file():
            attrs = json.loads(v3.read_text()).get("attributes", {})
            return attrs.get("ome", attrs), "zarr3"  # NGFF 0.5 nests under "ome"
        return json.loads((root / ".zattrs").read_text()), "zarr"
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{root} has no readable OME-Zarr group metadata ({e}); {ACCEPTED}") from None


def _read_zarr(root: Path, pixels: bool = True) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Full-resolution pixels (z, y, x) and the voxel size of an NGFF image."""
    attrs, driver = _zarr_attrs(root)
    multiscales = attrs.get("multiscales")
    if not multiscales:
        raise FormatError(
            f"{root} is a zarr group without NGFF 'multiscales' metadata (an OME-Zarr image has it); "
            "write it as OME-Zarr (e.g. ome-zarr-py, napari's ome-zarr writer, bioformats2raw), "
            f"or convert it to one of: {ACCEPTED}"
        )
    ms = multiscales[0]
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", ("t", "c", "z", "y", "x")[-5:])]
    names = [str(a.get("name", "")).lower() for a in axes]
    level = ms["datasets"][0]
    scale = np.ones(len(axes))
    for transforms in (level.get("coordinateTransformations", []), ms.get("coordinateTransformations", [])):
        for t in transforms:
            if t.get("type") == "scale":
                scale = scale * np.asarray(t["scale"], float)
    if "y" not in names or "x" not in names:
        raise FormatError(f"{root} has axes {names}; an image needs y and x axes")
    spatial = {}
    for name in ("z", "y", "x"):
        if name in names:
            i = names.index(name)
            unit = axes[i].get("unit")
            per = _um_per(unit) if unit else None
            spatial[name] = None if per is None else float(scale[i]) * per
    if any(v is None for v in spatial.values()) or "z" not in spatial:
        units = {a.get("name"): a.get("unit") for a in axes}
        vox: tuple[float, float, float] | None = None
        problem = (f"its axes have no length unit ({units})" if "z" in spatial
                   else f"it has no z axis ({names})")
    else:
        vox = (spatial["z"], spatial["y"], spatial["x"])
        problem = ""
    if not pixels:
        if vox is None:
            raise FormatError(f"{root} has no physical voxel size: {problem}; {VOXEL_HINT}")
        return np.empty(0), vox
    try:
        import tensorstore as ts
    except ImportError:
        raise FormatError(f"reading the OME-Zarr image {root} needs tensorstore: pip install tensorstore") from None
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(root / level["path"])}}
    try:
        array = np.asarray(ts.open(spec, open=True, read=True).result().read().result())
    except Exception as e:  # tensorstore raises ValueError/its own errors for missing chunks, codecs
        raise FormatError(f"{root}/{level['path']} cannot be read as a zarr array ({e}); re-export it") from None
    if array.ndim != len(names):
        raise FormatError(f"{root}: the array has {array.ndim} axes but the metadata names {len(names)} ({names})")
    extra = [(n, s) for n, s in zip(names, array.shape) if n not in ("z", "y", "x") and s != 1]
    if extra:
        raise FormatError(
            f"{root} has {', '.join(f'{n}={s}' for n, s in extra)}; livestain reads one channel of one time "
            "point per image: write each channel (and time point) as its own OME-Zarr image"
        )
    keep = [names.index(n) for n in ("z", "y", "x") if n in names]
    drop = tuple(i for i in range(array.ndim) if i not in keep)
    array = np.squeeze(array, axis=drop) if drop else array
    array = np.transpose(array, np.argsort(np.argsort(keep)))  # z, y, x in this order
    return (array if "z" in names else array[None]), vox or (0.0, 0.0, 0.0)

"""napari opens a livestain run: ``napari OUT`` (or one ``OUT/p000/raw.ome.zarr``, or a
multi-well run's plate field ``OUT/raw.ome.zarr/B/3/0``).

Contributed through the npe2 manifest ``livestain/napari.yaml``. Each position becomes
its raw channels (grey brightfield) and its predicted structures (in the window's
colours, additive over the brightfield), with the physical scale of every axis, read
lazily from the OME-Zarr images the run wrote (`livestain.store`), so a run of days
opens at once. Plain NGFF readers (napari-ome-zarr, Fiji's BioFormats) open the same
images too; this reader adds the grouping by run and the structures' colours.

Nothing here imports napari: the reader returns napari's layer-data tuples, so it is
tested without a display or napari installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from livestain.colors import structure_color
from livestain.plate import PlateLayout
from livestain.store import PREDICTION_IMAGE, RAW_IMAGE

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's reader hook: a reader for a livestain run or image, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_run if livestain_images(Path(path)) else None


def livestain_images(path: Path) -> list[Path]:
    """The livestain OME-Zarr images ``path`` is or holds (a run folder: every
    position's raw and prediction images), in position order."""
    if _livestain_attrs(path) is not None:
        return [path]
    if not path.is_dir():
        return []
    plate = PlateLayout.read(path / RAW_IMAGE)
    if plate is not None:  # a multi-well run: its plates' fields, in plan order
        images = [path / name / plate.image_path(p) for p in sorted(plate.fields)
                  for name in (RAW_IMAGE, PREDICTION_IMAGE)]
        return [image for image in images if _livestain_attrs(image) is not None]
    found = []
    for position in sorted(path.glob("p[0-9][0-9][0-9]")):
        found += [image for image in (position / RAW_IMAGE, position / PREDICTION_IMAGE)
                  if _livestain_attrs(image) is not None]
    return found


def read_run(path: str | list[str]) -> list[LayerData]:
    """One image layer per channel and structure of every position (lazy arrays)."""
    if isinstance(path, list):
        path = path[0]
    layers = []
    for image in livestain_images(Path(path)):
        layers.append(image_layer(image))
    return layers


def image_layer(image: Path) -> LayerData:
    """The layer data of one image, split along its channel axis (one napari layer per
    channel or structure)."""
    import dask.array as da
    import zarr

    meta = json.loads((image / "zarr.json").read_text())["attributes"]
    attrs = meta["livestain"]
    scale_tczyx = meta["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    array = da.from_zarr(zarr.open_array(str(image / "0"), mode="r"))
    channels: list[str] = list(attrs["channels"])
    position = _position_label(image)
    raw = attrs["kind"] == "raw"
    names = [f"{position} {c}" for c in channels]
    colormaps: list[Any] = []
    for c in channels:
        if raw and c.lower() in ("brightfield", "bf", "raw", ""):
            colormaps.append("gray")
        else:
            r, g, b = (v / 255 for v in structure_color(c))
            # napari builds a Colormap from a dict with "colors" (a (name, list) tuple
            # would need napari's own Colormap class, which this module does not import)
            colormaps.append({"name": f"livestain {c}", "colors": [[0.0, 0.0, 0.0, 1.0], [r, g, b, 1.0]]})
    kwargs: dict[str, Any] = {
        "name": names,
        "channel_axis": 1,
        "scale": [scale_tczyx[0], *scale_tczyx[2:]],
        "axis_labels": ["t", "z", "y", "x"],
        "units": ["second", "micrometer", "micrometer", "micrometer"],
        "colormap": colormaps,
        "blending": ["translucent_no_depth" if raw else "additive"] * len(channels),
        "metadata": {"livestain": attrs, "source": str(image)},
    }
    if not raw:  # z-scored structures: background ~0, objects 1-4
        kwargs["contrast_limits"] = [[0.0, 4.0]] * len(channels)
    return array, kwargs, "image"


def _position_label(image: Path) -> str:
    """``p003`` for a position's image, ``B3 field 1`` for a plate's field."""
    if image.parent.parent.parent.name in (RAW_IMAGE, PREDICTION_IMAGE):
        return f"{image.parent.parent.name}{image.parent.name} field {image.name}"
    return image.parent.name


def _livestain_attrs(image: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((image / "zarr.json").read_text())
        return meta["attributes"]["livestain"]
    except (OSError, ValueError, KeyError, TypeError):
        return None

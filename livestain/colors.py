"""Colours per predicted structure, the same in the window, in files and in napari.

Known structures get fixed colours so that the same structure looks the same across
runs, models and screenshots; any other name gets a colour derived from a hash of
the name, so it is stable between sessions too (Python's ``hash`` is salted, so it is
not used). Kept in the kernel because the run store writes them into the OME-Zarr
rendering metadata that napari and Fiji read, and the window uses the same table.
"""

from __future__ import annotations

import colorsys
import zlib

RGB = tuple[int, int, int]

#: Fixed colours of the structures the shipped models predict.
STRUCTURE_COLORS: dict[str, RGB] = {
    "dna": (40, 110, 255),
    "membrane": (255, 0, 200),
    "mitochondria": (180, 255, 0),
}


def structure_color(name: str) -> RGB:
    """RGB colour (0..255) of a structure: fixed if known, else derived from the name."""
    known = STRUCTURE_COLORS.get(name.lower())
    if known is not None:
        return known
    hue = (zlib.crc32(name.encode()) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255))


def hex_color(name: str) -> str:
    """``RRGGBB`` of a structure (the form OME-Zarr's omero channels take)."""
    return "".join(f"{v:02X}" for v in structure_color(name))

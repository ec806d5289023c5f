"""Overlay colours per predicted structure.

Known structures get fixed colours so that the same structure looks the same across
runs, models and screenshots; any other name gets a colour derived from a hash of
the name, so it is stable between sessions too (Python's ``hash`` is salted, so it is
not used).
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

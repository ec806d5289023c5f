"""Overlay colours per predicted structure: the kernel's table (`livestain.colors`),
so the window, the OME-Zarr rendering metadata and napari agree."""

from __future__ import annotations

from livestain.colors import RGB, STRUCTURE_COLORS, structure_color

__all__ = ["RGB", "STRUCTURE_COLORS", "structure_color"]

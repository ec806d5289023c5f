"""A multi-well run stored as HCS plates: ``raw.ome.zarr`` and ``prediction.ome.zarr``,
each an NGFF 0.5 plate whose wells hold one image per field of view.

When every position of a plan names its well (useq's `WellPlatePlan` sets
``plate_row``/``plate_col`` on each position it makes), the Zarr store lays the run out
as the field's viewers expect a plate (napari-ome-zarr, Fiji's BioFormats, iohub)::

    OUT/raw.ome.zarr/            plate: rows, columns, wells (NGFF 0.5, yaozarrs models)
        A/1/0, A/1/1, B/3/0 ...  one TCZYX image per field (as p000/raw.ome.zarr otherwise)
    OUT/prediction.ome.zarr/     the same plate of predictions

The plate group also records which plan position each field is (``livestain.positions``),
so a reader maps ``p`` to its image without the plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import useq

from livestain.stackio import fsync_dir


def row_name(index: int) -> str:
    """Zero-based row index -> plate row name: A ... Z, AA, AB ..."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("A") + rest) + name
    return name


@dataclass(frozen=True)
class PlateLayout:
    """Where each plan position lies on the plate: ``p -> (row, column, field)``."""

    fields: dict[int, tuple[str, str, int]]
    name: str = "plate"

    @classmethod
    def from_sequence(cls, sequence: useq.MDASequence) -> PlateLayout | None:
        """The plan's plate layout, or None unless every position names its well."""
        positions = list(sequence.stage_positions)
        if not positions or any(getattr(pos, "plate_row", None) is None or getattr(pos, "plate_col", None) is None
                                for pos in positions):
            return None
        fields: dict[int, tuple[str, str, int]] = {}
        per_well: dict[tuple[str, str], int] = {}
        for p, pos in enumerate(positions):
            well = (row_name(int(pos.plate_row)), str(int(pos.plate_col) + 1))
            fields[p] = (*well, per_well.get(well, 0))
            per_well[well] = per_well.get(well, 0) + 1
        plan = sequence.stage_positions
        name = getattr(getattr(plan, "plate", None), "name", None) or "plate"
        return cls(fields, str(name))

    @classmethod
    def read(cls, plate_dir: Path) -> PlateLayout | None:
        """The layout a plate group records (None: not a livestain plate)."""
        try:
            attrs = json.loads((plate_dir / "zarr.json").read_text())["attributes"]
            positions = attrs["livestain"]["positions"]
            name = attrs["ome"]["plate"].get("name") or "plate"
        except (OSError, ValueError, KeyError, TypeError):
            return None
        fields = {}
        for p, path in positions.items():
            row, col, field = path.split("/")
            fields[int(p)] = (row, col, int(field))
        return cls(fields, name)

    def image_path(self, p: int) -> str:
        """``row/column/field`` of position ``p`` inside the plate."""
        try:
            row, col, field = self.fields[p]
        except KeyError:
            raise ValueError(f"position {p} is not on the plate ({len(self.fields)} fields)") from None
        return f"{row}/{col}/{field}"

    def label(self, p: int) -> str:
        """How a viewer names the position: ``B3 field 1``."""
        row, col, field = self.fields[p]
        return f"{row}{col} field {field}"

    def metadata(self) -> dict[str, Any]:
        """The plate group's ``zarr.json``, built and checked with yaozarrs' models."""
        from yaozarrs import v05

        rows = sorted({r for r, _, _ in self.fields.values()}, key=lambda r: (len(r), r))
        cols = sorted({c for _, c, _ in self.fields.values()}, key=int)
        wells = sorted({(r, c) for r, c, _ in self.fields.values()}, key=lambda w: (rows.index(w[0]), cols.index(w[1])))
        per_well = max(sum(1 for r, c, _ in self.fields.values() if (r, c) == w) for w in wells)
        plate = v05.Plate(plate=v05.PlateDef(
            name=self.name, field_count=per_well,
            rows=[v05.Row(name=r) for r in rows], columns=[v05.Column(name=c) for c in cols],
            wells=[v05.PlateWell(path=f"{r}/{c}", rowIndex=rows.index(r), columnIndex=cols.index(c))
                   for r, c in wells]))
        return {"zarr_format": 3, "node_type": "group", "attributes": {
            "ome": plate.model_dump(mode="json", exclude_none=True, by_alias=True),
            "livestain": {"positions": {str(p): self.image_path(p) for p in sorted(self.fields)}}}}

    def write(self, plate_dir: Path) -> None:
        """The plate, row and well groups (an image is written by the store when its first
        stack comes); idempotent, so a resumed run rewrites the same files."""
        from yaozarrs import v05

        plate_dir.mkdir(parents=True, exist_ok=True)
        _write_group(plate_dir, self.metadata())
        wells: dict[tuple[str, str], list[int]] = {}
        for row, col, field in self.fields.values():
            wells.setdefault((row, col), []).append(field)
        for (row, col), fields in wells.items():
            (plate_dir / row).mkdir(exist_ok=True)
            _write_group(plate_dir / row, {"zarr_format": 3, "node_type": "group", "attributes": {}})
            well = v05.Well(well=v05.WellDef(images=[v05.FieldOfView(path=str(f)) for f in sorted(fields)]))
            (plate_dir / row / col).mkdir(exist_ok=True)
            _write_group(plate_dir / row / col, {"zarr_format": 3, "node_type": "group", "attributes": {
                "ome": well.model_dump(mode="json", exclude_none=True, by_alias=True)}})


def _write_group(folder: Path, metadata: dict[str, Any]) -> None:
    """A group's zarr.json, atomically (temporary file, fsync, rename, fsync the folder)."""
    partial = folder / "zarr.json.partial"
    with open(partial, "w") as fh:
        fh.write(json.dumps(metadata, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, folder / "zarr.json")
    fsync_dir(folder)

"""Paired training data on disk: one folder per field, one OME-TIFF per channel.

Layout (what ``write_pairs`` and a future ``livestain simulate`` write)::

    DIR/field000/brightfield.ome.tif   ZYX, the unlabelled input (any dtype, usually uint16)
    DIR/field000/dna.ome.tif           ZYX, one file per structure, the fluorescence truth
    DIR/field000/membrane.ome.tif
    DIR/field001/...

Other formats are read too (`livestain.inference.formats`: ImageJ/plain TIFF, PNG
planes, OME-Zarr): a channel is any file or folder whose name less the format's suffix
is the channel's name (``field000/brightfield.tif``, ``field000/dna/z000.png ...``,
``field000/membrane.ome.zarr``). Structure names match their usual aliases
(`livestain.inference.structures`: ``dapi`` files serve ``--structures dna``).

A structure file may also be a single plane (YX) beside a ZYX brightfield stack: the
truth of a 2.5D model (one fluorescence image per field, or a projection). Such a
field's ``targets`` are then (s, y, x); every structure of a field must be of one kind.

One file per channel (rather than one CZYX file per field) lets a user add or drop a
structure by copying files, and each file opens on its own in Fiji or napari with its
physical voxel size. Loading checks what training would otherwise trip over much later
and less clearly: an empty folder, a field missing a structure, a target whose shape
differs from its brightfield stack, and (`livestain.stackio.validate_stack`) a damaged
or colour file, NaN voxels or a stack too small to learn from.

Imports nothing from ``livestain.devices``: pairs are duck-typed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from livestain.run_reader import RunReader
from livestain.stackio import MIN_YX, as_zyx, validate_stack, write_stack
from livestain.store import ref_file, storage_of

from . import formats
from .structures import find as find_structure

BRIGHTFIELD = "brightfield"
SUFFIX = ".ome.tif"
FIELD_GLOB = "field*"


class PairLike(Protocol):
    """What `write_pairs` needs of a pair (`livestain.devices.pairs.Pair` is one)."""

    brightfield: np.ndarray
    targets: np.ndarray
    structures: Sequence[str]
    voxel_size_um: Sequence[float]


@dataclass
class Field:
    """One field of view loaded for training or evaluation.

    Attributes
    ----------
    name : str
        Folder name (``field000``).
    brightfield : np.ndarray
        (z, y, x) input stack as stored.
    targets : np.ndarray
        (s, z, y, x) float32 truth, in the order of ``structures``; (s, y, x) when the
        truth files are single planes beside a multi-plane brightfield stack (2.5D).
    structures : tuple[str, ...]
        Names of the target channels.
    voxel_size_um : tuple[float, float, float]
        (z, y, x) from the brightfield file's OME metadata.
    """

    name: str
    brightfield: np.ndarray
    targets: np.ndarray
    structures: tuple[str, ...]
    voxel_size_um: tuple[float, float, float]

    @property
    def planar(self) -> bool:
        """True when the truth is one plane per structure (for 2.5D models)."""
        return self.targets.ndim == 3

    def as_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """``(brightfield, targets)``, the form `inference.train.train` takes."""
        return self.brightfield, self.targets


LAYOUT_HINT = (
    "expected DIR/field000/brightfield.ome.tif plus one DIR/field000/<structure>.ome.tif "
    "per structure (ZYX each), as written by `livestain simulate` or "
    "`livestain.inference.dataset.write_pairs`, or a livestain run in paired mode "
    "(DIR/p000/t0000_brightfield.ome.tif + DIR/p000/t0000_<structure>.ome.tif); "
    f"each channel may also be in another format: {formats.ACCEPTED}"
)


def write_pairs(pairs: Iterable[PairLike], out_dir: str | Path, start: int = 0) -> list[Path]:
    """Write pairs as ``out_dir/fieldNNN/{brightfield,<structure>}.ome.tif``; returns the field folders.

    Targets are (s, z, y, x) stacks or (s, y, x) single planes (written as YX files).

    ``start`` numbers the first field, so a dataset can be extended. Refuses to
    overwrite an existing field folder (training data silently replaced is worse than
    an error).
    """
    out = Path(out_dir)
    written = []
    for i, pair in enumerate(pairs, start=start):
        field = out / f"field{i:03d}"
        if field.exists():
            raise FileExistsError(
                f"{field} already exists; write to an empty folder or pass start= past the last field"
            )
        bf = np.asarray(pair.brightfield)
        targets = np.asarray(pair.targets)
        structures = tuple(pair.structures)
        planar = bf.ndim == 3 and targets.shape == (len(structures), *bf.shape[1:])
        if bf.ndim != 3 or (targets.shape != (len(structures), *bf.shape) and not planar):
            raise ValueError(
                f"pair {i}: brightfield {bf.shape} and targets {targets.shape} do not match "
                f"{len(structures)} structures {structures}; targets must be (s, z, y, x) "
                "with the brightfield's (z, y, x), or (s, y, x) single planes (2.5D)"
            )
        vox = tuple(float(v) for v in pair.voxel_size_um)
        info: dict[str, Any] = {"kind": BRIGHTFIELD, "field": field.name, "structures": list(structures)}
        tile = getattr(pair, "tile", None)
        if tile is not None:
            info["tile"] = list(tile)
        write_stack(field / f"{BRIGHTFIELD}{SUFFIX}", bf, voxel_size_um=vox, info=info)
        for name, target in zip(structures, targets):
            write_stack(
                field / f"{name}{SUFFIX}",
                np.asarray(target, np.float32)[None] if planar else np.asarray(target, np.float32),
                voxel_size_um=vox,
                info={**info, "kind": "target", "structure": name},
            )
        written.append(field)
    return written


def field_files(data_dir: str | Path) -> list[tuple[str, dict[str, Path]]]:
    """Every field of a dataset as ``(name, {channel: file})``, sorted by name.

    Two layouts are read:

    * a paired dataset (``DIR/field000/<channel>.ome.tif``, what ``write_pairs`` and
      ``livestain simulate`` write);
    * a livestain run in paired mode (``DIR/p000/t0000_<channel>.ome.tif``, what the
      daemon writes), each (position, time point) being one field; predictions are
      not training data and are skipped.

    ``<structure>_noisy`` files (a simulated camera's view of a structure) are kept out
    of the channel list: the noise-free stack of that structure is the better target.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist or is not a folder; {LAYOUT_HINT}")
    fields: dict[str, dict[str, Path]] = {}
    strays: list[Path] = []
    for d in root.glob(FIELD_GLOB):
        if not d.is_dir():
            continue
        files: dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            channel = formats.channel_name(p)
            if channel is None:
                if p.name.lower().startswith(BRIGHTFIELD):
                    strays.append(p)
                continue
            if channel in files:
                raise ValueError(
                    f"{files[channel]} and {p} both hold channel {channel!r} of field {d}; keep one"
                )
            files[channel] = p
        fields[d.name] = files
    if storage_of(root) == "zarr":  # a run stored as OME-Zarr: its journal lists the stacks
        with RunReader(root) as run:
            for e in run.stacks():
                fields.setdefault(f"p{e.p:03d}/t{e.t:04d}", {})[e.channel.lower()] = Path(e.raw_ref)
    for d in root.glob("p[0-9][0-9][0-9]"):
        for p in d.glob(f"t*_*{SUFFIX}"):
            time_point, channel = p.name[: -len(SUFFIX)].split("_", 1)
            if channel != "prediction":
                fields.setdefault(f"{d.name}/{time_point}", {})[channel] = p
    fields = {
        name: {c: p for c, p in files.items() if not c.endswith("_noisy")}
        for name, files in fields.items()
        if BRIGHTFIELD in files
    }
    if not fields:
        found = f" ({', '.join(str(p) for p in strays[:3])} is in no format livestain reads)" if strays else ""
        raise ValueError(f"dataset folder {root} holds no field with a {BRIGHTFIELD}{SUFFIX}{found}; {LAYOUT_HINT}")
    return sorted(fields.items())


def available_structures(files: dict[str, Path]) -> list[str]:
    """Structure names with a stack in one field."""
    return sorted(c for c in files if c != BRIGHTFIELD)


def _read_zyx(path: Path, min_yx: int = MIN_YX) -> np.ndarray:
    """One file as a (z, y, x) stack that prediction and training can use, or a ValueError
    (`livestain.stackio.StackError`) naming the file, the problem and the fix."""
    array, _ = formats.read_image(path)
    array = as_zyx(array)
    if array.ndim != 3:
        raise ValueError(
            f"{path} has shape {array.shape}; each file must be one ZYX stack "
            "(split channels and time points into separate files)"
        )
    validate_stack(array, path, min_yx=min_yx, what="train on or score a model on")
    return array


def load_fields(
    data_dir: str | Path,
    structures: Sequence[str] | None = None,
    voxel_size_um: Sequence[float] | None = None,
    min_yx: int = MIN_YX,
) -> list[Field]:
    """All fields of a dataset with the requested structures (default: those every field has).

    ``voxel_size_um`` (z, y, x) is every field's voxel size, for files without OME
    metadata (default: each brightfield file's own). A structure is found under its
    own name or one alias (`livestain.inference.structures`: ``dna`` in ``dapi.ome.tif``);
    the fields' ``structures`` are the names asked for. Every file is checked
    (`livestain.stackio.validate_stack`): at least ``min_yx`` pixels in y and x (a
    model of depth d needs ``2**d``), finite values, not damaged, not colour.
    """
    fields_on_disk = field_files(data_dir)
    if structures is None:
        common = set(available_structures(fields_on_disk[0][1]))
        for _, files in fields_on_disk[1:]:
            common = {s for s in common if find_structure(s, available_structures(files))}
        if not common:
            raise ValueError(f"no structure has a stack in every field of {data_dir}; {LAYOUT_HINT}")
        structures = sorted(common)
    structures = tuple(structures)
    fields = []
    for name, files in fields_on_disk:
        on_disk = {s: find_structure(s, available_structures(files)) for s in structures}
        missing = [s for s in structures if on_disk[s] is None]
        if missing:
            have = available_structures(files)
            raise ValueError(
                f"field {Path(data_dir) / name} has no stack for {', '.join(missing)} (it has: "
                f"{', '.join(have) or 'none'}); add it or leave {', '.join(missing)} out of --structures"
            )
        bf_path = files[BRIGHTFIELD]
        bf = _read_zyx(bf_path, min_yx)
        targets = []
        kinds = set()
        for s in structures:
            path = files[on_disk[s]]
            t = _read_zyx(path, min_yx)
            planar = t.shape[0] == 1 and bf.shape[0] > 1 and t.shape[1:] == bf.shape[1:]
            if t.shape != bf.shape and not planar:
                raise ValueError(
                    f"{path} has shape {t.shape} but {bf_path} has {bf.shape}; a target must be "
                    "registered to its brightfield stack voxel for voxel (same z, y, x), or be a "
                    "single plane of the same y, x (for a 2.5D model)"
                )
            kinds.add(planar)
            targets.append((t[0] if planar else t).astype(np.float32, copy=False))
        if len(kinds) > 1:
            raise ValueError(
                f"field {Path(data_dir) / name} mixes single-plane and stack targets "
                f"({', '.join(structures)}); give every structure of a field as planes or as stacks"
            )
        vox = tuple(float(v) for v in voxel_size_um) if voxel_size_um else read_voxel_size(bf_path)
        fields.append(Field(name, bf, np.stack(targets), structures, vox))
    return fields


def split_for_validation(
    fields: Sequence[Field],
    val_fields: Sequence[str] | None = None,
    fraction: float = 0.2,
    seed: int = 0,
    min_yx: int = MIN_YX,
) -> tuple[list[Field], list[Field], str]:
    """``(train, validation, note)``: which fields (or parts) training learns from and
    which it reports its validation Pearson r on.

    * ``val_fields``: exactly those fields (by name) validate; the rest train.
    * one field (and ``fraction`` > 0): the last ``fraction`` of its y rows (at least
      ``min_yx``) validate, the rows before them train; patches are drawn only from
      the training rows, so the two never overlap. Too small a field: no validation.
    * otherwise ``fraction`` of the fields (at least one, seeded by ``seed``) validate.

    ``note`` says what was done, for the user (empty when nothing needs saying).
    """
    fields = list(fields)
    names = [f.name for f in fields]
    if val_fields:
        unknown = [v for v in val_fields if v not in names]
        if unknown:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"--val-fields {', '.join(unknown)}: no such field in the dataset; its fields are {shown}")
        if set(names) <= set(val_fields):
            raise ValueError(
                f"--val-fields names every field ({', '.join(names)}): leave at least one to train on "
                "(with a single field, leave --val-fields out: the last part of its y is held out instead)"
            )
        return ([f for f in fields if f.name not in val_fields], [f for f in fields if f.name in val_fields], "")
    if fraction <= 0:
        return fields, [], "note: --val-fraction 0: no validation, no val Pearson is recorded"
    if len(fields) == 1:
        f = fields[0]
        ny = f.brightfield.shape[1]
        n_val = max(min_yx, round(fraction * ny))
        cut = ny - n_val
        if cut < min_yx:
            return fields, [], (f"note: {f.name} has only {ny} rows in y, too few to hold {n_val} out for "
                                "validation: no val Pearson is recorded (add a field, or --val-fraction)")
        part = lambda label, ys: Field(  # noqa: E731
            f"{f.name}[y {label}]", f.brightfield[:, ys], f.targets[..., ys, :], f.structures, f.voxel_size_um)
        return ([part(f"0-{cut}", slice(0, cut))], [part(f"{cut}-{ny}", slice(cut, ny))],
                f"note: one field: validating on its last {n_val} of {ny} rows in y ({f.name} y {cut}-{ny}), "
                f"training on the {cut} before them")
    order = np.random.default_rng(seed).permutation(len(fields))
    n_val = min(max(1, round(fraction * len(fields))), len(fields) - 1)
    return ([fields[i] for i in sorted(order[n_val:])], [fields[i] for i in sorted(order[:n_val])], "")


def read_voxel_size(path: str | Path) -> tuple[float, float, float]:
    """(z, y, x) voxel size in um from a stack's own metadata (OME-XML, ImageJ calibration,
    OME-Zarr scale: `livestain.inference.formats.voxel_size`), or a ValueError saying how
    to give it.

    Guessing a voxel size is worse than failing: the predictor resamples data to the
    model's voxel size, so a wrong one silently rescales every later prediction.
    """
    return formats.voxel_size(path)


def fingerprint(data_dir: str | Path) -> str:
    """sha256 over the dataset's relative file names and sizes: cheap, detects changes.

    Stored in a model's metadata so one can tell which data a model was trained on
    without hashing gigabytes of pixels.
    """
    root = Path(data_dir)
    h = hashlib.sha256()
    for _, files in field_files(root):
        for entry in sorted(files.values()):
            # a folder (PNG planes, OME-Zarr) counts as the files in it
            if (chunk := ref_file(entry)) is not None and chunk != entry:  # a stack of a Zarr run
                h.update(f"{entry.relative_to(root).as_posix()}\0{chunk.stat().st_size}\n".encode())
                continue
            for p in sorted(f for f in entry.rglob("*") if f.is_file()) if entry.is_dir() else [entry]:
                h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()

"""``livestain simulate``: a paired training dataset from the simulated microscope.

Layout (what the training loader reads)::

    DIR/simulate.json                    parameters, tiles, files
    DIR/field000/brightfield.ome.tif     ZYX uint16, the camera's brightfield stack
    DIR/field000/dna.ome.tif             ZYX float32, noise-free truth (blurred labels)
    DIR/field000/dna_noisy.ome.tif       ZYX uint16, the camera's DNA fluorescence stack
    DIR/field000/membrane.ome.tif ...    and so on for membrane, mitochondria

Every file is OME-TIFF with its channel name, physical voxel size and per-plane stage
positions (Fiji and napari show micrometres), plus livestain's JSON header (seed, tile,
z positions, exposure). Field ``i`` is stage tile (0, i): the cells the simulated
microscope shows at stage x = i * field width, y = 0, at time ``--t``.

``--randomize`` draws every field's acquisition and sample from wide ranges
(`devices.randomize`: focus offset, z range and step, pixel size, NA, brightfield or
phase contrast, illumination, dust, camera, cell population) instead of the fixed
options, so a model can be trained and measured beyond one acquisition. Each field's
drawn parameters are recorded in its brightfield file's JSON header (``randomized``),
in ``fieldNNN/params.json`` and in ``DIR/fields.json``; fields then differ in shape
(planes, voxel size) but stay at most ``--size`` pixels wide and ``--max-planes`` deep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from livestain.stackio import write_stack

import numpy as np

from . import randomize
from .optics import MODALITIES, OpticsConfig
from .pairs import Pair, default_z_planes, simulate_pairs
from .sample import STRUCTURES, SampleGeometry


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``simulate`` to the CLI's subparsers (its handler is in ``func``)."""
    p = subparsers.add_parser(
        "simulate", help="write a paired dataset (brightfield, fluorescence, truth) from the simulator"
    )
    p.add_argument("--out", type=Path, required=True, help="dataset folder (must not hold fields yet)")
    p.add_argument("--fields", type=int, default=4, help="fields (stage positions) (default: %(default)s)")
    p.add_argument("--z", type=int, default=16, help="planes per stack (default: %(default)s)")
    p.add_argument("--size", type=int, default=256,
                   help="field width and height in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default: %(default)s)")
    p.add_argument("--z-step", type=float, default=1.0, help="plane spacing in um (default: %(default)s)")
    p.add_argument("--z-center", type=float, default=4.0,
                   help="stage z of the stack's centre in um; the cells are at 0-10 (default: %(default)s)")
    p.add_argument("--exposure", type=float, default=10.0,
                   help="brightfield exposure in ms (default: %(default)s)")
    p.add_argument("--fl-exposure", type=float, default=10.0,
                   help="fluorescence exposure in ms (default: %(default)s)")
    p.add_argument("--t", type=float, default=0.0, dest="t_s",
                   help="sample time in seconds: cells as moved by then (default: %(default)s)")
    p.add_argument("--modality", choices=MODALITIES, default="brightfield",
                   help="transmitted-light contrast: brightfield, phase (Zernike phase contrast) or dic "
                        "(DIC; stands for oblique illumination too) (default: %(default)s)")
    p.add_argument("--randomize", action="store_true",
                   help="draw each field's focus, z range/step, pixel size, optics, camera and cells "
                        "from wide ranges (recorded per field); --z, --z-step, --z-center and the "
                        "exposures are then drawn, not used")
    p.add_argument("--max-planes", type=int, default=64,
                   help="with --randomize: most planes per stack (default: %(default)s)")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(args: argparse.Namespace) -> int:
    """Write the dataset; 0 on success. Bad arguments raise ValueError (a user error)."""
    if args.fields < 1 or args.z < 1:
        raise ValueError("--fields and --z must be at least 1")
    if args.size < 32:
        raise ValueError(f"--size {args.size} is too small; use at least 32 pixels")
    if args.z_step <= 0 or args.exposure <= 0 or args.fl_exposure <= 0:
        raise ValueError("--z-step, --exposure and --fl-exposure must be positive")
    out: Path = args.out
    if out.exists() and any(out.glob("field*")):
        raise FileExistsError(f"{out} already holds fields; choose a new --out")
    modality = getattr(args, "modality", "brightfield")
    if getattr(args, "randomize", False):
        if modality != "brightfield":
            raise ValueError("--randomize draws each field's modality; drop --modality")
        return _simulate_randomized(args)
    geo = SampleGeometry(shape=(SampleGeometry().shape[0], args.size, args.size))
    optics = OpticsConfig(modality=modality)
    zs = default_z_planes(args.z_center, args.z, args.z_step)
    tiles = [(0, i) for i in range(args.fields)]
    fy, fx = geo.field_um
    common = {
        "generator": "livestain simulate",
        "seed": args.seed,
        "t_s": args.t_s,
        "z_um": [round(float(z), 6) for z in zs],
        "optics": dataclasses.asdict(optics),
    }
    out.mkdir(parents=True, exist_ok=True)
    files: list[dict] = []
    t0 = time.perf_counter()
    pairs = simulate_pairs(
        tiles, seed=args.seed, z_planes_um=zs, exposure_ms=args.exposure, geometry=geo,
        optics=optics, t_s=args.t_s, noisy_fluorescence=True,
        fluorescence_exposure_ms=args.fl_exposure,
    )
    for i, pair in enumerate(pairs):
        folder = out / f"field{i:03d}"
        x_um, y_um = pair.tile[1] * fx, pair.tile[0] * fy
        vox = pair.voxel_size_um
        base = {**common, "field": i, "tile": list(pair.tile), "stage_xy_um": [x_um, y_um]}
        written = _write_field(folder, pair, base,
                               {"brightfield": args.exposure, "fluorescence": args.fl_exposure}, {})
        files.append({"field": folder.name, "tile": list(pair.tile), "stage_xy_um": [x_um, y_um],
                      "files": [p.name for p in written]})
        print(f"field {i + 1}/{args.fields}: {folder} ({args.z} x {args.size} x {args.size}, "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
    manifest = {
        **common,
        "fields": files,
        "shape_zyx": [args.z, args.size, args.size],
        "voxel_size_um": list(vox),
        "structures": list(STRUCTURES),
        "exposure_ms": {"brightfield": args.exposure, "fluorescence": args.fl_exposure},
    }
    (out / "simulate.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {args.fields} field(s) to {out}")
    return 0


def draw_field_params(seed: int, index: int, max_planes: int = 64) -> dict:
    """Field ``index``'s parameters of a ``--randomize --seed`` dataset: its own
    generator, so a field's draw does not depend on how many fields came before."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index, 0x72616E64])
    return randomize.draw(rng, randomize.Ranges(max_planes=max_planes))


def _write_field(folder: Path, pair: Pair, base: dict, exposure: dict, extra_bf: dict) -> list[Path]:
    """One field's brightfield, truth and noisy fluorescence files."""
    vox = pair.voxel_size_um
    x_um, y_um = base["stage_xy_um"]
    z_planes = pair.z_um if pair.z_um is not None else base["z_um"]  # fixed planes: in `common`
    planes = [(x_um, y_um, float(z)) for z in z_planes]
    names = {s: s.capitalize() for s in STRUCTURES}
    written = [write_stack(
        folder / "brightfield.ome.tif", pair.brightfield, voxel_size_um=vox,
        channel_names=["Brightfield"], plane_positions_um=planes,
        info={**base, **extra_bf, "kind": "camera", "channel": "Brightfield",
              "exposure_ms": exposure["brightfield"], "units": "camera counts (ADU)"},
    )]
    for k, s in enumerate(pair.structures):
        written.append(write_stack(
            folder / f"{s}.ome.tif", pair.targets[k], voxel_size_um=vox,
            channel_names=[s], plane_positions_um=planes,
            info={**base, "kind": "truth", "structure": s,
                  "units": "blurred label density (in-focus unit density ~ 1), noise-free"},
        ))
        written.append(write_stack(
            folder / f"{s}_noisy.ome.tif", pair.fluorescence[k], voxel_size_um=vox,  # type: ignore[index]
            channel_names=[names[s]], plane_positions_um=planes,
            info={**base, "kind": "camera", "structure": s, "channel": names[s],
                  "exposure_ms": exposure["fluorescence"], "units": "camera counts (ADU)"},
        ))
    return written


def _simulate_randomized(args: argparse.Namespace) -> int:
    """``--randomize``: every field drawn from `devices.randomize.Ranges`."""
    if args.t_s:
        raise ValueError("--randomize renders cells at t = 0; drop --t")
    if args.max_planes < 2:
        raise ValueError("--max-planes must be at least 2")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records, files = [], []
    for i in range(args.fields):
        tile = (0, i)
        params = draw_field_params(args.seed, i, args.max_planes)
        pair, record = randomize.render(params, args.seed, tile, args.size, noisy_fluorescence=True)
        x_um = i * record["field_um"]
        base = {"generator": "livestain simulate --randomize", "seed": args.seed, "t_s": 0.0,
                "field": i, "tile": list(tile), "stage_xy_um": [x_um, 0.0],
                "z_um": [round(float(z), 6) for z in pair.z_um]}  # type: ignore[union-attr]
        folder = out / f"field{i:03d}"
        exposure = {"brightfield": record["exposure_ms"], "fluorescence": record["fl_exposure_ms"]}
        written = _write_field(folder, pair, base, exposure, {"randomized": record})
        (folder / "params.json").write_text(json.dumps(record, indent=1))
        records.append({"field": folder.name, "tile": list(tile), "params": record})
        files.append({"field": folder.name, "tile": list(tile), "files": [p.name for p in written]})
        z, y, x = pair.brightfield.shape
        print(f"field {i + 1}/{args.fields}: {folder} ({z} x {y} x {x}, {record['modality']}, "
              f"pixel {record['pixel_um']} um, step {record['z_step_um']} um, "
              f"{record['population']['kind']}, {time.perf_counter() - t0:.1f} s)", flush=True)
    (out / "fields.json").write_text(json.dumps({"seed": args.seed, "fields": records}, indent=1))
    manifest = {"generator": "livestain simulate --randomize", "seed": args.seed,
                "ranges": dataclasses.asdict(randomize.Ranges(max_planes=args.max_planes)),
                "fields": files, "structures": list(STRUCTURES), "params": "fields.json"}
    (out / "simulate.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {args.fields} randomized field(s) to {out}")
    return 0

"""Run storage: write throughput of each store against plain file writes, and what zstd saves.

For each source of brightfield stacks (the simulator's, and the real stacks in
``../shared/data`` when present), ``--stacks`` stacks are written as a run would:

* ``plain files``: each stack's bytes to its own file, plane by plane, then ``fsync`` (the
  baseline: what any store needs at least, with the same durability);
* ``plain 1 write``: the same in one ``write()`` call (the kernel throttles one large
  dirtying write: 2-3x slower for megabyte stacks on this machine);
* ``zarr``: `livestain.store.ZarrStore`, uncompressed (the default), one chunk per stack;
* ``zarr+zstd``: the same with ``storage_compression: zstd``;
* ``tiff``: `livestain.store.TiffStore`, one OME-TIFF per stack (write, fsync, rename).

Every stack is written by every kind in turn (order rotating), so all meet the same disk
moments; each kind's figure is its median time per stack. Throughput is MB of pixels
per second, and each store's as a fraction of the baseline's in the same run on the same
disk; the compression ratio is pixel bytes over bytes on disk.

    .venv/bin/python bench/store.py [--stacks 40] [--repeats 5] [--dir /data/disk/to/test]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from livestain.stackio import fsync_dir
from livestain.store import open_store

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def sources(n: int) -> dict[str, tuple[list[np.ndarray], tuple[float, float, float]]]:
    """name -> (n ZYX uint16 stacks, voxel size): simulated, and real ones where present."""
    from livestain.devices.simulated import SimulatedScope

    scope = SimulatedScope()
    zs = 4.0 + (np.arange(16) - 7.5)
    base = np.stack([scope.expected_plane("Brightfield", z, (0, 0)) for z in zs])
    rng = np.random.default_rng(0)
    sim = [np.clip(base + rng.normal(0, 30, base.shape), 0, 65535).astype(np.uint16) for _ in range(n)]
    out = {"simulated 16x256x256": (sim, (1.0, 0.325, 0.325))}
    import tifffile

    for name, path in (("sephace real 13x1024x1024", SHARED / "sephace_bf_dapi" / "Set1_brightfield_zstack.ome.tif"),
                       ("bfdc3d real", SHARED / "bfdc3d_imodpasteur" / "dict_redLED_SP_100nm_1_MMStack_Pos0.ome.tif")):
        if not path.is_file():
            continue
        stack = np.asarray(tifffile.imread(path))
        stack = stack.reshape(-1, *stack.shape[-2:]).astype(np.uint16)
        label = f"{name.split(' real')[0]} real {'x'.join(map(str, stack.shape))}"
        # the same field again and again would flatter nothing (no cross-stack codec),
        # but keep the bytes honest: a little fresh noise per copy, as a camera gives
        out[label] = ([np.clip(stack.astype(np.int32) + rng.integers(-2, 3, stack.shape), 0, 65535)
                       .astype(np.uint16) for _ in range(max(4, n // 4))], (1.0, 0.1, 0.1))
    return out


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class PlainFiles:
    """The baseline: each stack's bytes to a file of its own, fsynced (what any store
    needs at least for the same durability), plane by plane, the fastest plain way on
    this machine; ``one_write=True``: the whole stack in one ``write()``, which the
    kernel throttles (shown for comparison, 2-3x slower for megabyte stacks here)."""

    def __init__(self, folder: Path, one_write: bool = False) -> None:
        self.folder = folder
        self.one_write = one_write
        folder.mkdir(parents=True)
        fsync_dir(folder)

    def write(self, t: int, stack: np.ndarray, voxel) -> None:  # noqa: ANN001
        with open(self.folder / f"{t:05d}.raw", "wb") as fh:
            if self.one_write:
                fh.write(stack.tobytes())
            else:
                for plane in stack:
                    fh.write(memoryview(np.ascontiguousarray(plane)).cast("B"))
            fh.flush()
            os.fsync(fh.fileno())


class StoreWrites:
    """A run store writing raw stacks as the daemon does (`RunStore.write_raw`)."""

    def __init__(self, folder: Path, storage: str, compression: str, timepoints: int) -> None:
        self.folder = folder
        self.store = open_store(folder, storage, timepoints=timepoints, compression=compression)  # type: ignore[arg-type]

    def write(self, t: int, stack: np.ndarray, voxel) -> None:  # noqa: ANN001
        self.store.write_raw(t, 0, "Brightfield", stack, voxel_size_um=voxel, info={"t": t})


KINDS = ("plain files", "plain 1 write", "zarr", "zarr+zstd", "tiff")


def measure(n: int, root: Path, repeats: int = 3) -> list[dict]:
    """Per source: every stack written by every kind in turn (the kinds' order rotating
    from stack to stack), so all kinds meet the same disk moments; each kind's figure is
    its median time per stack (a stall of the shared disk moves a mean, not a median)."""
    rows = []
    for name, (stacks, voxel) in sources(n).items():
        stack_mb = stacks[0].nbytes / 1e6
        writers: dict[str, Any] = {}
        for kind in KINDS:
            folder = root / f"{name.split()[0]}-{kind.replace('+', '_').replace(' ', '_')}"
            storage, _, comp = kind.partition("+")
            if kind.startswith("plain"):
                writers[kind] = PlainFiles(folder, one_write=kind == "plain 1 write")
            else:
                writers[kind] = StoreWrites(folder, storage, comp or "none", len(stacks) * repeats)
        for kind, writer in writers.items():  # creating an image is not a stack's cost
            writer.write(0, stacks[0], voxel)
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for i in range(1, len(stacks) * repeats):
            stack = stacks[i % len(stacks)]
            for kind in KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]:
                t0 = time.perf_counter()
                writers[kind].write(i, stack, voxel)
                times[kind].append(time.perf_counter() - t0)
        base = float(np.median(times["plain files"]))
        for kind in KINDS:
            med = float(np.median(times[kind]))
            on_disk = disk_bytes(writers[kind].folder)
            written = len(times[kind]) + 1
            rows.append({"source": name, "store": kind, "stacks": written, "MB": round(stack_mb * written, 1),
                         "ms_per_stack": round(med * 1e3, 2), "MB_per_s": round(stack_mb / med, 1),
                         "vs_plain": round(base / med, 2),
                         "compression": round(stack_mb * 1e6 * written / on_disk, 2)})
            shutil.rmtree(writers[kind].folder)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacks", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="a folder on the disk to test (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="livestain-store-", dir=args.dir))
    try:
        rows = measure(args.stacks, root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'source':<28} {'store':<12} {'stacks':>6} {'ms/stack':>9} {'MB/s':>8} {'vs plain':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['source']:<28} {r['store']:<12} {r['stacks']:>6} {r['ms_per_stack']:>9} {r['MB_per_s']:>8} "
              f"{r['vs_plain']:>9} {r['compression']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``livestain export RUN --format ome-tiff --out DIR``: a Zarr run as plain OME-TIFF files.

For Fiji users and archives that want one file per stack: every recorded raw stack and
live prediction is written in the OME-TIFF layout a ``storage: tiff`` run has
(``DIR/p000/t0000_<channel>.ome.tif``, ``t0000_prediction.ome.tif``), with its header
from the journal, its physical voxel size and its channel or structure names, plus the
run's ``run.json``; so the export opens in Fiji and napari, and livestain reads it back
as a run (``train``, ``predict-run``, ``evaluate-run``). The run itself is only read.
Files are written atomically (`livestain.stackio.write_stack`) and an existing one is
kept, so an interrupted export continues where it stopped.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from livestain.run_reader import RunReader
from livestain.stackio import write_stack
from livestain.store import TiffStore, read_ref


@dataclass
class ExportReport:
    written: int = 0
    kept: int = 0  # already in DIR from an earlier, interrupted export
    bytes: int = 0


def export_ome_tiff(run_dir: str | Path, out_dir: str | Path,
                    progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write every stack of ``run_dir`` as OME-TIFF under ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out_dir} is the run itself; export to another folder")
    report = ExportReport()
    layout = TiffStore(out_dir)
    with RunReader(run_dir) as run:
        entries = run.stacks()
        out_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "run.json").is_file():
            shutil.copyfile(run_dir / "run.json", out_dir / "run.json")
        total = len(entries) + sum(e.prediction_ref is not None for e in entries)
        done = 0
        for e in entries:
            jobs = [(layout.raw_path(e.t, e.p, e.channel), e.raw_ref, e.info, [e.channel])]
            if e.prediction_ref is not None:
                jobs.append((layout.prediction_path(e.t, e.p), e.prediction_ref, e.prediction_info, None))
            for path, ref, info, names in jobs:
                done += 1
                if path.is_file():
                    report.kept += 1
                    continue
                array, ref_info = read_ref(ref)
                header = ref_info | info
                header.pop("source", None)
                write_stack(path, array, voxel_size_um=header["voxel_size_um"], info=header,
                            channel_names=names or list(header.get("structures") or []))
                report.written += 1
                report.bytes += array.nbytes
                if progress is not None:
                    progress(done, total)
        if progress is not None:
            progress(total, total)
    return report

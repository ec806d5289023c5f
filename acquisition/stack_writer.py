"""Raw data first: a finished stack goes to the store and the journal before anything
else (a viewer, a worker) sees it, and only when the disk has room for it and for its
prediction.

What is written with each stack (its `wire.StackHeader`, missing planes, exposure, the
focus the closed loop found in it, the camera's light ledger) is what a resumed run,
the audit, catch-up and `livestain export` read back.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from livestain import wire
from livestain.store import RunStore

from .closed_loop import ClosedLoop
from .journal import Journal
from .light_dose import LightDose
from .policies import Policies
from .run_summary import RunStopped, stop_on_journal_error, write_fix
from .stacks import Stack


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class StackWriter:
    """Writes finished stacks of one run: header, disk check, store, journal.

    Parameters
    ----------
    run_id, out_dir : str, Path
        The run (its id goes in every header) and its folder (whose disk is checked).
    store, journal : RunStore, Journal
        Where the pixels and the record of them go.
    policies : Policies
        ``min_free_gb`` and the streamed channels (whose predictions need room too).
    dose, loop : LightDose, ClosedLoop
        The light ledger read for the stack, and the focus estimate of its brightfield.
    structures : callable
        Structures per prediction (as the last prediction said), for its disk space.
    free_space : callable
        Free bytes on a path's disk (a test makes the disk fill up).
    """

    #: Room kept for the journal, log and file headers beyond the stack and its prediction.
    RESERVE_BYTES = 16 * 1024**2

    def __init__(self, *, run_id: str, out_dir: Path, store: RunStore, journal: Journal, policies: Policies,
                 dose: LightDose, loop: ClosedLoop, structures: Callable[[], int],
                 free_space: Callable[[Path], int] = disk_free_bytes) -> None:
        self.run_id, self.out_dir, self.store, self.journal = run_id, out_dir, store, journal
        self.policies, self.dose, self.loop = policies, dose, loop
        self.structures, self.free_space = structures, free_space

    def write(self, seq: int, stack: Stack, pixel_size_um: float) -> tuple[wire.StackHeader, Path]:
        """Write one stack and journal it; returns its header (what is streamed) and its
        store reference. A failure stops the run (`RunStopped`) with nothing half-written."""
        raw_path = Path(self.store.raw_ref(stack.t, stack.p, stack.channel))
        header = stack_header(self.run_id, seq, stack, raw_path, pixel_size_um)
        info: dict[str, Any] = header.model_dump(by_alias=True) | {"gaps": stack.gaps,
                                                                  "exposure_ms": stack.exposure_ms}
        focus = self.loop.track_focus(stack, header.voxel_size_um[0])
        if focus is not None:
            info["focus"] = focus
        if (ledger := self.dose.take(stack.key)) is not None:
            info["dose_ledger"] = ledger
        self.check_disk(stack.planes.nbytes + self._prediction_bytes(stack.planes.shape))
        try:
            self.store.write_raw(stack.t, stack.p, stack.channel, stack.planes, voxel_size_um=header.voxel_size_um,
                                 info=info,
                                 # planes of a gap, or axes the plan leaves alone, have no
                                 # position: better none in the file than a made-up 0
                                 plane_positions_um=None if np.isnan(stack.positions_um).any()
                                 else stack.positions_um)
        except OSError as e:
            raise RunStopped(
                f"could not write {raw_path}: {e.strerror or e}. Earlier stacks are intact; "
                f"{write_fix(e)} and continue with --resume."
            ) from None
        with stop_on_journal_error(f"{raw_path.name} and earlier stacks are intact"):
            self.journal.stack_written(seq, stack.t, stack.p, stack.channel, raw_path, len(stack.gaps),
                                       *((focus["focus_offset_um"], focus["z_correction_um"]) if focus else (None, None)),
                                       info=info)
        return header, raw_path

    def _prediction_bytes(self, shape: tuple[int, ...]) -> int:
        """Disk a stack's prediction will take: float32, one channel per structure."""
        return int(np.prod(shape)) * 4 * self.structures() if self.policies.stream_channels else 0

    def check_disk(self, needed_bytes: int = 0) -> None:
        """Stop cleanly unless this stack, its prediction and the safety margin all fit.

        With ``min_free_gb: 0`` the check still reserves the stack and its (float32,
        several structures: ~6x larger) prediction, so a full disk stops the run here
        rather than in the middle of a write.
        """
        free = self.free_space(self.out_dir)
        needed = self.policies.min_free_bytes + needed_bytes + self.RESERVE_BYTES
        if free < needed:
            raise RunStopped(
                f"only {free / 1e6:.0f} MB free on the disk of {self.out_dir}: the next stack and "
                f"its prediction need {(needed_bytes + self.RESERVE_BYTES) / 1e6:.0f} MB beyond the "
                f"{self.policies.min_free_bytes / 1e6:.0f} MB safety margin (policies.min_free_gb). "
                f"Every stack so far is saved; free some space and continue with --resume."
            )


def stack_header(run_id: str, seq: int, stack: Stack, raw_path: Path, pixel_size_um: float) -> wire.StackHeader:
    """The wire header of a finished stack: its place in the run, shape, voxel size (z
    from the stage positions the planes were taken at), position and times."""
    px = pixel_size_um
    z = stack.positions_um[:, 2]
    dz = float(np.nanmean(np.diff(z))) if len(z) > 1 and np.isfinite(z).sum() > 1 else 1.0
    return wire.StackHeader(
        kind="stack",
        run_id=run_id,
        seq=seq,
        t=stack.t,
        p=stack.p,
        channel=stack.channel,
        shape=list(stack.planes.shape),
        dtype=str(stack.planes.dtype),
        voxel_size_um=[abs(dz) if np.isfinite(dz) and dz else 1.0, px, px],
        position_um=[float(v) for v in np.nan_to_num(stack.positions_um[0])],
        acquired_start=float(np.nanmin(stack.times)),
        acquired_end=float(np.nanmax(stack.times)),
        path=str(raw_path),
    )

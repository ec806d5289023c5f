"""The run's folder on disk: ``run.json``, the one-writer lock, and what is already there.

A new run takes a new or empty folder (never a dataset someone else made) and writes
``run.json`` (run id, plan, policies, model) atomically; a resumed run reopens it under
the lock, clears writes a crash cut short, keeps its storage and notes a model change.
What is "already there" is what the journal recorded *and* the store still has: the
stacks a resume must never take again (a recorded gap is final).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import useq
from pydantic import BaseModel

from livestain import __version__
from livestain.store import ref_exists

from .dataset_lock import LOCK_NAME, DatasetLock
from .journal import Journal

MARKER = "run.json"

Key = tuple[int, int, str]


class RunFolder:
    """One run's folder; ``lock_port`` is the daemon's base port, kept in the lock so a
    second daemon can say which one is writing (`DatasetLock`)."""

    def __init__(self, out_dir: Path, lock_port: int) -> None:
        self.out_dir = Path(out_dir)
        self.marker = self.out_dir / MARKER
        self._lock_port = lock_port
        self._lock: DatasetLock | None = None

    def create(self, sequence: useq.MDASequence, policies: BaseModel, provenance: dict[str, Any]) -> str:
        """A new run: refuse a folder holding anything, lock it, write ``run.json``; the run id."""
        if self.marker.exists():
            raise FileExistsError(
                f"{self.out_dir} already holds a livestain run ({self.marker}); nothing was "
                f"overwritten. Choose another --out folder, or add --resume to continue it."
            )
        refuse_foreign_folder(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.take_lock()
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        info = {
            "run_id": run_id,
            "livestain": __version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sequence": sequence.model_dump(mode="json", exclude_unset=True),
            "policies": policies.model_dump(mode="json"),
        } | provenance
        write_json_atomically(self.marker, info)
        return run_id

    def reopen(self, provenance: dict[str, Any]) -> tuple[str, str, set[Key]]:
        """A resumed run: (run id, its storage, the (t, p, channel) already on disk)."""
        if not self.marker.exists():
            raise FileNotFoundError(
                f"Nothing to resume in {self.out_dir}: it holds no {MARKER}. "
                f"Start a new run without --resume."
            )
        self.take_lock()  # before anything is read: another daemon may be writing
        run = json.loads(self.marker.read_text())
        # a run continues in the storage it began in (runs from before Zarr: TIFF)
        storage = (run.get("policies") or {}).get("storage", "tiff")
        for partial in partial_files(self.out_dir):
            partial.unlink()  # a write cut short by the crash; the stack is re-acquired
        done = self.done_keys()
        self._record_provenance_change(run, provenance)
        return run["run_id"], storage, done

    def done_keys(self) -> set[Key]:
        """(t, p, channel) of every stack recorded and still on disk."""
        journal = Journal(self.out_dir)
        try:
            return {(r.t, r.p, r.channel) for r in journal.rows() if ref_exists(r.raw_in(self.out_dir))}
        finally:
            journal.close()

    def take_lock(self) -> None:
        self._lock = DatasetLock(self.out_dir, {"port": self._lock_port}).acquire()

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _record_provenance_change(self, run: dict[str, Any], provenance: dict[str, Any]) -> None:
        """Resuming with another model: say so, and keep the change in ``run.json``."""
        new = provenance.get("model")
        old = run.get("model")
        if new is None or old is None or new.get("name") == old.get("name"):
            return
        journal = Journal(self.out_dir)
        try:
            from_seq = journal.next_seq()
        finally:
            journal.close()
        run.setdefault("model_changes", []).append(
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": old, "to": new, "from_seq": from_seq})
        run["model"] = new
        write_json_atomically(self.marker, run)


def refuse_foreign_folder(out_dir: Path) -> None:
    """A new run writes into a new or empty folder, never into someone else's files.

    ``out:`` pointing at a training dataset used to be accepted, and the run's stacks
    then broke that dataset for ``livestain train``.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a folder; choose a folder for the run")
    entries = sorted(e.name for e in out_dir.iterdir()
                     if not e.name.startswith(".") and e.name != LOCK_NAME)
    if entries:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"--out {out_dir} already holds other files ({shown}) and no livestain run; nothing "
            f"was written. Each run needs a new or empty folder: choose another out folder."
        )


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)


def partial_files(out_dir: Path) -> Iterator[Path]:
    """Files a crash cut short (``*.partial``: TIFF stacks, Zarr group metadata).

    Zarr arrays' chunk folders are not entered: none of ours is written there (tensorstore
    renames its own temporary files), and a run of days holds hundreds of thousands of
    chunks: walking them all made a resume after 25,000 stacks take two minutes.
    """
    for dirpath, dirnames, filenames in os.walk(out_dir):
        if "zarr.json" in filenames and _is_zarr_array(Path(dirpath)):
            dirnames[:] = []
        yield from (Path(dirpath) / name for name in filenames if name.endswith(".partial"))


def _is_zarr_array(folder: Path) -> bool:
    try:
        return json.loads((folder / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, ValueError):
        return False

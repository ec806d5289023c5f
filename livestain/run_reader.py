"""Reading a run back, whichever storage it was written in: its journal says what exists.

The daemon records every stack in ``journal.sqlite`` only once its bytes are on disk,
with its store reference (`livestain.store`) and its header. So a reader asks the
journal what was acquired and predicted, and the store for the pixels: the same code
reads an OME-Zarr run and an OME-TIFF one, a run still being written (SQLite's WAL
lets a reader in beside the writer), and a run moved to another disk (references are
found again by their ``pNNN/`` layout, `in_dataset`).
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livestain.store import read_ref

JOURNAL = "journal.sqlite"


@dataclass(frozen=True)
class StackEntry:
    """One acquired stack as the journal recorded it."""

    seq: int
    t: int
    p: int
    channel: str
    raw_ref: str
    gaps: int
    prediction_ref: str | None
    info: dict[str, Any] = field(default_factory=dict)
    prediction_info: dict[str, Any] = field(default_factory=dict)


def in_dataset(out_dir: Path, recorded: str | Path) -> Path:
    """``recorded``'s place in the layout of the run folder ``out_dir``: ``pNNN/FILE``, or
    a plate's ``raw.ome.zarr/ROW/COL/FIELD#...`` (the journal keeps references as the
    daemon wrote them, maybe relative to another cwd, or before the run was moved)."""
    plate_field = _PLATE_REF.search(str(recorded))
    if plate_field is not None:
        return Path(out_dir) / plate_field.group(1)
    path = Path(recorded)
    return Path(out_dir) / path.parent.name / path.name


_PLATE_REF = re.compile(r"(?:^|/)([^/]+\.ome\.zarr/[A-Za-z0-9]+/[A-Za-z0-9]+/\d+#[^/]*)$")


def header_columns(db: sqlite3.Connection) -> tuple[str, str, str]:
    """How to read the recorded headers beside ``stacks s``: (a join, the stack's header
    column, the prediction's). Journals keep them in their own ``headers`` table; a few
    of 2026-12-01 have them as columns of ``stacks``; the oldest have none."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    legacy = "prediction_info" in {row[1] for row in db.execute("PRAGMA table_info(stacks)")}
    if "headers" in tables:
        join = "LEFT JOIN headers h ON h.seq = s.seq"
        if legacy:
            return join, "COALESCE(h.stack, s.info)", "COALESCE(h.prediction, s.prediction_info)"
        return join, "h.stack", "h.prediction"
    if legacy:
        return "", "s.info", "s.prediction_info"
    return "", "NULL", "NULL"


class RunReader:
    """Read-only view of a run folder: its stacks, their headers and their pixels."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        journal = self.out_dir / JOURNAL
        if not journal.is_file():
            raise FileNotFoundError(f"{self.out_dir} is not a livestain run (no {JOURNAL}); "
                                    "give the folder a run wrote (--out)")
        self._db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stacks(self, channel: str | None = None) -> list[StackEntry]:
        """Every stack recorded (of ``channel``), in acquisition order."""
        where, params = ("WHERE s.channel = ?", (channel,)) if channel is not None else ("", ())
        return self._entries(where, params)

    def entry(self, t: int, p: int = 0, channel: str = "Brightfield") -> StackEntry:
        """One stack (the first recorded, if it was recorded twice); one query on the
        journal's (t, p, channel) index, not a pass over every stack with its header, so
        reading a long run stack by stack stays linear."""
        found = self._entries("WHERE s.t = ? AND s.p = ? AND s.channel = ?", (t, p, channel))
        if not found:
            raise KeyError(f"{self.out_dir} holds no {channel} stack at t={t}, p={p}")
        return found[0]

    def _entries(self, where: str, params: tuple) -> list[StackEntry]:
        join, stack, pred = header_columns(self._db)
        rows = self._db.execute(
            f"SELECT s.seq, s.t, s.p, s.channel, s.raw_path, s.gaps, s.predicted_path, {stack}, {pred} "
            f"FROM stacks s {join} {where} ORDER BY s.seq", params).fetchall()
        return [StackEntry(seq, t, p, ch, str(in_dataset(self.out_dir, raw)), gaps,
                           str(in_dataset(self.out_dir, pred_ref)) if pred_ref else None,
                           json.loads(info) if info else {}, json.loads(pinfo) if pinfo else {})
                for seq, t, p, ch, raw, gaps, pred_ref, info, pinfo in rows]

    def raw(self, t: int, p: int = 0, channel: str = "Brightfield") -> tuple[np.ndarray, dict[str, Any]]:
        """A raw stack (ZYX) and its header (the journal's, else the file's)."""
        e = self.entry(t, p, channel)
        array, info = read_ref(e.raw_ref)
        return array, info | e.info

    def prediction(self, t: int, p: int = 0, channel: str = "Brightfield") -> tuple[np.ndarray, dict[str, Any]]:
        """The live prediction (CZYX) of a stack and its header."""
        e = self.entry(t, p, channel)
        if e.prediction_ref is None:
            raise KeyError(f"the {channel} stack at t={t}, p={p} of {self.out_dir} has no prediction yet")
        array, info = read_ref(e.prediction_ref)
        return array, info | e.prediction_info

"""The run journal: an SQLite record of every stack acquired, written and predicted.

The journal is what makes a crash survivable. Each state change is committed as it
happens (SQLite's WAL survives kill -9 and power loss), so after any crash
``--resume`` knows exactly which time points are complete on disk, which stacks still
need a prediction, and which sequence number comes next, without trusting the file
system listing alone.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livestain.run_reader import header_columns, in_dataset

SCHEMA = """
CREATE TABLE IF NOT EXISTS stacks (
    seq INTEGER PRIMARY KEY,
    t INTEGER NOT NULL,
    p INTEGER NOT NULL,
    channel TEXT NOT NULL,
    raw_path TEXT NOT NULL,
    gaps INTEGER NOT NULL DEFAULT 0,
    acquired_at REAL NOT NULL,
    predicted_path TEXT,
    predicted_at REAL,
    latency_s REAL
);
CREATE TABLE IF NOT EXISTS checks (
    t INTEGER NOT NULL,
    p INTEGER NOT NULL,
    structure TEXT NOT NULL,
    pearson REAL,
    ssim REAL,
    nrmse REAL,
    reason TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    at REAL NOT NULL,
    what TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS headers (
    seq INTEGER PRIMARY KEY,
    stack TEXT,
    prediction TEXT
);
"""


def _as_json(info: dict[str, Any] | None) -> str | None:
    return json.dumps(info, default=str) if info is not None else None


class JournalWriteError(OSError):
    """The journal could not record a change (full disk, I/O error): the run must stop."""


@dataclass(frozen=True)
class JournalRow:
    """One stack as the journal knows it."""

    seq: int
    t: int
    p: int
    channel: str
    raw_path: str
    gaps: int
    predicted_path: str | None
    not_predictable: str | None = None  # why no worker could predict it (None: not tried, or fine)

    def raw_in(self, out_dir: Path) -> Path:
        """The raw stack's file inside the dataset folder ``out_dir`` as it is now.

        The journal records paths as the daemon wrote them: relative to the folder it
        was started from (the demo's default ``livestain-demo/...``), or absolute on a
        disk the run has since been moved or copied from. The layout (``pNNN/file``)
        is what stays true, so files are found by it.
        """
        return in_dataset(out_dir, self.raw_path)

    def prediction_in(self, out_dir: Path) -> Path | None:
        """The live prediction's file inside ``out_dir`` (None if never predicted)."""
        return in_dataset(out_dir, self.predicted_path) if self.predicted_path else None


class Journal:
    """Append-mostly SQLite journal of one dataset folder (``journal.sqlite``)."""

    FILENAME = "journal.sqlite"

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / self.FILENAME
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._add_missing_columns()
        # where the headers are (fixed once the schema is): not asked again per catch-up
        self._header_sql = header_columns(self.db)

    #: Columns added after the first release: a journal from before gains them on open.
    #: (The stack's and its prediction's headers, which a Zarr chunk has no description
    #: of its own to carry, are JSON in the ``headers`` table: kept out of ``stacks``, they
    #: leave its rows small, so the per-stack queries stay fast over a run of days. A few
    #: journals of 2026-12-01 have them as ``info``/``prediction_info`` columns instead;
    #: `livestain.run_reader.header_columns` reads either.)
    LATER_COLUMNS = {"confidence": "REAL", "flags": "TEXT", "not_predictable": "TEXT",
                     "focus_offset_um": "REAL", "z_correction_um": "REAL", "model": "TEXT"}

    def _add_missing_columns(self) -> None:
        have = {row[1] for row in self.db.execute("PRAGMA table_info(stacks)")}
        for name, kind in self.LATER_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE stacks ADD COLUMN {name} {kind}")
        # the stacks still waiting for a prediction, found without reading the whole run
        # (a partial index: it holds only them, so it stays small however long the run)
        self.db.execute("CREATE INDEX IF NOT EXISTS waiting ON stacks(seq) "
                        "WHERE predicted_path IS NULL AND not_predictable IS NULL")
        # a stack found by its place (`RunReader.entry`, checks pairing a frame with its prediction)
        self.db.execute("CREATE INDEX IF NOT EXISTS place ON stacks(t, p, channel)")

    def _write(self, sql: str, params: tuple) -> None:
        """One committed change; SQLite's failures (a full disk) become `JournalWriteError`."""
        try:
            self.db.execute(sql, params)
        except sqlite3.Error as e:
            raise JournalWriteError(f"could not record the run's progress in {self.path}: {e}") from None

    def _write_together(self, statements: list[tuple[str, tuple]]) -> None:
        """Several changes committed as one (a crash leaves all or none)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self.db.execute(sql, params)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise JournalWriteError(f"could not record the run's progress in {self.path}: {e}") from None

    def stack_written(self, seq: int, t: int, p: int, channel: str, raw_path: Path, gaps: int,
                      focus_offset_um: float | None = None, z_correction_um: float | None = None,
                      info: dict[str, Any] | None = None) -> None:
        """A stack is on disk (``raw_path``: its store reference); with where its cells'
        focal plane was found (from the stack's centre, um; None: not found or not
        estimated), the focus-tracking correction it was taken with and its header."""
        self._write_together([
            ("INSERT OR REPLACE INTO stacks (seq, t, p, channel, raw_path, gaps, acquired_at, "
             "focus_offset_um, z_correction_um) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (seq, t, p, channel, str(raw_path), gaps, time.time(), focus_offset_um, z_correction_um)),
            ("INSERT OR REPLACE INTO headers (seq, stack) VALUES (?, ?)", (seq, _as_json(info))),
        ])

    def prediction_written(self, seq: int, path: Path, latency_s: float,
                           confidence: float | None = None, flags: str = "", model: str = "",
                           info: dict[str, Any] | None = None) -> None:
        """A stack's prediction is on disk, with the worker's per-stack confidence, the
        input checks' flags (comma-separated codes, "" when none), the model that made
        it (``name@hash``) and its header (provenance, timings)."""
        self._write_together([
            ("UPDATE stacks SET predicted_path = ?, predicted_at = ?, latency_s = ?, confidence = ?, "
             "flags = ?, model = ? WHERE seq = ?",
             (str(path), time.time(), latency_s, confidence, flags, model or None, seq)),
            ("INSERT INTO headers (seq, prediction) VALUES (?, ?) "
             "ON CONFLICT(seq) DO UPDATE SET prediction = excluded.prediction", (seq, _as_json(info))),
        ])

    def info(self, seq: int, prediction: bool = False) -> dict[str, Any] | None:
        """The header recorded with a stack (or its prediction); None if none was."""
        join, stack, pred = self._header_sql
        row = self.db.execute(f"SELECT {pred if prediction else stack} FROM stacks s {join} WHERE s.seq = ?",
                              (seq,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def not_predictable(self, seq: int, reason: str) -> None:
        """A stack no worker could predict (or whose raw file is unreadable): recorded with
        the reason, so it is not tried again after a ``--resume`` and the audit says why."""
        self._write("UPDATE stacks SET not_predictable = ? WHERE seq = ?", (reason, seq))

    def _waiting_where(self, channels: tuple[str, ...]) -> tuple[str, tuple]:
        marks = ",".join("?" * len(channels))
        return (f"predicted_path IS NULL AND not_predictable IS NULL AND channel IN ({marks})",
                tuple(channels))

    def waiting(self, channels: tuple[str, ...], limit: int, skip: set[int] | frozenset = frozenset()
                ) -> list[JournalRow]:
        """The oldest ``limit`` stacks of ``channels`` with no prediction yet (and not
        recorded as not predictable), less the seqs in ``skip`` (those the caller holds)."""
        where, params = self._waiting_where(channels)
        cur = self.db.execute(
            f"SELECT seq, t, p, channel, raw_path, gaps, predicted_path FROM stacks WHERE {where} "
            f"ORDER BY seq LIMIT ?", (*params, limit + len(skip)))
        return [row for row in (JournalRow(*r) for r in cur.fetchall()) if row.seq not in skip][:limit]

    def count_waiting(self, channels: tuple[str, ...]) -> int:
        """How many stacks of ``channels`` still wait for a prediction."""
        where, params = self._waiting_where(channels)
        (n,) = self.db.execute(f"SELECT COUNT(*) FROM stacks WHERE {where}", params).fetchone()
        return int(n)

    def check_scored(self, score: Any) -> None:
        """A check frame's scores against the prediction of its (t, p) (`acquisition.checks`)."""
        self._write("INSERT INTO checks (t, p, structure, pearson, ssim, nrmse, reason, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (score.t, score.p, score.structure, score.pearson, score.ssim, score.nrmse,
                     score.reason, score.at))

    def check_scores(self) -> list[dict[str, Any]]:
        """Every check frame's scores, in time order."""
        cur = self.db.execute("SELECT t, p, structure, pearson, ssim, nrmse, reason, at FROM checks ORDER BY t, p")
        keys = ("t", "p", "structure", "pearson", "ssim", "nrmse", "reason", "at")
        return [dict(zip(keys, row)) for row in cur.fetchall()]

    def note(self, what: str) -> None:
        """A run event worth keeping (start, resume, stop reason)."""
        self._write("INSERT INTO events (at, what) VALUES (?, ?)", (time.time(), what))

    def rows(self) -> list[JournalRow]:
        cur = self.db.execute(
            "SELECT seq, t, p, channel, raw_path, gaps, predicted_path FROM stacks ORDER BY seq"
        )
        return [JournalRow(*r) for r in cur.fetchall()]

    def next_seq(self) -> int:
        (n,) = self.db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM stacks").fetchone()
        return int(n)

    def close(self) -> None:
        self.db.close()

"""``livestain audit RUN``: every planned stack of a run, accounted for.

After three days unattended, "it ran" is not enough: a microscopist needs to know that
every (time point, position, channel) the plan asked for is on disk and readable,
predicted (and by which model), a gap the run recorded with its reason, or missing.
The audit reads the plan from ``run.json``, what happened from ``journal.sqlite`` and
the files themselves (their TIFF structure, not only their names), and says so per
stack; its exit code is 0 only when nothing is missing or unreadable.

It needs no microscope and no torch: run it anywhere the data is.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tifffile
import useq

from livestain.run_reader import header_columns
from livestain.stackio import damage_of, read_info
from livestain.store import is_zarr_ref, read_ref, ref_exists, ref_file

from .journal import Journal, JournalRow

Key = tuple[int, int, str]  # (t, p, channel)

#: Verdicts, from good to bad. ``missing`` and ``unreadable`` fail the audit.
OK, INCOMPLETE, GAP, MISSING, UNREADABLE = "ok", "incomplete", "gap", "missing", "unreadable"


@dataclass
class StackVerdict:
    """What the audit found for one planned (t, p, channel)."""

    t: int
    p: int
    channel: str
    state: str  # ok | incomplete | gap | missing | unreadable
    reason: str = ""
    predicted: str | None = None  # the model that predicted it; "" if predicted, model unread
    prediction_problem: str = ""  # why a streamed stack has no usable prediction


@dataclass
class AuditReport:
    """The audit of one run; `ok` when nothing is missing or unreadable."""

    run_dir: Path
    run_id: str
    planned: int = 0
    counts: Counter = field(default_factory=Counter)
    streamed: int = 0
    predicted_by: Counter = field(default_factory=Counter)
    not_predicted: int = 0
    unjournaled_files: int = 0
    problems: list[StackVerdict] = field(default_factory=list)  # everything but a clean ok
    ended: str = ""
    n_z: int = 1  # planes per stack in the plan
    models: dict[int, str] = field(default_factory=dict)  # seq -> model that predicted it (journal)
    gaps: dict[int, list[int]] = field(default_factory=dict)  # seq -> missing planes (journal)

    @property
    def missing(self) -> int:
        return self.counts[MISSING]

    @property
    def unreadable(self) -> int:
        return self.counts[UNREADABLE]

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.unreadable == 0

    def lines(self, max_problems: int = 20) -> list[str]:
        c = self.counts
        lines = [
            f"run {self.run_id} ({self.run_dir}): {self.planned} stacks planned; {self.ended}",
            f"  on disk and readable: {c[OK] + c[INCOMPLETE]} ({c[INCOMPLETE]} with missing planes, "
            f"each recorded with its reason)",
            f"  recorded gaps (not acquired, with reason): {c[GAP]}",
            f"  missing: {c[MISSING]}   unreadable: {c[UNREADABLE]}",
        ]
        if self.streamed:
            models = ", ".join(f"{m or 'model not recorded'}: {n}" for m, n in self.predicted_by.most_common())
            lines.append(f"  predicted: {sum(self.predicted_by.values())} of {self.streamed} streamed "
                         f"stacks on disk ({models or 'none'}); not predicted: {self.not_predicted}")
        if self.unjournaled_files:
            lines.append(f"  stack files on disk the journal does not list: {self.unjournaled_files} "
                         f"(written just before a crash; --resume acquires that stack again)")
        shown = [v for v in self.problems if v.state in (MISSING, UNREADABLE)] + \
                [v for v in self.problems if v.state not in (MISSING, UNREADABLE)]
        for v in shown[:max_problems]:
            what = v.state if v.state != OK else "not predicted"
            why = v.reason or v.prediction_problem
            lines.append(f"  t {v.t} p {v.p} {v.channel}: {what}: {why}")
        if len(shown) > max_problems:
            lines.append(f"  ... and {len(shown) - max_problems} more (--json lists them all)")
        lines.append("AUDIT PASSED: nothing missing or unreadable" if self.ok else
                     f"AUDIT FAILED: {self.missing} missing, {self.unreadable} unreadable")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "run_id": self.run_id, "ok": self.ok,
            "planned": self.planned, "counts": dict(self.counts), "ended": self.ended,
            "streamed": self.streamed, "predicted_by": dict(self.predicted_by),
            "not_predicted": self.not_predicted, "unjournaled_files": self.unjournaled_files,
            "problems": [v.__dict__ for v in self.problems],
        }


# -- the plan ----------------------------------------------------------------------------
def planned_keys(sequence: useq.MDASequence) -> Iterator[Key]:
    """Every (t, p, channel) the plan acquires a stack for, in acquisition order.

    A plain plan (no sub-sequences, every channel every time point) is counted from its
    sizes: a 3-day plan of 96 positions has 6.6 million events, 414,000 stacks.
    """
    channels = [c.config for c in sequence.channels] or [""]
    plain = (all(c.acquire_every == 1 and c.do_stack for c in sequence.channels)
             and not any(getattr(p, "sequence", None) or getattr(p, "sub_sequence", None)
                        for p in sequence.stage_positions)
             and not sequence.grid_plan)
    if plain:
        n_t = sequence.sizes.get("t", 0) or 1
        n_p = sequence.sizes.get("p", 0) or 1
        yield from ((t, p, c) for t, p, c in itertools.product(range(n_t), range(n_p), channels))
        return
    seen: set[Key] = set()
    for event in sequence.model_copy(update={"z_plan": None}).iter_events():
        key = (event.index.get("t", 0), event.index.get("p", 0),
               event.channel.config if event.channel else "")
        if key not in seen:
            seen.add(key)
            yield key


# -- what happened -------------------------------------------------------------------------
def _connect_read_only(journal_path: Path) -> sqlite3.Connection:
    """Open the journal without writing a byte, even SQLite's own side files.

    A journal whose daemon has ended has no ``-wal`` file: it is read as immutable (no
    ``-shm`` is created, so archives on read-only shares can be audited). A live run's
    journal has one and is read through it, as SQLite requires.
    """
    live = journal_path.with_name(journal_path.name + "-wal").exists()
    mode = "mode=ro" if live else "immutable=1"
    return sqlite3.connect(f"{journal_path.resolve().as_uri()}?{mode}", uri=True)


def _journal_rows(journal_path: Path) -> list[JournalRow]:
    """The journal's stacks, read-only: an audit must never change the run it checks."""
    db = _connect_read_only(journal_path)
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(stacks)")}
        why = "not_predictable" if "not_predictable" in have else "NULL"  # journals from before
        cur = db.execute(f"SELECT seq, t, p, channel, raw_path, gaps, predicted_path, {why} "
                         f"FROM stacks ORDER BY seq")
        return [JournalRow(*r) for r in cur]
    finally:
        db.close()


def _journal_models_and_gaps(journal_path: Path) -> tuple[dict[int, str], dict[int, list[int]]]:
    """seq -> the model (``name@hash``) the journal recorded for its prediction, and
    seq -> the planes missing from a stack with gaps (from its recorded header)."""
    db = _connect_read_only(journal_path)
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(stacks)")}
        models = {int(seq): str(m) for seq, m in db.execute("SELECT seq, model FROM stacks WHERE model IS NOT NULL")
                  } if "model" in have else {}
        gaps: dict[int, list[int]] = {}
        join, stack, _ = header_columns(db)
        if stack != "NULL":
            for seq, info in db.execute(f"SELECT s.seq, {stack} FROM stacks s {join} WHERE s.gaps > 0"):
                if not info:
                    continue
                planes = json.loads(info).get("gaps")
                if isinstance(planes, list):
                    gaps[int(seq)] = planes
        return models, gaps
    finally:
        db.close()


def _run_events(journal_path: Path) -> list[tuple[float, str]]:
    db = _connect_read_only(journal_path)
    try:
        return [(float(at), str(what)) for at, what in db.execute("SELECT at, what FROM events ORDER BY at")]
    finally:
        db.close()


def _how_it_ended(events: list[tuple[float, str]]) -> tuple[str, str | None]:
    """(a line for the report, the reason for stacks never acquired or None if unexplained).

    The journal notes each start/resume, a stop request, a stop with its cause, and the
    end; the last session decides why stacks after it were never taken.
    """
    last_start = max((i for i, (_, w) in enumerate(events) if w in ("start", "resume")), default=-1)
    session = [w for _, w in events[last_start + 1:]] if last_start >= 0 else []
    stopped = [w for w in session if w.startswith("stopped: ")]
    if "end" not in session:
        return ("the last session did not end cleanly (the daemon was killed or the computer went "
                "down): `--resume` continues it", None)
    if stopped:
        cause = stopped[-1].removeprefix("stopped: ")
        return (f"stopped by an error: {cause}", f"not acquired: the run was stopped by an error ({cause})")
    if "stop requested" in session:
        return ("stopped early on request (livestain stop, SIGTERM or Ctrl-C)",
                "not acquired: the run was stopped on request before this stack")
    return ("the plan ran to its end", None)


def _file_problem(ref: Path, deep: bool) -> str | None:
    """Why a stack cannot be used, or None. ``deep``: check its TIFF structure, or read
    its Zarr chunk back."""
    path = ref_file(ref)
    if path is None or not path.is_file():
        return "the file is gone" if not is_zarr_ref(ref) else "its chunk is not in the Zarr image"
    if path.stat().st_size == 0:
        return "the file is empty"
    if not deep:
        return None
    if is_zarr_ref(ref):
        try:
            read_ref(ref)
        except Exception as e:
            return f"its chunk cannot be read ({e})"
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            return damage_of(tif)
    except Exception as e:  # any reader failure is the verdict, not a crash of the audit
        return f"not a readable TIFF ({e})"


def _model_of(path: Path) -> str:
    if is_zarr_ref(path):
        return ""  # a chunk carries no header: the journal's model column says (`_models`)
    try:
        with tifffile.TiffFile(path) as tif:
            return str(read_info(tif).get("model", ""))
    except Exception:
        return ""


def audit_run(run_dir: str | Path, deep: bool = True,
              progress: Callable[[int, int], None] | None = None) -> AuditReport:
    """Check a run against its plan; ``deep=False`` only checks that files exist and are
    not empty (fast for huge runs), otherwise each file's TIFF structure is read too."""
    run_dir = Path(run_dir)
    marker = run_dir / "run.json"
    if not marker.is_file():
        raise FileNotFoundError(f"{run_dir} holds no run.json: it is not a livestain run folder")
    run = json.loads(marker.read_text())
    try:
        sequence = useq.MDASequence.model_validate(run["sequence"])
    except Exception as e:
        raise ValueError(f"{marker} has no readable plan ({e}); was it edited by hand?") from None
    streamed = set((run.get("policies") or {}).get("stream_channels") or ["Brightfield"])
    journal_path = run_dir / Journal.FILENAME
    if not journal_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {Journal.FILENAME}: nothing was recorded")
    rows = _journal_rows(journal_path)
    models, gaps = _journal_models_and_gaps(journal_path)
    ended, untaken_reason = _how_it_ended(_run_events(journal_path))
    report = AuditReport(run_dir, str(run.get("run_id", "?")), ended=ended,
                         n_z=sequence.sizes.get("z", 1) or 1, models=models,
                         gaps=gaps)
    by_key: dict[Key, list] = {}
    for row in rows:
        by_key.setdefault((row.t, row.p, row.channel), []).append(row)
    keys = list(planned_keys(sequence))
    report.planned = len(keys)
    journaled = {Path(r.raw_path).name for r in rows}
    for i, key in enumerate(keys):
        if progress is not None and i % 200 == 0:
            progress(i, len(keys))
        verdict = _judge(key, by_key.get(key, []), key[2] in streamed, untaken_reason, deep, report)
        report.counts[verdict.state] += 1
        if verdict.state != OK or verdict.prediction_problem:
            report.problems.append(verdict)
    if progress is not None:
        progress(len(keys), len(keys))
    report.unjournaled_files = sum(1 for f in run_dir.glob("p[0-9][0-9][0-9]/t*_*.ome.tif")
                                   if not f.name.endswith("_prediction.ome.tif") and f.name not in journaled)
    return report


def _judge(key: Key, rows: list, streamed: bool, untaken_reason: str | None, deep: bool,
           report: AuditReport) -> StackVerdict:
    t, p, channel = key
    v = StackVerdict(t, p, channel, OK)
    if not rows:
        if untaken_reason:
            v.state, v.reason = GAP, untaken_reason
        else:
            v.state = MISSING
            v.reason = ("planned but never acquired: `--resume` acquires it" if "killed" in report.ended
                        else "planned but never acquired, and the run recorded no reason")
        return v
    row = rows[-1]
    raw = row.raw_in(report.run_dir)  # by the layout: runs are moved, and demo paths are relative
    if (problem := _file_problem(raw, deep)) is not None:
        v.state, v.reason = UNREADABLE if ref_exists(raw) else MISSING, f"{raw.name}: {problem}"
        return v
    if row.gaps >= report.n_z:  # every plane failed: a recorded gap with nothing to predict
        v.state = INCOMPLETE
        v.reason = "every plane failed: the camera failed every retry (recorded in the file)"
        return v
    if row.gaps:
        v.state = INCOMPLETE
        gaps = report.gaps.get(row.seq) or (_header_gaps(raw) if deep else None)
        v.reason = (f"planes {gaps} missing: the camera failed every retry (recorded in the file)"
                    if gaps else f"{row.gaps} plane(s) missing: the camera failed every retry")
    if streamed:
        report.streamed += 1
        pred = row.prediction_in(report.run_dir)
        pred_problem = _file_problem(pred, deep) if pred is not None else "never predicted"
        if pred_problem is None:
            v.predicted = (report.models.get(row.seq) or _model_of(pred)) if deep else ""
            report.predicted_by[v.predicted] += 1
        else:
            report.not_predicted += 1
            if row.not_predictable:
                v.prediction_problem = (f"not predictable: {row.not_predictable} (fix the cause, then "
                                        f"`livestain predict-run` predicts it)")
            else:
                v.prediction_problem = (f"not predicted ({pred_problem}): `livestain run --resume` or "
                                        f"`livestain predict-run` predicts it")
    return v


def _header_gaps(path: Path) -> list[int] | None:
    if is_zarr_ref(path):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            gaps = read_info(tif).get("gaps")
    except Exception:
        return None
    return gaps if isinstance(gaps, list) else None

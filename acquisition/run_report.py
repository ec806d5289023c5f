"""``OUT/summary.json``: what a run did and how far its predictions can be trusted.

Written at the end of every run (and of every resumed session, replacing the last), from
the journal, so it covers the whole dataset, not only this session: stacks acquired,
predicted, late, lost; every check frame with its reason and scores, and live r per
structure over time; the fluorescence light used as a fraction of the same run with
fluorescence at every time point; the models used and when they changed; the focus
track of every position. One file a microscopist (or a script) reads the morning after.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .journal import Journal

FILENAME = "summary.json"


def _focus_tracks(journal: Journal) -> dict[str, list[dict[str, Any]]]:
    cur = journal.db.execute(
        "SELECT t, p, focus_offset_um, z_correction_um FROM stacks "
        "WHERE focus_offset_um IS NOT NULL OR z_correction_um IS NOT NULL ORDER BY p, t")
    tracks: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t, p, offset, correction in cur.fetchall():
        tracks[str(p)].append({"t": t, "offset_um": offset, "z_correction_um": correction})
    return dict(tracks)


def _stack_counts(journal: Journal, stream_channels: tuple[str, ...]) -> dict[str, int]:
    marks = ",".join("?" * len(stream_channels)) or "''"
    (acquired, streamed, predicted, incomplete, unpredictable) = journal.db.execute(
        f"SELECT COUNT(*), SUM(channel IN ({marks})), COUNT(predicted_path), SUM(gaps > 0), "
        f"COUNT(not_predictable) FROM stacks", stream_channels).fetchone()
    return {"acquired": acquired or 0, "streamed": streamed or 0, "predicted": predicted or 0,
            "with_missing_planes": incomplete or 0, "not_predictable": unpredictable or 0,
            "not_predicted": (streamed or 0) - (predicted or 0)}


def _check_report(scores: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in scores:
        by[s["structure"]].append(s)
    out = {}
    for structure, rows in by.items():
        rs = [r["pearson"] for r in rows if r["pearson"] is not None and math.isfinite(r["pearson"])]
        out[structure] = {
            "count": len(rows),
            "mean_pearson": round(sum(rs) / len(rs), 4) if rs else None,
            "worst_pearson": min(rs) if rs else None,
            "live_r": [{"t": r["t"], "p": r["p"], "pearson": r["pearson"], "ssim": r["ssim"],
                        "nrmse": r["nrmse"], "reason": r["reason"]} for r in rows],
        }
    return out


def write_summary(out_dir: Path, journal: Journal, session: dict[str, Any], status: dict[str, Any],
                  stream_channels: tuple[str, ...]) -> Path:
    """Write ``summary.json`` atomically (a crash mid-write leaves the previous one)."""
    out_dir = Path(out_dir)
    try:
        run = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        run = {}
    used, full = status.get("fluorescence_dose_ms"), status.get("equivalent_fluorescence_run_dose_ms")
    report = {
        "run_id": run.get("run_id", status.get("run_id")),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ended": "stopped: " + session["error"] if session.get("error") else "plan complete",
        "stacks": _stack_counts(journal, stream_channels) | {"planned": status.get("stacks_total")},
        "this_session": session,
        "checks": {"every": status.get("checks_every"), "structures": _check_report(journal.check_scores())},
        "fluorescence_dose": {
            "used_ms": used, "same_run_with_fluorescence_ms": full,
            "fraction": round(float(used) / float(full), 5) if used is not None and full else None,
        },
        "models": {"model": run.get("model"), "changes": run.get("model_changes", [])},
        "focus": {"tracking": status.get("track_focus"), "positions": _focus_tracks(journal)},
        "confidence": {k: status.get(k) for k in ("low_confidence_stacks", "flagged_stacks") if k in status},
    }
    path = out_dir / FILENAME
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    return path

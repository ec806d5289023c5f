"""What the soak measures of a live run, from outside its processes (Linux /proc).

Everything here reads; nothing talks to the daemon except `status_s`, which times the
same ``status`` command ``livestain status`` sends.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from livestain.acquisition.control import send_command


def rss_mb(pid: int | None) -> float | None:
    """Resident set size in MB, None when the process is gone."""
    return _status_field(pid, "VmRSS:", 1024)


def threads(pid: int | None) -> int | None:
    return _status_field(pid, "Threads:", 1)


def _status_field(pid: int | None, key: str, div: int) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                v = int(line.split()[1])
                return round(v / div, 1) if div != 1 else v
    except (OSError, ValueError):
        return None
    return None


def open_fds(pid: int | None) -> int | None:
    """Open file descriptors (sockets, files, shared memory mappings' fds)."""
    if not pid:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def shm_segments() -> tuple[int, float]:
    """Python shared-memory segments in /dev/shm (``psm_*``): count and MB."""
    try:
        segs = [e for e in os.scandir("/dev/shm") if e.name.startswith("psm_")]
    except OSError:
        return 0, 0.0
    return len(segs), round(sum(e.stat().st_size for e in segs) / 1e6, 2)


def folder_mb(out: Path, pattern: str) -> float:
    return round(sum(p.stat().st_size for p in out.glob(pattern) if p.is_file()) / 1e6, 2)


def journal_timings(out: Path, full: bool) -> dict[str, float | int]:
    """Size of the journal, and how long its queries take on a second connection.

    ``next_seq`` runs per start; ``rows`` (every stack) and the predicted/unpredicted
    split are what ``--resume`` reads; a per-stack insert is timed by the daemon itself
    (not here: this process must not write a live run's journal).
    """
    path = out / "journal.sqlite"
    result: dict[str, float | int] = {
        "journal_mb": round(sum(p.stat().st_size for p in out.glob("journal.sqlite*")) / 1e6, 2)}
    if not path.exists():
        return result
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        t = time.perf_counter()
        db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM stacks").fetchone()
        result["next_seq_ms"] = round((time.perf_counter() - t) * 1e3, 3)
        t = time.perf_counter()
        db.execute("SELECT seq FROM stacks WHERE seq = (SELECT MAX(seq) FROM stacks)").fetchone()
        result["row_by_seq_ms"] = round((time.perf_counter() - t) * 1e3, 3)
        if full:
            t = time.perf_counter()
            rows = db.execute("SELECT seq, t, p, channel, raw_path, gaps, predicted_path "
                              "FROM stacks ORDER BY seq").fetchall()
            result["rows_ms"] = round((time.perf_counter() - t) * 1e3, 1)
            result["rows"] = len(rows)
    except sqlite3.Error:
        pass
    finally:
        db.close()
    return result


def status_s(endpoint: str) -> tuple[float | None, dict | None]:
    """Seconds the daemon took to answer ``status`` (None: no answer in 5 s)."""
    t = time.perf_counter()
    try:
        reply = send_command(endpoint, "status", timeout_s=5.0)
    except (TimeoutError, OSError):
        return None, None
    return round(time.perf_counter() - t, 4), reply

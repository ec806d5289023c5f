"""How a run ends: its figures (`RunSummary`), and the error that stops it (`RunStopped`).

Every part of the daemon that writes (stacks, predictions, the journal) turns a failed
write into a `RunStopped` whose message says what is intact and what to do, so the
user reads one sentence, not a traceback, and the run's exit code is 3.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class RunStopped(RuntimeError):
    """The run cannot go on (disk full, write error); the message says why and what to do."""


@dataclass
class RunSummary:
    """End-of-run figures, printed by ``livestain demo``/``run`` and returned to scripts."""

    run_id: str
    out_dir: Path
    acquired: int = 0
    predicted: int = 0
    predicted_late: int = 0
    incomplete: int = 0
    #: the most recent live latencies (a run of days keeps the last ``LATENCIES_KEPT``;
    #: the mean covers every one, through ``latency_count`` and ``latency_total_s``)
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=RunSummary.LATENCIES_KEPT))
    latency_count: int = 0
    latency_total_s: float = 0.0
    stopped_early: bool = False
    error: str | None = None
    not_predicted: int = 0
    unreadable: int = 0
    failed: int = 0  # stacks the workers could not predict (after retrying)

    LATENCIES_KEPT = 1000

    def add_latency(self, seconds: float) -> None:
        """One live prediction's latency: in the running mean, and among the recent ones."""
        self.latencies_s.append(seconds)
        self.latency_count += 1
        self.latency_total_s += seconds

    @property
    def mean_latency_s(self) -> float:
        """Mean over every live prediction of the run (not only the recent ones kept)."""
        return self.latency_total_s / self.latency_count if self.latency_count else float("nan")

    def session_figures(self) -> dict:
        """This session's counts for ``summary.json``."""
        return {"acquired": self.acquired, "predicted": self.predicted,
                "predicted_late": self.predicted_late, "not_predicted": self.not_predicted,
                "failed": self.failed, "unreadable": self.unreadable,
                "mean_latency_s": round(self.mean_latency_s, 3) if self.latency_count else None,
                "error": self.error}

    def status(self) -> dict:
        """The summary's share of the run's status (`livestain.run_status.RunStatus`)."""
        return {"stacks_acquired": self.acquired, "stacks_predicted": self.predicted,
                "stacks_predicted_late": self.predicted_late, "stacks_failed": self.failed,
                "error": self.error, "out_dir": str(self.out_dir)}

    def lines(self) -> list[str]:
        lines = [
            f"run {self.run_id}: {self.acquired} stacks acquired, {self.predicted} predicted "
            f"({self.predicted_late} caught up from disk), {self.not_predicted} not predicted"
            + (f", {self.incomplete} incomplete" if self.incomplete else "")
            + (f", {self.failed} could not be predicted" if self.failed else "")
            + (" (stopped early)" if self.stopped_early else ""),
            f"mean latency, stack complete -> prediction written: {self.mean_latency_s:.2f} s",
            f"data: {self.out_dir}",
        ]
        if self.error:
            lines.append(f"STOPPED: {self.error}")
        return lines


def write_fix(error: OSError) -> str:
    """What the user should do about a failed write, by its cause."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space"
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return "raise the open-file limit (`ulimit -n`) or stop other programs holding many files"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the data folder writable"
    return "fix the disk"


@contextmanager
def stop_on_journal_error(intact: str = "Raw stacks and predictions so far are intact") -> Iterator[None]:
    """A journal write that fails (a full disk, mostly) stops the run with what is intact
    and what to do, never with a traceback."""
    try:
        yield
    except OSError as e:
        raise RunStopped(f"{e}. {intact}; free some space and continue with --resume.") from None

"""Adaptation during a run: fine-tune on check frames in a child process, swap, roll back.

With ``policies.adapt`` the daemon starts ``livestain adapt OUT`` (`inference.adapt`: a
separate process on the worker's host and device, never torch inside the daemon) once
``adapt_after_checks`` new check frames are scored. When the job's candidate validates
better on the latest check frame (held out), the workers are swapped to it through the
``swap`` callback (the session restarts its worker on the new model; whatever the old
one held is re-sent, so no stack is dropped). Every prediction names the model that made
it (its file's metadata and the journal), ``run.json`` records each change, and if the
first check frame after a swap scores worse than the last one before it by more than
``ROLLBACK_MARGIN``, the previous model comes back.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .supervisor import spawn_cli

log = logging.getLogger(__name__)


@dataclass
class ModelVersion:
    """A model the run used: its path (None: bundled), name (``stem@hash``) and why."""

    path: str | None
    name: str
    why: str = "started with"
    r_before: float | None = None  # the check r that made the change, when adapted


@dataclass
class Adaptation:
    """Starts fine-tune jobs, reads their verdicts, swaps and rolls back (see the module).

    Parameters
    ----------
    out_dir : Path
        The run's dataset folder (jobs write ``models/`` there).
    model : ModelVersion
        The model the run starts with.
    swap : callable
        ``swap(path or None)`` puts every worker on that model (None: bundled).
    after_checks : int
        New check frames that start a job.
    steps : int
        Fine-tuning steps per job.
    device : str | None
        The job's torch device.
    """

    out_dir: Path
    model: ModelVersion
    swap: Callable[[str | None], None]
    report: Callable[[str], None] = print
    after_checks: int = 2
    steps: int = 60
    device: str | None = None
    versions: list[ModelVersion] = field(default_factory=list)
    rounds: int = 0
    rollbacks: int = 0
    _job: subprocess.Popen | None = None
    _new_checks: int = 0
    _last_r: float | None = None
    _judging: ModelVersion | None = None  # a swapped-in model whose first check is awaited

    #: A check r after a swap this much below the last one before it undoes the swap.
    ROLLBACK_MARGIN = 0.05

    def __post_init__(self) -> None:
        self.versions.append(self.model)

    @property
    def running(self) -> bool:
        return self._job is not None and self._job.poll() is None

    def on_check(self, pearson: float) -> None:
        """A check frame was scored: judge a fresh swap, maybe start a job."""
        if self._judging is not None:
            previous = self.versions[-2]
            if self._judging.r_before is not None and pearson < self._judging.r_before - self.ROLLBACK_MARGIN:
                self.rollbacks += 1
                self.report(f"model {self._judging.name} scores r {pearson:.2f} on its first check frame, worse "
                            f"than {self._judging.r_before:.2f} before it: rolling back to {previous.name}")
                self._use(ModelVersion(previous.path, previous.name, f"rolled back from {self._judging.name}"))
            self._judging = None
        self._last_r = pearson
        self._new_checks += 1
        if not self.running and self._new_checks >= self.after_checks:
            self._start()

    def _start(self) -> None:
        self.rounds += 1
        self._new_checks = 0
        folder = self.out_dir / "models"
        folder.mkdir(exist_ok=True)
        self._verdict = folder / f"adapt-{self.rounds:03d}.json"
        args = ["adapt", str(self.out_dir), "--model", self.model.path or "bundled", "--round", str(self.rounds),
                "--steps", str(self.steps), "--json", str(self._verdict)]
        if self.device:
            args += ["--device", self.device]
        logfile = open(folder / f"adapt-{self.rounds:03d}.log", "w")  # noqa: SIM115 (the child writes it)
        self._job = spawn_cli(args, stdout=logfile, stderr=subprocess.STDOUT)
        logfile.close()
        self.report(f"adapting: fine-tuning {self.model.name} on the check frames so far (round {self.rounds}, "
                    f"{self.steps} steps, pid {self._job.pid}; log in models/adapt-{self.rounds:03d}.log)")

    def poll(self) -> None:
        """Cheap while a job runs; when it has ended, act on its verdict."""
        if self._job is None or self._job.poll() is None:
            return
        code, self._job = self._job.returncode, None
        try:
            verdict = json.loads(self._verdict.read_text())
        except (OSError, ValueError) as e:
            self.report(f"adaptation round {self.rounds} failed (exit {code}: {e}); the model stays "
                        f"{self.model.name}; see models/adapt-{self.rounds:03d}.log")
            return
        if not verdict.get("improved"):
            self.report(f"adaptation round {self.rounds}: {verdict.get('why', 'no gain')}")
            return
        before, after = verdict.get("r_before", {}), verdict.get("r_after", {})
        self.report(f"adaptation round {self.rounds}: held-out check r {before} -> {after}; swapping the "
                    f"workers to {verdict['name']}")
        self._judging = ModelVersion(verdict["path"], verdict["name"], f"adapted (round {self.rounds})",
                                     r_before=self._last_r)
        self._use(self._judging)

    def _use(self, version: ModelVersion) -> None:
        self.model = version
        self.versions.append(version)
        self.swap(version.path)

    def stop(self) -> None:
        """The run ends: a job still running is of no use any more."""
        if self.running and self._job is not None:
            self._job.terminate()
            try:
                self._job.wait(10)
            except subprocess.TimeoutExpired:
                self._job.kill()

    def status(self) -> dict[str, Any]:
        return {"model_version": self.model.name,
                "adaptation": {"rounds": self.rounds, "running": self.running, "rollbacks": self.rollbacks,
                               "versions": [{"name": v.name, "why": v.why} for v in self.versions[-20:]]}}

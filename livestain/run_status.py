"""The daemon's status: one typed model for the control reply, ``status --json`` and the window.

Every reply of the daemon's control socket (to ``status``, ``pause``, ``resume``,
``stop``) carries a full status: ``{"schema", "kind": "reply", "ok", ...RunStatus}``.
The daemon builds it through `RunStatus`, whose fields forbid anything undeclared, so
a key the daemon adds without declaring it fails its tests instead of silently drifting
from what clients read (the window once read ``stacks_total`` and ``dose``, which no
daemon sent). Clients read it with `RunStatus.from_reply`, which keeps what it knows
and ignores fields of a newer daemon, so an older viewer keeps working.

Part of the wire contract (`livestain.wire` re-exports it; docs/wire.md lists the fields).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FocusAt(_Strict):
    """Where a position's cells were in its latest brightfield stack (focus tracking)."""

    t: int
    offset_um: float | None = Field(description="cells' focal plane from the stack's centre; None: not found")
    taken_at_um: float = Field(description="z of the stack's centre")
    correction_um: float = Field(description="focus-tracking correction applied to the plan's z")


class ConfidenceAt(_Strict):
    """The latest prediction's confidence (0-1) and the input checks' flags with reasons."""

    t: int
    p: int
    confidence: float
    flags: list[str]
    reasons: list[str]


class CheckScoreAt(_Strict):
    """A check frame's scores: the real fluorescence against the prediction of its (t, p)."""

    t: int
    p: int
    pearson: float | None
    ssim: float | None
    nrmse: float | None
    reason: str = Field(description="why this check frame was taken (schedule, low confidence, low r)")


class CheckCount(_Strict):
    count: int
    last: CheckScoreAt | None


class ModelVersionAt(_Strict):
    name: str
    why: str


class AdaptationState(_Strict):
    rounds: int
    running: bool
    rollbacks: int
    versions: list[ModelVersionAt]


class RunStatus(_Strict):
    """What a daemon says about its run. Counts are stacks (one channel at one (t, p))."""

    run_id: str = Field(description="the run's id (also in run.json and every header)")
    state: Literal["acquiring", "paused", "finishing", "stopped"] = Field(
        description="stopped: after an error (see error); finishing: the plan is done, predictions drain")
    current_t: int | None = Field(None, description="time point of the newest stack")
    current_p: int | None = Field(None, description="position of the newest stack")
    error: str | None = Field(None, description="why the run stopped, with the fix")
    out_dir: str = Field(description="the run folder on the daemon's host")
    # progress
    stacks_acquired: int = Field(description="written to disk and recorded (all channels)")
    stacks_predicted: int = Field(description="predictions written")
    stacks_predicted_late: int = Field(description="predicted from disk after falling behind")
    stacks_late: int = Field(description="on disk, waiting for a worker to catch up")
    stacks_in_flight: int = Field(description="held by a worker now")
    stacks_sent: int = Field(description="handed to workers, retries included")
    stacks_dropped: int = Field(description="left the live queue for catch-up (newest first)")
    stacks_failed: int = Field(description="recorded as not predictable after the worker's failures")
    stacks_total: int = Field(description="every stack of the plan, all channels")
    stacks_done_before: int = Field(description="on disk before a --resume")
    backlog: int = Field(description="stacks waiting for a free worker in the live queue")
    timepoints: int = Field(description="time points in the plan")
    positions: int = Field(description="stage positions in the plan")
    # peers
    workers_idle: int = Field(description="workers that asked for work and got none yet")
    worker_heartbeats_s: dict[str, float] = Field(description="seconds since each worker's last 'ready'")
    worker_pid: int | None = Field(None, description="the (first) local worker's process (None: remote workers only)")
    worker_alive: bool | None = Field(None, description="every local worker is running")
    worker_restarts: int | None = Field(None, description="times the local workers were restarted, in all")
    worker_pids: list[int] | None = Field(None, description="every local worker's process (worker.count of the run config)")
    malformed_results: int = Field(description="undecodable or unauthenticated results, dropped")
    malformed_commands: int = Field(description="undecodable control requests, answered with an error")
    unauthenticated_messages: int = Field(description="ready messages and predictions without the worker token")
    snap_retries: int = Field(description="camera snaps that failed and were retried")
    snap_failures: int = Field(description="planes whose every retry failed (recorded gaps)")
    # machine
    disk_free_bytes: int = Field(description="free space on the run folder's disk")
    uptime_s: float = Field(description="seconds since the daemon started")
    # trust: the model's confidence and input checks
    last_confidence: ConfidenceAt | None = Field(None, description="the newest prediction's confidence and flags")
    low_confidence_stacks: int = Field(0, description="predictions with confidence < 0.5")
    flagged_stacks: int = Field(0, description="predictions whose input checks raised a flag")
    confidence_by_position: dict[str, float] = Field(default_factory=dict,
                                                       description="position -> its latest confidence")
    # focus
    focus_mode: str = Field(description="off, brightfield (tracked from the stacks) or hardware autofocus (DEVICE)")
    track_focus: bool = Field(description="policies.track_focus: stacks re-centred on the cells")
    focus: dict[str, FocusAt] = Field(default_factory=dict, description="position -> latest focus")
    # check frames (policies.checks)
    checks: dict[str, CheckCount] = Field(default_factory=dict, description="structure -> check frames")
    checks_every: int | None = Field(None, description="policies.checks.every (None: no check frames)")
    checks_on_doubt: int = Field(0, description="check frames taken on low confidence or low r")
    checks_on_doubt_left: int | None = Field(None, description="more the dose budget allows")
    checks_requested: dict[str, str] = Field(default_factory=dict,
                                             description="position -> why a check frame is asked for next")
    # adaptation (policies.adapt)
    model_version: str | None = Field(None, description="the model predicting now (policies.adapt)")
    model_name: str | None = Field(None, description="the model the run started with (name@hash)")
    model_validation_r: dict[str, float] | None = Field(
        None, description="that model's Pearson r per structure on its own validation fields (from its checkpoint): "
                          "the confidence is relative to it")
    adaptation: AdaptationState | None = Field(None, description="fine-tuning rounds, rollbacks, versions")
    # light
    fluorescence_dose_ms: float | None = Field(None, description="fluorescence exposure so far (check frames)")
    equivalent_fluorescence_run_dose_ms: float = Field(description="the same run with fluorescence at every stack")
    dose_note: str = Field(description="how the equivalent dose is counted")

    @classmethod
    def from_reply(cls, body: dict[str, Any]) -> RunStatus:
        """A status from a control reply's body (``ok`` and ``schema`` dropped), ignoring
        fields this version does not know (a newer daemon); ValidationError otherwise."""
        known = {k: v for k, v in body.items() if k in cls.model_fields}
        unknown = sorted(set(body) - set(known) - {"schema", "kind", "ok"})
        if unknown:
            log.debug("status fields this livestain does not know (a newer daemon?): %s", ", ".join(unknown))
        return cls.model_validate(known)


def fields_table() -> str:
    """The Markdown table of `RunStatus` fields that docs/wire.md carries (a test keeps
    the two equal)."""
    rows = ["| field | type | meaning |", "|---|---|---|"]
    for name, field in RunStatus.model_fields.items():
        kind = str(field.annotation).replace("typing.", "").replace(f"{__name__}.", "")
        kind = kind.replace("<class '", "").replace("'>", "")
        rows.append(f"| `{name}` | `{kind}` | {field.description or ''} |")
    return "\n".join(rows)

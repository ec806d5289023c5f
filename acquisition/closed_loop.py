"""What keeps a run's predictions honest while it runs: focus, check frames, adaptation.

The daemon tells the loop about each stack it writes and each prediction it records;
the loop answers with what the run should do about them:

* **focus** (`FocusTracker`): where each brightfield stack's cells are, recorded with the
  stack, and with ``policies.track_focus`` the z correction the position's next stacks
  get (or useq's ``autofocus_plan`` where the scope has a hardware autofocus);
* **check frames** (`CheckScorer`): real fluorescence at some time points, scored against
  the prediction of the same (t, p); on doubt (low confidence, low r) one more at the
  position's next time point, within the light budget;
* **adaptation** (`Adaptation`): check pairs fine-tune the model off the daemon's
  process; a better model is swapped in, a worse one rolled back, both recorded.

It holds no sockets and writes no stacks: the daemon stays the one writer of the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import useq

from livestain.focus import FocusEstimate, locate_cells

from .adaptation import Adaptation, ModelVersion
from .checks import CheckScore, CheckScorer, check_channel_of, doubt_checks, extra_checks_allowed
from .focus_tracking import FocusTracker, tracked_events
from .policies import Policies
from .run_events import WrittenPrediction, WrittenStack
from .run_folder import MARKER, write_json_atomically
from .stacks import Stack

log = logging.getLogger(__name__)


@dataclass
class LoopHost:
    """What the loop needs from its daemon: where to say things and what to record."""

    out_dir: Path
    report: Callable[[str], None]  # a line for the console and the run's log
    note: Callable[[str], None]  # a run event for the journal
    journal_check: Callable[[CheckScore], None]  # a check frame's scores into the journal
    current_seq: Callable[[], int]  # the next stack's sequence number
    where: Callable[[int, int], str]  # "[t 3/10 p 1/2]"
    stack_added: Callable[[tuple[int, int, str]], None]  # a check stack on doubt joined the plan


class ClosedLoop:
    """Focus tracking, check frames and adaptation of one run (see the module doc)."""

    def __init__(self, host: LoopHost, sequence: useq.MDASequence, policies: Policies, *,
                 focus_mode: str, channel_presets: list[str], n_t: int, n_p: int, n_predicted: int,
                 model: dict[str, Any] | None, swap_model: Callable[[str | None], None] | None) -> None:
        self.host = host
        self.sequence = sequence
        self.policies = policies
        self.stream_channels = tuple(policies.stream_channels)
        self.focus_mode = focus_mode
        self.focus = FocusTracker(focus_mode == "brightfield", policies.focus_max_step_um,
                                  policies.focus_deadband_um)
        self.checks: CheckScorer | None = None
        if policies.checks is not None:
            self.checks = CheckScorer(
                policies.checks,
                {check_channel_of(policies.checks, s, channel_presets): s for s in policies.checks.structures},
                extra_checks_allowed(policies.checks, n_t, n_p, n_predicted,
                                     policies.equivalent_fluorescence_exposure_ms))
        self._budget_spent_said = False
        self.adaptation: Adaptation | None = None
        self._swap_to = swap_model
        if policies.adapt:
            if swap_model is None:
                raise ValueError("policies.adapt needs workers the daemon can move to a new model "
                                 "(a local worker); with remote workers, leave adapt off")
            model = model or {}
            self.adaptation = Adaptation(host.out_dir, ModelVersion(model.get("path"), model.get("name", "bundled")),
                                         swap=self._swap_model, report=host.report,
                                         after_checks=policies.adapt_after_checks, steps=policies.adapt_steps)

    # -- the plan -------------------------------------------------------------------

    def events(self, events: Iterable[useq.MDAEvent], mda: Any) -> Iterable[useq.MDAEvent]:
        """The plan's events with check stacks on doubt added and each stack moved to its
        position's latest focus correction."""
        events = self._with_doubt_checks(events)
        if self.focus.enabled:
            events = tracked_events(events, self.focus, mda)
        return events

    def _with_doubt_checks(self, events: Iterable[useq.MDAEvent]) -> Iterable[useq.MDAEvent]:
        policy = self.policies.checks
        if self.checks is None or policy is None or (policy.when_unsure is None and policy.when_r_below is None):
            return events
        index = {c.config: i for i, c in enumerate(self.sequence.channels)}
        channels = {c.config: c.model_copy(update={"acquire_every": 1})
                    for c in self.sequence.channels if self.checks.is_check_channel(c.config)}
        return doubt_checks(events, self.checks, self.stream_channels, channels, index, self.host.stack_added)

    # -- what the daemon tells it ---------------------------------------------------

    def track_focus(self, stack: Stack, voxel_z_um: float) -> dict[str, Any] | None:
        """Where this brightfield stack's cells are (`livestain.focus`), for its metadata
        and the journal; with ``track_focus`` the position's next stacks move to centre
        them. None for channels that are not streamed."""
        if stack.channel not in self.stream_channels:
            return None
        taken_with = self.focus.correction_of(stack.t, stack.p)
        if stack.gaps:
            estimate = FocusEstimate(None, None, float("inf"), "planes missing: focus not estimated")
        else:
            estimate = locate_cells(stack.planes, voxel_z_um)  # also cells at or just beyond its end
        move = self.focus.observe(stack.t, stack.p, estimate)
        if move.moved_um:
            self.host.report(f"{self.host.where(stack.t, stack.p)} focus: cells {estimate.offset_um:+.1f} um from "
                             f"the stack's centre; next stacks of this position move {move.moved_um:+.1f} um "
                             f"(z correction {move.correction_um:+.1f} um)")
        return estimate.to_dict() | {"z_correction_um": round(taken_with, 3),
                                     "next_z_correction_um": round(move.correction_um, 3)}

    def on_stack_written(self, written: WrittenStack) -> None:
        """`RunEvents.stack_written`: a check frame's fluorescence waits for its prediction."""
        if self.checks is not None:
            stack = written.stack
            self._record(self.checks.stack_written(stack.t, stack.p, stack.channel, written.ref))

    def on_prediction_written(self, written: WrittenPrediction) -> None:
        """`RunEvents.prediction_written`: scored against a waiting check frame; an unsure
        one asks for a check frame at its position's next time point."""
        if self.checks is None:
            return
        t, p, confidence = written.t, written.p, written.confidence
        self._record(self.checks.prediction_written(t, p, written.ref, written.structures))
        unsure = self.policies.checks.when_unsure if self.policies.checks else None
        if unsure is not None and confidence is not None and confidence < unsure:
            self._request_check(t, p, f"confidence {confidence:.2f} < {unsure:g}")

    def poll(self) -> None:
        """A turn of the daemon's loop: a finished fine-tuning round is taken up."""
        if self.adaptation is not None:
            self.adaptation.poll()

    def stop(self) -> None:
        if self.adaptation is not None:
            self.adaptation.stop()

    def status(self) -> dict[str, Any]:
        return ({"focus_mode": self.focus_mode} | self.focus.status()
                | (self.checks.status() if self.checks else {})
                | (self.adaptation.status() if self.adaptation else {}))

    # -- check frames ---------------------------------------------------------------

    def _request_check(self, t: int, p: int, reason: str) -> None:
        """Fluorescence on doubt: a check frame at position ``p``'s next time point."""
        if self.checks is None or p in self.checks.requests:
            return
        where = self.host.where(t, p)
        if self.checks.request(p, reason):
            self.host.report(f"{where} {reason}: a check frame of {', '.join(self.checks.policy.structures)} "
                             f"is taken at this position's next time point")
        elif not self._budget_spent_said:
            self._budget_spent_said = True
            self.host.report(f"{where} {reason}, but the check frames' light budget (checks.dose_budget "
                             f"{self.checks.policy.dose_budget:.1%}) is spent: no more check frames on doubt")

    def _record(self, scores: list[CheckScore]) -> None:
        """Journal and report check-frame scores; a low one asks for another check."""
        for score in scores:
            self.host.journal_check(score)
            self.host.report(f"{self.host.where(score.t, score.p)} check {score.structure}: prediction vs real "
                             f"fluorescence r {score.pearson:.2f}, SSIM {score.ssim:.2f}, "
                             f"NRMSE {score.nrmse:.2f} ({score.reason})")
            if self.adaptation is not None:
                self.adaptation.on_check(score.pearson)
            threshold = self.policies.checks.when_r_below if self.policies.checks else None
            if threshold is not None and score.pearson < threshold:
                self._request_check(score.t, score.p,
                                    f"check r {score.pearson:.2f} < {threshold:g} ({score.structure})")
        if self.checks is not None and self.checks.failed:
            for problem in self.checks.failed:
                self.host.report(f"check frame not scored: {problem}")
            self.checks.failed.clear()

    # -- adaptation -----------------------------------------------------------------

    def _swap_model(self, path: str | None) -> None:
        """Adaptation's swap (or roll-back): every worker onto ``path``, recorded in run.json."""
        assert self.adaptation is not None and self._swap_to is not None
        version = self.adaptation.model
        marker = self.host.out_dir / MARKER
        seq = self.host.current_seq()
        try:
            run = json.loads(marker.read_text())
            run.setdefault("model_changes", []).append({
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": run.get("model"),
                "to": {"path": path, "name": version.name}, "why": version.why, "from_seq": seq})
            run["model"] = {**(run.get("model") or {}), "path": path, "name": version.name}
            write_json_atomically(marker, run)
        except (OSError, ValueError) as e:
            log.warning("could not record the model change in run.json: %s", e)
        self.host.note(f"model: {version.name} ({version.why}) from seq {seq}")
        self._swap_to(path)

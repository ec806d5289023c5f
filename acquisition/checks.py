"""Check frames: real fluorescence now and then, scored against the prediction beside it.

A run with the lamp off is only worth it while the predictions stay right, and only
real fluorescence can say so. ``policies.checks`` (`CheckPolicy`) takes the named
structures' real fluorescence stacks every ``every`` time points (useq's
``acquire_every``, so the plan, its stack count and the audit all know them), and the
daemon scores each against the prediction of the same (t, p): Pearson r, SSIM and NRMSE
(`livestain.metrics`, numpy only). Scores go to the journal, ``status``, the window and
the run's ``summary.json``.

The light is budgeted: a plan whose check frames would use more than ``dose_budget`` of
the fluorescence light the same run would use with every predicted structure at every
time point (at ``policies.equivalent_fluorescence_exposure_ms``) is refused before the
first frame, with the ``every`` that fits.

Fluorescence on doubt: with ``when_unsure`` (a prediction's confidence below it) or
``when_r_below`` (a check's r below it), a check frame of that position is added after
its next brightfield stack (`doubt_checks`), as long as the budget's remainder allows;
the log, the journal and summary.json say why each was taken.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import useq
from pydantic import BaseModel, ConfigDict, Field

from livestain.metrics import structure_metrics
from livestain.store import read_ref

from .preflight import PlanError


class CheckPolicy(BaseModel):
    """``policies.checks``: which real fluorescence to take, how often, within what light.

    Attributes
    ----------
    every : int
        Time points between check frames (the first time point is always one).
    structures : list[str]
        Predicted structures to check (``dna``, ...).
    channels : dict[str, str]
        Channel preset acquiring each structure; by default the preset whose name matches
        the structure's, ignoring case (``dna`` -> ``Dna`` or ``DNA``).
    exposure_ms : float | None
        Exposure of a check frame; None: the equivalent fluorescence exposure.
    dose_budget : float
        Most fluorescence light the checks may use, as a fraction of the same run with
        every predicted structure at every time point.
    when_unsure : float | None
        A prediction whose confidence (0-1, from the worker) is below this gets a check
        frame at its position's next time point. None: never.
    when_r_below : float | None
        A check frame scoring a Pearson r below this gets another at its position's next
        time point. None: never.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(10, ge=1)
    structures: tuple[str, ...] = ("dna",)
    channels: dict[str, str] = Field(default_factory=dict)
    exposure_ms: float | None = Field(None, gt=0)
    dose_budget: float = Field(0.05, gt=0, le=1)
    when_unsure: float | None = Field(None, gt=0, le=1)
    when_r_below: float | None = Field(None, gt=-1, le=1)


def check_channel_of(policy: CheckPolicy, structure: str, presets: Iterable[str]) -> str:
    """The channel preset that takes ``structure``'s real fluorescence."""
    if structure in policy.channels:
        return policy.channels[structure]
    presets = list(presets)
    for preset in presets:
        if preset.lower() == structure.lower():
            return preset
    raise PlanError(f"policies.checks: no channel preset for {structure!r} among {presets}; name it with "
                    f"checks.channels: {{{structure}: PRESET}}")


def dose_fraction(n_t: int, every: int, n_checked: int, n_predicted: int,
                  check_exposure_ms: float, equivalent_exposure_ms: float) -> float:
    """Fluorescence light of the checks over that of the same run with all ``n_predicted``
    structures at every time point (per position and plane, so those cancel)."""
    checks = math.ceil(n_t / every) * n_checked * check_exposure_ms
    full = n_t * max(n_predicted, 1) * equivalent_exposure_ms
    return checks / full if full > 0 else 0.0


def extra_checks_allowed(policy: CheckPolicy, n_t: int, n_p: int, n_predicted: int,
                         equivalent_exposure_ms: float) -> int:
    """Check stacks the budget leaves for doubt, beyond the planned ones (whole run)."""
    exposure = policy.exposure_ms or equivalent_exposure_ms
    full = n_t * n_p * max(n_predicted, 1) * equivalent_exposure_ms
    most = int(math.floor(policy.dose_budget * full / exposure + 1e-9))
    planned = math.ceil(n_t / policy.every) * n_p * len(policy.structures)
    return max(0, most - planned)


def with_check_channels(sequence: useq.MDASequence, policy: CheckPolicy | None, presets: Iterable[str],
                        n_predicted: int, equivalent_exposure_ms: float) -> useq.MDASequence:
    """``sequence`` with a check channel (``acquire_every``) per checked structure, after
    the budget is checked (`PlanError` naming the ``every`` that fits)."""
    if policy is None:
        return sequence
    presets = list(presets)
    n_t = sequence.sizes.get("t", 0) or 1
    exposure = policy.exposure_ms or equivalent_exposure_ms
    n = len(policy.structures)
    fraction = dose_fraction(n_t, policy.every, n, n_predicted, exposure, equivalent_exposure_ms)
    if fraction > policy.dose_budget + 1e-12:
        fits = next((e for e in range(policy.every, n_t + 1)
                     if dose_fraction(n_t, e, n, n_predicted, exposure, equivalent_exposure_ms)
                     <= policy.dose_budget), None)
        fix = (f"set checks.every to {fits} or more" if fits else "check fewer structures or shorten their exposure")
        raise PlanError(
            f"policies.checks: check frames of {', '.join(policy.structures)} every {policy.every} time "
            f"point(s) of {n_t} use {fraction:.1%} of the fluorescence light of the same run with all "
            f"{n_predicted} structures at every time point, over the {policy.dose_budget:.1%} budget: "
            f"{fix}, or raise checks.dose_budget")
    existing = {c.config for c in sequence.channels}
    added = []
    group = sequence.channels[0].group if sequence.channels else "Channel"
    for s in policy.structures:
        config = check_channel_of(policy, s, presets)
        if config in existing:
            raise PlanError(f"policies.checks: the plan already takes {config} at every time point it names; "
                            f"drop it from the plan's channels or from checks.structures")
        added.append(useq.Channel(config=config, group=group, exposure=exposure, acquire_every=policy.every))
    return sequence.model_copy(update={"channels": (*sequence.channels, *added)})


@dataclass(frozen=True)
class CheckScore:
    """One check frame against the prediction of the same (t, p)."""

    t: int
    p: int
    structure: str
    pearson: float
    ssim: float
    nrmse: float
    reason: str
    at: float


class CheckScorer:
    """Pairs check stacks with predictions as either arrives, and keeps the scores.

    Parameters
    ----------
    policy : CheckPolicy
    channel_structure : dict
        Check channel preset -> structure it checks.
    """

    #: Scores kept in memory per structure (for ``status`` and the window; the journal
    #: and summary.json hold them all).
    RECENT = 64
    #: (t, p) waiting for their partner (bounded: a stack never predicted leaves one).
    WAITING = 1024

    def __init__(self, policy: CheckPolicy, channel_structure: dict[str, str], extra_allowed: int = 0) -> None:
        self.policy = policy
        self.channel_structure = dict(channel_structure)
        #: check stacks the light budget still allows beyond the plan's
        self.extra_left = int(extra_allowed)
        self.extra_taken = 0
        #: position -> why its next time point should get a check frame
        self.requests: dict[int, str] = {}
        self._reasons: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._checks: OrderedDict[tuple[int, int], dict[str, Path]] = OrderedDict()
        self._predictions: OrderedDict[tuple[int, int], tuple[Path, tuple[str, ...]]] = OrderedDict()
        self.recent: dict[str, deque[CheckScore]] = {s: deque(maxlen=self.RECENT) for s in policy.structures}
        self.count: dict[str, int] = {s: 0 for s in policy.structures}
        self.failed: list[str] = []

    def is_check_channel(self, channel: str) -> bool:
        return channel in self.channel_structure

    def is_check(self, t: int, p: int) -> bool:
        """Whether stack (t, p) gets a check frame: planned, or asked for on doubt."""
        return t % self.policy.every == 0 or (t, p) in self._reasons

    def request(self, p: int, reason: str) -> bool:
        """Ask for a check frame at position ``p``'s next time point; False (and nothing
        asked) when the light budget has no room left."""
        if p in self.requests:
            return True
        if self.extra_left - len(self.requests) < len(self.policy.structures):
            return False
        self.requests[p] = reason
        return True

    def take_request(self, t: int, p: int) -> str | None:
        """The pending request of position ``p``, consumed for its stack at ``t`` (a
        planned check time point needs none: the plan takes it anyway)."""
        if p not in self.requests or t % self.policy.every == 0:
            return None
        reason = self.requests.pop(p)
        n = len(self.policy.structures)
        self.extra_left -= n
        self.extra_taken += n
        self._reasons[(t, p)] = reason
        _trim(self._reasons, self.WAITING)
        return reason

    def stack_written(self, t: int, p: int, channel: str, path: Path) -> list[CheckScore]:
        """A check stack is on disk; scores it if its prediction is already there."""
        if channel not in self.channel_structure:
            return []
        self._checks.setdefault((t, p), {})[self.channel_structure[channel]] = path
        _trim(self._checks, self.WAITING)
        return self._score((t, p))

    def prediction_written(self, t: int, p: int, path: Path, structures: Sequence[str]) -> list[CheckScore]:
        """A prediction is on disk; scores the check stacks of its (t, p) already there."""
        if not self.is_check(t, p):
            return []
        self._predictions[(t, p)] = (path, tuple(structures))
        _trim(self._predictions, self.WAITING)
        return self._score((t, p))

    def _score(self, key: tuple[int, int]) -> list[CheckScore]:
        checks, prediction = self._checks.get(key), self._predictions.get(key)
        if not checks or prediction is None:
            return []
        pred_path, structures = prediction
        scores = []
        try:
            predicted, _ = read_ref(pred_path)
        except (OSError, ValueError) as e:
            self.failed.append(f"t {key[0]} p {key[1]}: cannot read {pred_path.name}: {e}")
            return []
        for structure, path in list(checks.items()):
            del checks[structure]
            if structure not in structures:
                self.failed.append(f"t {key[0]} p {key[1]}: the model does not predict {structure}")
                continue
            try:
                truth, _ = read_ref(path)
            except (OSError, ValueError) as e:
                self.failed.append(f"t {key[0]} p {key[1]}: cannot read {path.name}: {e}")
                continue
            pred = predicted[structures.index(structure)]
            if truth.shape != pred.shape:
                self.failed.append(f"t {key[0]} p {key[1]}: check {truth.shape} and prediction {pred.shape} differ")
                continue
            m = structure_metrics(pred, truth)
            reason = self._reasons.get(key, f"every {self.policy.every} time points")
            score = CheckScore(key[0], key[1], structure, round(m["pearson"], 4), round(m["ssim"], 4),
                               round(m["nrmse"], 4), reason, time.time())
            self.recent[structure].append(score)
            self.count[structure] += 1
            scores.append(score)
        if not checks:
            self._checks.pop(key, None)
            self._predictions.pop(key, None)
            self._reasons.pop(key, None)
        return scores

    def status(self) -> dict[str, Any]:
        """``checks``: per structure, the number scored and the last score; ``checks_every``."""
        out = {}
        for s, recent in self.recent.items():
            last = recent[-1] if recent else None
            out[s] = {"count": self.count[s], "last": None if last is None else
                      {"t": last.t, "p": last.p, "pearson": last.pearson, "ssim": last.ssim, "nrmse": last.nrmse,
                       "reason": last.reason}}
        return {"checks": out, "checks_every": self.policy.every, "checks_on_doubt": self.extra_taken,
                "checks_on_doubt_left": self.extra_left,
                "checks_requested": {str(p): why for p, why in self.requests.items()}}


def score_dict(score: CheckScore) -> dict[str, Any]:
    return asdict(score)


def _trim(d: OrderedDict, most: int) -> None:
    while len(d) > most:
        d.popitem(last=False)


def doubt_checks(events: Iterable[useq.MDAEvent], scorer: CheckScorer, stream_channels: Sequence[str],
                 channels: dict[str, useq.Channel], channel_index: dict[str, int],
                 on_added: Callable[[tuple[int, int, str]], None]) -> Iterator[useq.MDAEvent]:
    """``events`` with a check stack after a position's streamed stack when the scorer
    has a request for it: the same planes, in the check channels (``channels``: preset ->
    channel, ``channel_index``: preset -> the plan's ``c`` index). ``on_added`` hears of
    each added stack's (t, p, channel) before its first event is yielded."""
    held: list[useq.MDAEvent] = []  # the streamed stack just yielded, to copy its planes

    def added() -> Iterator[useq.MDAEvent]:
        if not held:
            return
        t, p = held[0].index.get("t", 0), held[0].index.get("p", 0)
        if scorer.take_request(t, p) is None:
            return
        for config, channel in channels.items():
            on_added((t, p, config))
            for e in held:
                yield e.model_copy(update={"channel": channel, "index": {**e.index, "c": channel_index[config]},
                                           "min_start_time": None})

    for event in events:
        key = (event.index.get("t", 0), event.index.get("p", 0))
        streamed = event.channel is not None and event.channel.config in stream_channels
        if held and (key != (held[0].index.get("t", 0), held[0].index.get("p", 0)) or not streamed):
            yield from added()
            held = []
        if streamed:
            held.append(event)
        yield event
    yield from added()

"""Checks of a plan before the first frame: a bad plan must fail in seconds, not at 3 a.m.

A misspelt channel preset, a z-stack of one plane or a plan with no channel the model
predicts from used to start, acquire, and end with "0 predicted" and exit code 0. Each
check here raises `PlanError` (a `ValueError`: the command line prints it as one line,
exit code 2) naming the problem and the fix, before the dataset folder is created.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import useq
from pydantic import BaseModel


class PlanError(ValueError):
    """A plan livestain cannot run as asked; the message says what to change."""


# -- the plan's own sense ----------------------------------------------------------------
def check_plan(sequence: useq.MDASequence, stream_channels: Iterable[str]) -> None:
    """Refuse plans that would acquire nothing worth predicting (no hardware needed)."""
    _check_time_plan(sequence.time_plan)
    _check_z_plan(sequence.z_plan)
    _check_streamed_channels(sequence, tuple(stream_channels))


def _check_time_plan(plan: Any) -> None:
    phases = getattr(plan, "phases", None) or ([plan] if plan is not None else [])
    for phase in phases:
        interval = getattr(phase, "interval", None)
        if isinstance(interval, timedelta) and interval.total_seconds() < 0:
            raise PlanError(
                f"plan.time_plan.interval is {interval.total_seconds():g} s: an interval cannot be "
                f"negative. Use 0 for time points back to back, or the seconds between them."
            )


def _check_z_plan(plan: Any) -> None:
    if plan is None:
        raise PlanError(
            "the plan has no z_plan: livestain predicts from brightfield z-stacks. Add e.g. "
            "`z_plan: {range: 15, step: 1}` (16 planes, 1 µm apart) to the plan."
        )
    step = getattr(plan, "step", None)
    if step is not None and step <= 0:
        raise PlanError(
            f"plan.z_plan.step is {step:g} µm: the step between planes must be positive "
            f"(e.g. `step: 1`)."
        )
    rng = getattr(plan, "range", None)
    if rng is not None and rng <= 0:
        raise PlanError(
            f"plan.z_plan.range is {rng:g} µm: the stack must span a positive range "
            f"(e.g. `range: 15` with `step: 1` gives 16 planes)."
        )
    n = len(list(plan))
    if n < 2:
        raise PlanError(
            f"plan.z_plan gives {n} plane(s): livestain predicts from z-stacks of several "
            f"planes. Make the range larger than the step (e.g. `range: 15, step: 1`)."
        )


def _check_streamed_channels(sequence: useq.MDASequence, stream_channels: tuple[str, ...]) -> None:
    names = [c.config for c in sequence.channels]
    if not names:
        raise PlanError(
            "the plan names no channel: add the brightfield preset, e.g. "
            "`channels: [{config: Brightfield, exposure: 10}]`."
        )
    if not set(names) & set(stream_channels):
        near = [(n, s) for n in names for s in stream_channels if n.lower() == s.lower()]
        hint = (f" Did you mean {near[0][1]!r} for {near[0][0]!r}? (names are case-sensitive)"
                if near else "")
        raise PlanError(
            f"no channel of the plan ({', '.join(names)}) is sent for prediction "
            f"(policies.stream_channels: {', '.join(stream_channels) or 'none'}): the run would "
            f"acquire but predict nothing.{hint} Add the brightfield preset to the plan's "
            f"channels, or name it in policies.stream_channels."
        )


# -- the plan against the microscope -----------------------------------------------------
def check_plan_against_core(sequence: useq.MDASequence, core: Any) -> None:
    """Every channel preset, and the stages the plan moves, exist on this microscope."""
    groups = set(core.getAvailableConfigGroups())
    for channel in sequence.channels:
        if channel.group not in groups:
            raise PlanError(
                f"the plan's channel {channel.config!r} is in config group {channel.group!r}, "
                f"which this microscope does not have (groups: {', '.join(sorted(groups)) or 'none'}). "
                f"Set `group:` on the channel to one of these."
            )
        presets = list(core.getAvailableConfigs(channel.group))
        if channel.config not in presets:
            close = [p for p in presets if p.lower() == channel.config.lower()]
            hint = f" Did you mean {close[0]!r}? (names are case-sensitive)" if close else ""
            raise PlanError(
                f"the plan's channel {channel.config!r} is not a preset of config group "
                f"{channel.group!r} on this microscope (presets: {', '.join(presets)}).{hint}"
            )
    if sequence.z_plan is not None and not core.getFocusDevice():
        raise PlanError("the plan has a z_plan but this microscope has no focus (Z) stage")
    moves_xy = any(p.x is not None or p.y is not None for p in sequence.stage_positions)
    if moves_xy and not core.getXYStageDevice():
        raise PlanError(
            "the plan's stage_positions set x/y but this microscope has no XY stage: "
            "leave x and y out of the positions"
        )


# -- keys nobody reads ---------------------------------------------------------------------
def unknown_keys(data: Any, model: type[BaseModel] = useq.MDASequence, where: str = "") -> list[str]:
    """Dotted paths of keys in ``data`` that no field of ``model`` (or its parts) reads.

    useq ignores keys it does not know, so ``z_plan: {range: 4, stepp: 1}`` gave an
    error about nine other fields and ``time_plan: {interval: 1, loop: 3}`` ran the
    wrong plan. Where a field takes one of several models (a union), the keys are
    judged against the model they overlap most.
    """
    if not isinstance(data, Mapping):
        return []
    known = _field_annotations(model)
    found = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            found.append(path)
            continue
        members = _models_in(known[key])
        if not members:
            continue
        items = [(path, value)] if isinstance(value, Mapping) else (
            [(f"{path}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [])
        for item_path, item in items:
            if isinstance(item, Mapping):
                found += unknown_keys(item, _closest_model(item, members), item_path)
    return found


def _field_annotations(model: type[BaseModel]) -> dict[str, Any]:
    """Field names and aliases of ``model``, with the annotation each one takes."""
    known: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        known[name] = info.annotation
        if info.alias:
            known[info.alias] = info.annotation
    return known


def _closest_model(data: Mapping, members: list[type[BaseModel]]) -> type[BaseModel]:
    """The member of a union that ``data`` shares the most keys with (fewest fields on a tie)."""
    def score(m: type[BaseModel]) -> tuple[int, int]:
        names = _field_annotations(m)
        return (len(set(data) & set(names)), -len(names))

    return max(members, key=score)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, Union, list, tuple)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    models: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        models += _models_in(arg)
    return models

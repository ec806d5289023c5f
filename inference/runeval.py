"""Scoring a run's predictions against the real fluorescence acquired with it.

A run in paired mode holds, for each time point and position, the brightfield stack and
real fluorescence stacks (``p000/t0000_dna.ome.tif``). `evaluate_runs` compares a
prediction set of that run (or the daemon's live predictions, set ``live``) with them:
one Dask task per stack computes Pearson r, SSIM and NRMSE per structure
(`inference.evaluate.structure_metrics`, the same numbers ``livestain evaluate``
gives), and the results are averaged per time point, which shows whether a model
holds up over a time-lapse (bleaching, drift, cells changing).

A structure is compared with the channel of the same name unless ``--against``
maps it (``dna=hoechst``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livestain.store import read_ref, ref_exists

from .evaluate import METRICS, structure_metrics
from .runsets import (LIVE, PredictionSet, channel_path, input_channel, list_sets,
                      live_prediction_path, run_channels, run_stacks)


def parse_against(text: str) -> tuple[tuple[str, str], ...]:
    """``"dna"`` -> ((dna, dna),); ``"dna=hoechst,membrane"`` -> ((dna, hoechst), (membrane, membrane))."""
    pairs = []
    for part in text.split(","):
        part = part.strip()
        structure, _, channel = part.partition("=")
        structure, channel = structure.strip(), (channel or structure).strip()
        if not structure or not channel:
            raise ValueError(f"--against {text!r}: give channels like dna, or dna=hoechst to compare the "
                             "dna prediction with the hoechst channel")
        pairs.append((structure, channel.lower()))
    if len({s for s, _ in pairs}) != len(pairs):
        raise ValueError(f"--against {text!r} names a structure twice")
    return tuple(pairs)


def resolve_set(run: Path, requested: str | None) -> str:
    """The set to score: ``requested``, else the run's only set, else ``live``."""
    sets = list_sets(run)
    if requested:
        if requested != LIVE and requested not in sets:
            raise ValueError(f"run {run} has no prediction set {requested!r}; it has: "
                             f"{', '.join(sets + [LIVE]) or LIVE}. Make it with livestain predict-run")
        return requested
    if len(sets) == 1:
        return sets[0]
    if len(sets) > 1:
        raise ValueError(f"run {run} has several prediction sets ({', '.join(sets)}); choose one with --set "
                         f"(or --set {LIVE} for the live predictions)")
    return LIVE


@dataclass(frozen=True)
class EvalTask:
    """One stack's comparison: where its prediction and its truth files are."""

    run: str
    t: int
    p: int
    prediction: str
    truths: tuple[tuple[str, str], ...]  # (structure, truth file)
    mode: str = "3d"
    target_2d: str = "plane"


def evaluate_stack(task: EvalTask) -> dict[str, Any]:
    """The task: metrics per structure of one stack, or the reason there are none."""
    result: dict[str, Any] = {"run": task.run, "t": task.t, "p": task.p}
    try:
        pred, info = read_ref(task.prediction)
        pred = np.asarray(pred, np.float32)
        if pred.ndim == 3:
            pred = pred[None]
        names = list(info.get("structures") or [])
        metrics: dict[str, dict[str, float]] = {}
        for structure, path in task.truths:
            if structure not in names:
                raise ValueError(f"{task.prediction} has no {structure} (it has {', '.join(names) or 'no names'})")
            p = pred[names.index(structure)]
            truth, _ = read_ref(path)
            truth = np.asarray(truth, np.float32)
            if truth.ndim == 2:
                truth = truth[None]
            if p.shape[0] == 1 and truth.shape[0] > 1:  # a 2.5D prediction of one plane
                truth = truth.max(axis=0, keepdims=True) if task.target_2d == "max" else \
                    truth[truth.shape[0] // 2: truth.shape[0] // 2 + 1]
            if p.shape != truth.shape:
                raise ValueError(f"prediction {p.shape} and {Path(path).name} {truth.shape} differ in shape")
            metrics[structure] = structure_metrics(p, truth)
        return result | {"status": "ok", "metrics": metrics}
    except Exception as e:  # noqa: BLE001 - one unreadable stack must not stop the scoring
        return result | {"status": "failed", "reason": f"{type(e).__name__}: {e}"}


@dataclass
class EvalPlan:
    run: Path
    set_name: str
    against: tuple[tuple[str, str], ...]
    tasks: list[EvalTask]
    missing: list[dict[str, Any]] = field(default_factory=list)


def plan_evaluation(runs: Sequence[Path], against: Sequence[tuple[str, str]], set_name: str | None = None,
                    channel: str | None = None) -> list[EvalPlan]:
    """Which stacks of each run have both a prediction and the truth; the others are
    listed as missing (not predicted yet, or no fluorescence at that time point)."""
    plans = []
    for run in runs:
        run = Path(run)
        have = run_channels(run)
        absent = [c for _, c in against if c not in have]
        if absent:
            raise ValueError(f"run {run} has no {', '.join(absent)} stacks (p000/t0000_{absent[0]}.ome.tif); "
                             f"its channels are {', '.join(sorted(have))}. Pass --against with one of "
                             "those, or STRUCTURE=CHANNEL")
        name = resolve_set(run, set_name)
        pset = None if name == LIVE else PredictionSet(run, name)
        spec = pset.read_spec() if pset else None
        plan = EvalPlan(run, name, tuple(against), [])
        for ref in run_stacks(run, input_channel(run, channel)):
            pred = live_prediction_path(ref) if pset is None else pset.path_for(ref)
            truths = tuple((s, channel_path(ref, c)) for s, c in against)
            gone = [p.name for p in (pred, *(t for _, t in truths)) if not ref_exists(p)]
            if gone:
                plan.missing.append({"t": ref.t, "p": ref.p, "missing": gone})
                continue
            plan.tasks.append(EvalTask(str(run), ref.t, ref.p, str(pred),
                                       tuple((s, str(t)) for s, t in truths),
                                       spec.mode if spec else "3d", spec.target_2d if spec else "plane"))
        plans.append(plan)
    return plans


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per time point (mean over positions) and overall means, per structure and metric."""
    ok = [r for r in results if r.get("status") == "ok"]
    per_t: dict[int, list[dict[str, Any]]] = {}
    for r in ok:
        per_t.setdefault(int(r["t"]), []).append(r)

    def mean(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        structures = sorted({s for r in rows for s in r["metrics"]})
        return {s: {m: float(np.mean([r["metrics"][s][m] for r in rows if s in r["metrics"]])) for m in METRICS}
                for s in structures}

    return {
        "time_points": {t: {"positions": len(rows), "mean": mean(rows)} for t, rows in sorted(per_t.items())},
        "mean": mean(ok) if ok else {},
        "stacks": len(ok),
        "failed": [r for r in results if r.get("status") != "ok"],
    }


def evaluate_runs(client: Any, plans: Sequence[EvalPlan],
                  on_result: Callable[[dict[str, Any], int, int], None] | None = None) -> dict[str, Any]:
    """Score every planned stack on ``client``'s cluster; one report per run (see `summarise`)."""
    from distributed import as_completed

    t0 = time.perf_counter()
    total = sum(len(p.tasks) for p in plans)
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plans))}
    futures = {}
    token = np.random.default_rng().integers(1 << 32)
    for i, plan in enumerate(plans):
        for task in plan.tasks:
            fut = client.submit(evaluate_stack, task, key=(f"evaluate-stack-{token:08x}", len(futures)), pure=False)
            futures[fut] = (i, task)
    done = 0
    for fut in as_completed(futures):
        i, task = futures.pop(fut)
        if fut.status == "finished":
            result = fut.result()
        else:
            exc = fut.exception()
            result = {"run": task.run, "t": task.t, "p": task.p, "status": "failed",
                      "reason": f"{type(exc).__name__}: {exc}"}
        fut.release()
        results[i].append(result)
        done += 1
        if on_result is not None:
            on_result(result, done, total)
    return {
        "wall_s": time.perf_counter() - t0,
        "runs": [{"run": str(plan.run), "set": plan.set_name, "against": dict(plan.against),
                  "missing": plan.missing, **summarise(results[i])}
                 for i, plan in enumerate(plans)],
    }

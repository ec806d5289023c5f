"""Re-predicting whole runs on a Dask cluster: one task per stack, one model per worker.

The live worker predicts each stack once, as it is acquired, with the model of the day.
Later one wants every stack of a run (or of an archive of runs) predicted again: by a
better model, with test-time augmentation, or in exact fp32. This module plans that
(`plan_prediction`: which stacks of which runs still lack a prediction in the set) and
runs it on any `distributed.Client` (`execute`), from a laptop's worker processes to a
cluster of GPUs (`inference.cluster`).

* The model is loaded once per worker process by `ModelPlugin` (a Dask worker plugin),
  not once per task: a task is one stack, and loading a model can take longer than
  predicting a stack. A worker that dies and is restarted loads it again on its own.
* A task reads its stack from the run, predicts it and writes it with
  `PredictionSet.claim` (atomic, at most once per stack). Dask re-runs the tasks of a
  worker that died; a re-run that finds the stack written returns ``"exists"``.
* A stack that cannot be predicted (an unreadable file, a stack too small for the
  network, out of GPU memory) is recorded with its reason beside where its prediction
  would be, and the other stacks go on. The next call tries it again.
* Whatever was written stays written: a second call predicts only what is missing, so
  an interrupted call is continued by calling again.

This module imports neither pymmcore nor ``livestain.acquisition``: workers may run on
hosts without microscope software.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livestain import __version__
from livestain.stackio import voxel_size_of
from livestain.store import read_ref

from .runsets import PredictionSet, SetSpec, StackRef, input_channel, run_stacks

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # the planning half works without Dask; running needs it

    class WorkerPlugin:  # type: ignore[no-redef]
        pass


PLUGIN_PREFIX = "livestain-model"
DASK_HINT = "batch prediction needs Dask: pip install 'dask[distributed]' (or pip install 'livestain[batch]')"


def plugin_name(model_name: str, exact: bool) -> str:
    """One plugin per model and precision: two calls with different models can share a
    cluster without replacing each other's model."""
    return f"{PLUGIN_PREFIX}-{model_name}-{'exact' if exact else 'fast'}"


class ModelPlugin(WorkerPlugin):
    """Loads the model once on each worker (and again on a restarted worker).

    A model that does not load (file missing on that host, out of memory) is not an
    exception here, which Dask would only log: the error is kept and every task on the
    worker fails with it, so it is recorded per stack and shown to the user.
    """

    def __init__(self, model_path: str | None, model_name: str, device: str | None = None,
                 exact: bool = False, torch_threads: int | None = None) -> None:
        self.model_path = model_path
        self.model_name = model_name
        self.device = device
        self.exact = exact
        self.torch_threads = torch_threads
        self.name = plugin_name(model_name, exact)
        self.idempotent = True  # the same model twice: keep the one already loaded
        self.predictor: Any = None
        self.error: str | None = None
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["predictor"], state["lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()  # one prediction at a time: a Predictor reuses buffers

    async def setup(self, worker: Any) -> None:
        # off the worker's event loop: loading takes seconds, and a blocked loop misses
        # heartbeats
        await asyncio.get_running_loop().run_in_executor(None, self.load)

    def load(self) -> None:
        try:
            import torch

            from .cluster import cpu_count
            from .predict import Predictor

            # the nanny starts workers with OMP_NUM_THREADS=1; say how many we want
            torch.set_num_threads(max(1, self.torch_threads or cpu_count()))
            tune_malloc()
            predictor = Predictor(self.model_path, self.device, fast=not self.exact,
                                  bf16=False if self.exact else None)
            if predictor.model.name != self.model_name:
                raise ValueError(
                    f"{self.model_path} on {socket.gethostname()} is {predictor.model.name}, not "
                    f"{self.model_name} as on the machine that started the call; give the workers "
                    "the same model file (a shared folder)")
            self.predictor, self.error = predictor, None
        except Exception as e:  # noqa: BLE001 - reported per stack, see the class docstring
            self.predictor, self.error = None, f"{type(e).__name__}: {e}"

    def teardown(self, worker: Any) -> None:
        self.predictor = None


#: glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Undo what Dask's nanny does to a worker's malloc, for PyTorch's sake (glibc only).

    The nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory
    back to the OS). Setting any trim threshold turns off glibc's adaptive mmap threshold,
    so each of the network's multi-megabyte activations is a fresh ``mmap`` whose pages
    fault in again on every stack: measured 46k page faults and 0.35 s per 16x256x256
    stack against 8k and 0.24 s with the thresholds set here (the ceiling glibc's adaptive
    scheme would reach by itself). Returns whether both were set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 64 << 20))


def _plugin_status(name: str, dask_worker: Any = None) -> str:
    plugin = dask_worker.plugins.get(name)
    if plugin is None:
        return "no plugin"
    if plugin.predictor is None:
        return f"error: {plugin.error}"
    return f"ok: {plugin.predictor.device}, {plugin.predictor.model.name}"


@dataclass(frozen=True)
class PredictTask:
    """One stack to predict: small and picklable, it is what travels to the worker."""

    run: str
    set_name: str
    t: int
    p: int
    source: str
    plugin: str
    keep: tuple[int, ...]
    structures: tuple[str, ...]
    tta: bool = False
    source_seq: int | None = None  # the journal's, for a Zarr run (a TIFF carries its own)
    run_id: str | None = None

    @property
    def ref(self) -> StackRef:
        return StackRef(Path(self.run), self.t, self.p, Path(self.source), self.source_seq, self.run_id)


def _as_zyx(stack: np.ndarray, path: Path) -> np.ndarray:
    stack = np.asarray(stack)
    while stack.ndim > 3 and stack.shape[0] == 1:
        stack = stack[0]
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"{path} has shape {stack.shape}, not one ZYX stack")
    return stack


def predict_stack(task: PredictTask) -> dict[str, Any]:
    """The task: read one stack, predict it with the worker's model, claim its file."""
    from distributed import get_worker

    worker = get_worker()
    ref = task.ref
    pset = PredictionSet(task.run, task.set_name)
    result: dict[str, Any] = {"run": task.run, "t": task.t, "p": task.p, "worker": worker.address}
    if pset.is_done(ref):  # a re-run of a task whose worker died after writing
        return result | {"status": "exists"}
    t0 = time.perf_counter()
    try:
        plugin = worker.plugins.get(task.plugin)
        if plugin is None or plugin.predictor is None:
            raise RuntimeError("the model did not load on this worker: "
                               + (plugin.error if plugin is not None else "no livestain plugin"))
        predictor = plugin.predictor
        stack, info = read_ref(ref.path)
        stack = _as_zyx(stack, ref.path)
        voxel = [float(v) for v in (info.get("voxel_size_um") or voxel_size_of(ref.path))]
        t1 = time.perf_counter()
        with plugin.lock:
            pred = predictor.predict(stack, voxel, tta=task.tta)
        t2 = time.perf_counter()
        if len(task.keep) != pred.shape[0]:
            pred = pred[list(task.keep)]
        import torch

        header = {
            "kind": "prediction",
            "set": task.set_name,
            "model": predictor.model.name,
            "model_fingerprint": predictor.model.fingerprint,
            "model_path": str(predictor.model.path),
            "structures": list(task.structures),
            "units": "z-score",
            "precision": "exact" if plugin.exact else "fast",
            "tta": task.tta,
            "t": task.t,
            "p": task.p,
            "run_id": info.get("run_id", ref.run_id),
            "source_path": _relative(ref.path, Path(task.run)),
            "source_seq": info.get("seq", ref.seq),
            "source_channel": info.get("channel"),
            "shape": list(pred.shape),
            "voxel_size_um": voxel,
            "position_um": info.get("position_um"),
            "acquired_start": info.get("acquired_start"),
            "predicted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inference_s": round(t2 - t1, 4),
            "device": predictor.device,
            "worker": worker.address,
            "host": socket.gethostname(),
            "versions": {"livestain": __version__, "torch": torch.__version__},
        }
        written = pset.claim(ref, np.ascontiguousarray(pred, np.float32), voxel_size_um=voxel, info=header,
                             channel_names=task.structures)
        t3 = time.perf_counter()
        return result | {"status": "written" if written else "exists", "read_s": t1 - t0,
                         "predict_s": t2 - t1, "write_s": t3 - t2, "seconds": t3 - t0}
    except Exception as e:  # noqa: BLE001 - a failed stack is recorded; the others go on
        reason = f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            pset.record_failure(ref, reason, worker=worker.address, host=socket.gethostname())
        return result | {"status": "failed", "reason": reason, "seconds": time.perf_counter() - t0}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- planning


@dataclass
class RunPlan:
    """One run's part of a call: its prediction set and the stacks it still lacks."""

    run: Path
    spec: SetSpec
    pset: PredictionSet
    stacks: list[StackRef]
    todo: list[StackRef]

    @property
    def done(self) -> int:
        return len(self.stacks) - len(self.todo)


@dataclass
class Plan:
    """What a call will do; made without a cluster, so a call with nothing to do starts none."""

    model_path: str | None
    model_name: str
    exact: bool
    tta: bool
    keep: tuple[int, ...]
    structures: tuple[str, ...]
    runs: list[RunPlan]

    @property
    def total(self) -> int:
        return sum(len(r.stacks) for r in self.runs)

    @property
    def todo(self) -> int:
        return sum(len(r.todo) for r in self.runs)

    @property
    def set_names(self) -> list[str]:
        return sorted({r.pset.name for r in self.runs})


def plan_prediction(
    runs: Sequence[Path],
    model: Any,
    *,
    structures: Sequence[str] | None = None,
    exact: bool = False,
    tta: bool = False,
    channel: str | None = None,
    set_name: str | None = None,
) -> Plan:
    """Which stacks of ``runs`` lack a prediction by ``model`` (a `LoadedModel`) with
    these options. Raises ValueError for a structure the model lacks, a run without the
    input channel, or a set of that name made with other settings."""
    cfg = model.meta.config
    model_structures = tuple(cfg.structures)
    wanted = tuple(structures) if structures else model_structures
    missing = [s for s in wanted if s not in model_structures]
    if missing:
        raise ValueError(f"{model.name} does not predict {', '.join(missing)}; it predicts "
                         f"{', '.join(model_structures)}: choose --structures among those")
    plans = []
    for run in runs:
        run = Path(run)
        chan = input_channel(run, channel)
        spec = SetSpec(model=model.name, fingerprint=model.fingerprint, structures=wanted,
                       precision="exact" if exact else "fast", tta=tta, mode=cfg.mode,
                       target_2d=cfg.target_2d, input_channel=chan, model_structures=model_structures)
        pset = PredictionSet(run, set_name or spec.default_name())
        old = pset.read_spec()
        if old is not None and old != spec:
            pset.open(spec)  # raises, naming the difference
        stacks = run_stacks(run, chan)
        plans.append(RunPlan(run, spec, pset, stacks, [r for r in stacks if not pset.is_done(r)]))
    return Plan(
        model_path=str(model.path), model_name=model.name, exact=exact, tta=tta,
        keep=tuple(model_structures.index(s) for s in wanted), structures=wanted, runs=plans,
    )


# ---------------------------------------------------------------- running


@dataclass
class RunTally:
    """One run's outcome: stacks done before, written now, found written by a task that
    ran twice, failed; worker-side seconds of the stacks written now."""

    run: Path
    set_name: str
    stacks: int
    already: int
    written: int = 0
    existed: int = 0
    failed: int = 0
    seconds: float = 0.0


@dataclass
class BatchReport:
    runs: list[RunTally]
    wall_s: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    workers: dict[str, str] = field(default_factory=dict)
    #: seconds to load the model on the workers, before the first stack (not in wall_s)
    setup_s: float = 0.0

    @property
    def written(self) -> int:
        return sum(r.written for r in self.runs)

    @property
    def finished(self) -> int:
        """Stacks this call accounted for: written, found written, or failed."""
        return sum(r.written + r.existed + r.failed for r in self.runs)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.runs)

    @property
    def stacks_per_s(self) -> float:
        return self.written / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def s_per_stack(self) -> float:
        """Worker seconds per stack written (read + predict + write), what one worker takes."""
        n = self.written
        return sum(r.seconds for r in self.runs) / n if n else 0.0


OnResult = Callable[[dict[str, Any], BatchReport], None]


def execute(client: Any, plan: Plan, *, torch_threads: int | None = None, device: str | None = None,
            on_result: OnResult | None = None) -> BatchReport:
    """Predict what ``plan`` lacks on ``client``'s cluster; returns the tally.

    ``on_result`` is called in this thread after each stack (the console's progress bar,
    or a test that kills a worker mid-way). Ctrl-C cancels what has not run and returns
    a report marked ``interrupted``: what was written stays, the next call continues.
    """
    try:
        from distributed import as_completed
    except ImportError:
        raise ValueError(DASK_HINT) from None
    report = BatchReport([RunTally(r.run, r.pset.name, len(r.stacks), r.done) for r in plan.runs])
    if not plan.todo:
        return report
    plugin = ModelPlugin(plan.model_path, plan.model_name, device, plan.exact, torch_threads)
    tasks: list[tuple[int, PredictTask]] = []
    for i, rp in enumerate(plan.runs):
        for ref in rp.todo:
            tasks.append((i, PredictTask(str(rp.run), rp.pset.name, ref.t, ref.p, str(ref.path), plugin.name,
                                         plan.keep, plan.structures, plan.tta, ref.seq, ref.run_id)))
    tasks.sort(key=lambda it: (it[1].t, it[0], it[1].p))  # early time points of every run first
    with contextlib.ExitStack() as held:
        for rp in plan.runs:
            rp.pset.open(rp.spec, {"model_path": plan.model_path, "livestain": __version__})
            held.enter_context(rp.pset.writing())
            rp.pset.clean_leftovers()
        t_setup = time.perf_counter()
        client.register_plugin(plugin)  # returns once the model is loaded on every worker
        held.callback(_unregister, client, plugin.name)
        report.workers = _check_workers(client, plugin.name)
        t0 = time.perf_counter()
        report.setup_s = t0 - t_setup
        token = os.urandom(4).hex()
        futures = {
            client.submit(predict_stack, task, key=(f"predict-stack-{token}", n), pure=False,
                          priority=len(tasks) - n): (i, task)
            for n, (i, task) in enumerate(tasks)
        }
        try:
            for fut in as_completed(futures):
                i, task = futures.pop(fut)
                result = _result_of(fut, plan.runs[i].pset, task)
                fut.release()
                _tally(report, i, result)
                report.wall_s = time.perf_counter() - t0
                if on_result is not None:
                    on_result(result, report)
        except KeyboardInterrupt:
            report.interrupted = True
            client.cancel(list(futures))
        finally:
            for rp in plan.runs:
                # tasks of this call are over (or cancelled); what a killed worker left goes
                rp.pset.clean_leftovers()
            report.failures = [f for rp in plan.runs for f in rp.pset.failures()]
        report.wall_s = time.perf_counter() - t0
    return report


def _unregister(client: Any, name: str) -> None:
    with contextlib.suppress(Exception):  # a closed cluster has nothing left to free
        client.unregister_worker_plugin(name)


def _check_workers(client: Any, name: str) -> dict[str, str]:
    """Every worker's model status; a model that loads nowhere stops the call here
    (rather than as one identical failure per stack)."""
    status = client.run(_plugin_status, name)
    if status and all(s.startswith("error") for s in status.values()):
        first = next(iter(status.values()))
        raise ValueError(f"the model did not load on any worker ({first.removeprefix('error: ')})")
    return status


def _result_of(fut: Any, pset: PredictionSet, task: PredictTask) -> dict[str, Any]:
    """A finished task's result; a task Dask gave up on (its worker died again and
    again, KilledWorker) is recorded like a stack that failed to predict."""
    if fut.status == "finished":
        return fut.result()
    if fut.status == "cancelled":
        return {"run": task.run, "t": task.t, "p": task.p, "status": "cancelled"}
    exc = fut.exception()
    reason = f"{type(exc).__name__}: {exc}"
    if pset.is_done(task.ref):  # it was written before the worker died
        return {"run": task.run, "t": task.t, "p": task.p, "status": "exists"}
    with contextlib.suppress(OSError):
        pset.record_failure(task.ref, reason)
    return {"run": task.run, "t": task.t, "p": task.p, "status": "failed", "reason": reason}


def _tally(report: BatchReport, i: int, result: dict[str, Any]) -> None:
    tally = report.runs[i]
    status = result.get("status")
    if status == "written":
        tally.written += 1
        tally.seconds += float(result.get("seconds", 0.0))
    elif status == "exists":
        tally.existed += 1
    elif status == "failed":
        tally.failed += 1


def runs_total(runs: Iterable[RunTally]) -> RunTally:
    """The sum of several runs' tallies (the console's last row)."""
    runs = list(runs)
    return RunTally(Path("."), ",".join(sorted({r.set_name for r in runs})), sum(r.stacks for r in runs),
                    sum(r.already for r in runs), sum(r.written for r in runs), sum(r.existed for r in runs),
                    sum(r.failed for r in runs), sum(r.seconds for r in runs))

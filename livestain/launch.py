"""Starting a whole run: the daemon here, a worker process beside it, a viewer if wanted.

`run_session` is what ``livestain demo`` and ``livestain run`` share. The worker and the
viewer are separate processes, so a crash or a closed window in either never takes the
acquisition down with it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import useq

from livestain import wire
from livestain.acquisition.policies import Policies

log = logging.getLogger(__name__)


@dataclass
class SessionOptions:
    """How to run one acquisition session.

    Attributes
    ----------
    out_dir : Path
        Dataset folder (must not already hold a run).
    host, base_port : str, int
        Where the daemon listens (see `livestain.wire.endpoints`).
    model : str | None
        Checkpoint for the spawned worker (None: the bundled model).
    spawn_worker : bool
        Start a local worker process (turn off when workers run elsewhere).
    show_window : bool
        Start a viewer process (only when a display exists).
    device : str | None
        Torch device for the worker (None: CUDA if present, else CPU).
    policies : Policies
        Disk margin, live backlog, resend/drain timeouts (see `acquisition.policies`).
    resume : bool
        Continue the run in ``out_dir`` at its first incomplete time point.
    keys : str | None
        CURVE key folder (`livestain.security`); required for a non-loopback host.
    uncertainty : bool
        The local worker predicts each structure's per-voxel uncertainty too (8x the time).
    exact, compile : bool
        The local worker's plain float32 path, and ``torch.compile`` (`RunConfig.worker`).
    workers : int
        Local worker processes sharing the stacks (`RunConfig.worker.count`).
    """

    out_dir: Path
    host: str = wire.DEFAULT_HOST
    base_port: int = wire.DEFAULT_BASE_PORT
    model: str | None = None
    spawn_worker: bool = True
    show_window: bool = False
    device: str | None = None
    policies: Policies = field(default_factory=Policies)
    resume: bool = False
    keys: str | None = None
    uncertainty: bool = False
    exact: bool = False
    compile: bool = False
    workers: int = 1


def has_display() -> bool:
    """True where a window can open (always on Windows/macOS; X11/Wayland on Linux)."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def demo_sequence(timepoints: int = 3, interval_s: float = 0.0, positions: int = 1) -> useq.MDASequence:
    """The demo plan: brightfield z-stacks (16 planes, 1 um) over time and positions."""
    from livestain.devices.sample import SampleGeometry

    fy, fx = SampleGeometry().field_um
    stage = [{"x": i * fx, "y": 0.0, "z": 4.0, "name": f"Pos{i}"} for i in range(positions)]
    return useq.MDASequence(
        axis_order="tpcz",
        stage_positions=stage,
        time_plan={"interval": interval_s, "loops": timepoints},
        channels=[{"config": "Brightfield", "exposure": 10.0}],
        z_plan={"range": 15.0, "step": 1.0},
    )


def _log_to_dataset(out_dir: Path) -> logging.Handler:
    """A rotating log file in the dataset folder: 10 MB x 5, survives a days-long run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        out_dir / "livestain.log", maxBytes=10_000_000, backupCount=5
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def _recorded_model(out_dir: Path) -> dict | None:
    """The model a run recorded in its ``run.json`` (None for runs that predate the record)."""
    try:
        run = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    model = run.get("model") if isinstance(run, dict) else None
    return model if isinstance(model, dict) else None


def choose_model(opts: SessionOptions, report) -> dict:  # noqa: ANN001
    """Which model this session's worker uses, checked before the first frame.

    A resumed run keeps the model it recorded unless ``--model`` says otherwise (it
    used to switch silently to the bundled one mid-dataset), and says which it uses.
    Returns ``{"path", "name", "structures"}`` as recorded in ``run.json``.
    """
    from livestain.acquisition.supervisor import check_worker_model

    model = str(Path(opts.model).resolve()) if opts.model else None
    recorded = _recorded_model(opts.out_dir) if opts.resume else None
    if recorded is not None and model is None:
        model = recorded.get("path")
        report(f"resuming with the run's own model {recorded.get('name')} (from run.json; "
               f"pass --model to change it)")
    if not opts.spawn_worker:
        return {"path": model, "name": Path(model).stem if model else "bundled", "structures": None}
    checked = check_worker_model(model, opts.device)
    info = {"path": model, "name": checked["name"], "structures": checked["structures"]}
    if checked.get("expectations"):
        info["expectations"] = checked["expectations"]
    if checked.get("validation_pearson"):
        info["validation_pearson"] = checked["validation_pearson"]
        report(validation_note(info["name"], checked["validation_pearson"]))
    if recorded is not None and recorded.get("name") != info["name"]:
        why = "you passed --model" if opts.model else "the model file changed since the run started"
        report(f"this run changes model from {recorded.get('name')} to {info['name']} ({why}); "
               f"every prediction file names the model that made it")
    return info


def validation_note(name: str, validation: dict[str, float]) -> str:
    """The start-of-run line that says how good the model was on its own validation
    fields: the confidence the window shows is relative to those (a model that reached r
    0.57 reads ~0.9 on stacks like them), so this is the figure for how far to trust it."""
    scores = ", ".join(f"{s} {float(r):.2f}" for s, r in validation.items())
    return (f"model {name}: validation Pearson r {scores} on its own held-out fields; the confidence shown per "
            "stack says how sure it is compared with those, not how good it is")


def plan_thickness_warning(sequence: useq.MDASequence, model: dict) -> str | None:
    """A warning, before the first frame, when the plan's z-stacks are too thin for the
    model (`inference.ood.thickness_shortfall`: what would flag every stack ``thin_stack``
    for days); None when they are not, or the model is not 3D. A warning, not a refusal:
    the plan may be meant for another model, or a test."""
    from livestain.inference.ood import thickness_shortfall

    expect = model.get("expectations") or {}
    if sequence.z_plan is None or expect.get("model_extent_um") is None:
        return None
    z = sorted(float(v) for v in sequence.z_plan)
    step = statistics.median(b - a for a, b in zip(z, z[1:])) if len(z) > 1 else None
    short = thickness_shortfall(len(z), step, expect.get("model_voxel_size_um"), float(expect["model_extent_um"]))
    if not short:
        return None
    return (f"warning: the plan's z-stacks are too thin for {model.get('name', 'the model')}: {short}. Every "
            "prediction would be flagged thin_stack; stop the run (Ctrl-C or `livestain stop`) and change "
            "plan.z_plan unless that is meant")


def _quiet_runner_cancel() -> None:
    """pymmcore-plus logs "MDA Canceled: <the whole plan>" as a warning on every stop
    (twice on the console: its own handler and the root's); the daemon says it in one line."""
    logger = logging.getLogger("pymmcore-plus")
    if not any(isinstance(f, _DropRunnerCancel) for f in logger.filters):
        logger.addFilter(_DropRunnerCancel())


class _DropRunnerCancel(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MDA Canceled")


def run_session(core, sequence: useq.MDASequence, opts: SessionOptions, report=print):  # noqa: ANN001
    """Run ``sequence`` on ``core`` with a supervised worker (and a viewer); returns RunSummary."""
    from livestain.acquisition.daemon import Daemon, DaemonHooks
    from livestain.acquisition.supervisor import WorkerPool, spawn_cli

    from livestain.acquisition.preflight import check_plan, check_plan_against_core

    _quiet_runner_cancel()
    # the plan first: a misspelt preset is reported in a second, before the model loads
    check_plan(sequence, opts.policies.stream_channels)
    check_plan_against_core(sequence, core)

    # per-stack lines go to the console through `report` and to the dataset's log file
    # through this logger, which does not propagate: the console shows each line once
    run_log = logging.getLogger("livestain.run")
    run_log.propagate = False
    run_log.setLevel(logging.INFO)

    def report_and_log(line: str) -> None:
        report(line)
        run_log.info(line)

    conn = ["--connect", opts.host, "--port", str(opts.base_port)]
    if opts.keys:
        conn += ["--keys", str(opts.keys)]
    model = choose_model(opts, report_and_log)
    if (warning := plan_thickness_warning(sequence, model)) is not None:
        report_and_log(warning)
    worker_args = ["worker", *conn]
    if model["path"]:
        worker_args += ["--model", model["path"]]
    if opts.device:
        worker_args += ["--device", opts.device]
    if opts.uncertainty:
        worker_args += ["--uncertainty"]
    if opts.exact:
        worker_args += ["--exact"]
    if opts.compile:
        worker_args += ["--compile"]
    supervisor = WorkerPool(worker_args, opts.workers, report=report_and_log)
    eps = wire.endpoints(opts.host, opts.base_port)
    viewers: list = []  # the window's process, reaped once closed: no zombie on a days-long run

    def tick() -> None:
        supervisor.check()
        for viewer in viewers:
            viewer.poll()

    daemon = Daemon(core, sequence, opts.out_dir, eps, opts.policies, report=report_and_log,
                    resume=opts.resume, keys=opts.keys, provenance={"model": model},
                    hooks=DaemonHooks(on_tick=tick, on_hung_worker=supervisor.kill_hung,
                                      extra_status=supervisor.status,
                                      swap_model=supervisor.use_model if opts.spawn_worker else None))
    file_log = _log_to_dataset(opts.out_dir)
    run_log.addHandler(file_log)
    supervisor.on_restart = daemon.predictions.requeue_in_flight
    if opts.spawn_worker:
        supervisor.start()
    if opts.show_window:
        viewers.append(spawn_cli(["view", *conn]))  # independent: closing it never touches the run

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop(signum: int, _frame: object) -> None:
        report_and_log(f"received {signal.Signals(signum).name}: stopping after the current frame")
        daemon.request_stop()

    for s in previous:
        signal.signal(s, _stop)
    try:
        summary = daemon.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        supervisor.stop()
        logging.getLogger().removeHandler(file_log)
        run_log.removeHandler(file_log)
        file_log.close()
    return summary


def exit_code(summary) -> int:  # noqa: ANN001
    """0: done with every stack predicted, or stopped by the user (stop, SIGTERM, Ctrl-C);
    1: done but some stacks not predicted (raw data safe on disk: `--resume` predicts
    them); 3: the run was stopped by an error (disk, write, the microscope)."""
    if summary.error:
        return 3
    if summary.stopped_early:
        return 0
    return 0 if summary.not_predicted == 0 else 1

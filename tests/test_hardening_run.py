"""Faults and bad input a new user hit when starting and running a run (issue 13).

Each test failed on the code before its fix: exit code 0 with nothing predicted, data
overwritten by a second daemon, a model switched silently, tracebacks on a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import useq
import yaml

from livestain import wire
from livestain.acquisition.daemon import Daemon, DaemonHooks
from livestain.acquisition.dataset_lock import DatasetBusy, DatasetLock
from livestain.acquisition.policies import Policies
from livestain.acquisition.preflight import PlanError
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.inference.checkpoint import bundled_model_path
from livestain.launch import demo_sequence, exit_code
from livestain.runconfig import load_run_config
from livestain.stackio import write_stack

from _helpers import run_predictions, run_stacks, stack_file
from livestain.store import ref_exists
from _helpers import CLI, QuickPredictor
from _helpers import wait_for_status as _wait_for

#: The console script a user runs (its own folder, not the current one, is on sys.path).
LIVESTAIN = Path(sys.executable).parent / "livestain"


def _config(tmp_path: Path, plan: dict | None = None, **settings) -> Path:
    data = {
        "microscope": "simulated",
        "out": str(tmp_path / "run"),
        "plan": plan if plan is not None else {
            "time_plan": {"interval": 0, "loops": 2},
            "channels": [{"config": "Brightfield", "exposure": 10}],
            "stage_positions": [{"x": 0, "y": 0, "z": 4}],
            "z_plan": {"range": 15, "step": 1},
        },
    } | settings
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _with_plan(tmp_path: Path, **changes) -> Path:
    plan = {
        "time_plan": {"interval": 0, "loops": 2},
        "channels": [{"config": "Brightfield", "exposure": 10}],
        "stage_positions": [{"x": 0, "y": 0, "z": 4}],
        "z_plan": {"range": 15, "step": 1},
    } | changes
    return _config(tmp_path, {k: v for k, v in plan.items() if v is not None})


# -- the plan is checked before the first frame -------------------------------------------
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"time_plan": {"interval": -5, "loops": 3}}, "cannot be negative"),
        ({"z_plan": {"range": 0, "step": 1}}, "positive range"),
        ({"z_plan": {"range": -4, "step": 1}}, "positive range"),
        ({"z_plan": {"range": 10, "step": 0}}, "step between planes must be positive"),
        ({"z_plan": None}, "no z_plan"),
        ({"z_plan": {"range": 4, "stepp": 1}}, "plan.z_plan.stepp"),
        ({"time_plan": {"interval": 1, "loop": 3}}, "plan.time_plan.loop"),
        ({"channels": [{"config": "Brightfield", "exposre": 10}]}, "plan.channels[0].exposre"),
        ({"focus": True}, "plan.focus"),
        ({"channels": [{"config": "Dna", "exposure": 10}]}, "predict nothing"),
        ({"channels": None}, "names no channel"),
    ],
)
def test_a_plan_that_cannot_run_as_meant_is_refused_with_the_fix(tmp_path, changes, expected) -> None:
    with pytest.raises(ValueError) as err:
        load_run_config(_with_plan(tmp_path, **changes))
    assert expected in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_misspelt_brightfield_preset_stops_the_run_before_anything_is_written(tmp_path) -> None:
    cfg = _with_plan(tmp_path, channels=[{"config": "BrightField", "exposure": 10}])
    proc = subprocess.run([*CLI, "run", str(cfg), "--headless", "--port", "5990"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "(BrightField)" in proc.stderr and "Did you mean 'Brightfield'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_channel_preset_the_microscope_lacks_is_refused_before_the_first_frame(tmp_path, base_port) -> None:
    plan = demo_sequence(2, 0.0).model_copy(update={"channels": (
        useq.Channel(config="Brightfield"), useq.Channel(config="mitochondria"))})
    with pytest.raises(PlanError, match="'mitochondria' is not a preset of config group 'Channel'") as err:
        Daemon(build_simulated_core(SimulatedScope()), plan, tmp_path / "run",
               wire.endpoints(base_port=base_port), report=lambda line: None)
    assert "Did you mean 'Mitochondria'" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_failing_mda_is_an_error_not_a_success(tmp_path, base_port) -> None:
    core = build_simulated_core(SimulatedScope())
    daemon = Daemon(core, demo_sequence(3, 0.0), tmp_path / "run", wire.endpoints(base_port=base_port),
                    Policies(drain_timeout_s=0.5), report=lambda line: None)
    engine = core.mda.engine  # the daemon's (snap retries); the stage fails under it
    real_setup = engine.setup_event

    def setup_event(event):  # noqa: ANN001, ANN202
        if event.index.get("t", 0) == 1:
            raise RuntimeError("XY stage did not answer")
        return real_setup(event)

    engine.setup_event = setup_event
    summary = daemon.run()
    assert summary.error is not None and "XY stage did not answer" in summary.error
    assert "--resume" in summary.error
    assert exit_code(summary) == 3
    assert summary.acquired == 1  # t=0 was acquired before the failure and is kept
    ((raw, info),) = run_stacks(tmp_path / "run")
    assert raw.shape == (16, 256, 256) and info["t"] == 0


# -- one writer per dataset ---------------------------------------------------------------
def test_a_second_daemon_on_a_dataset_in_use_is_refused(tmp_path, base_port) -> None:
    core = build_simulated_core(SimulatedScope())
    first = Daemon(core, demo_sequence(2, 0.0), tmp_path / "run", wire.endpoints(base_port=base_port),
                   Policies(drain_timeout_s=0.5), report=lambda line: None)
    journal_before = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(DatasetBusy, match="being written by a running livestain daemon") as err:
        Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), tmp_path / "run",
               wire.endpoints(base_port=base_port + 4), Policies(drain_timeout_s=0.5),
               report=lambda line: None, resume=True)
    assert f"--port {base_port}" in str(err.value)  # where to stop or watch the other one
    assert (tmp_path / "run" / "run.json").read_bytes() == journal_before
    first.run()  # the first one finishes untouched and lets go of the dataset
    resumed = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), tmp_path / "run",
                     wire.endpoints(base_port=base_port + 4), Policies(drain_timeout_s=0.5),
                     report=lambda line: None, resume=True)
    resumed.run()


def test_kill_9_releases_the_dataset_lock(tmp_path) -> None:
    code = ("import sys, time; from livestain.acquisition.dataset_lock import DatasetLock; "
            "DatasetLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatasetBusy, match=f"process {holder.pid}"):
            DatasetLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    DatasetLock(tmp_path).acquire().release()  # nothing to clean up after a crash


# -- where a run may write ------------------------------------------------------------------
def test_out_pointing_at_a_training_dataset_is_refused_and_the_dataset_untouched(tmp_path, base_port) -> None:
    data = tmp_path / "training"
    write_stack(data / "field000" / "brightfield.ome.tif", np.zeros((4, 8, 8), np.uint16),
                voxel_size_um=(1, 0.3, 0.3), info={"kind": "brightfield"})
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with pytest.raises(FileExistsError, match="already holds other files .*field000"):
        Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), data,
               wire.endpoints(base_port=base_port), report=lambda line: None)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


# -- a full disk ------------------------------------------------------------------------------
class _FullDiskDB:
    """An SQLite connection whose writes fail once ``ok_writes`` are used up."""

    def __init__(self, db: sqlite3.Connection, ok_writes: int) -> None:
        self.db, self.ok_writes = db, ok_writes

    def execute(self, sql: str, *args):  # noqa: ANN002, ANN201
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE")):
            if self.ok_writes <= 0:
                raise sqlite3.OperationalError("database or disk is full")
            self.ok_writes -= 1
        return self.db.execute(sql, *args)

    def close(self) -> None:
        self.db.close()


def test_a_full_disk_under_the_journal_stops_the_run_with_exit_3_and_keeps_everything(tmp_path, base_port) -> None:
    daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(4, 0.0), tmp_path / "run",
                    wire.endpoints(base_port=base_port), Policies(min_free_gb=0, drain_timeout_s=0.5),
                    report=lambda line: None)
    # two stacks' records (a stack is two inserts, its row and its header, in one transaction)
    daemon.journal.db = _FullDiskDB(daemon.journal.db, ok_writes=4)
    summary = daemon.run()
    assert summary.error is not None and "database or disk is full" in summary.error
    assert "--resume" in summary.error
    assert exit_code(summary) == 3
    # t=0 and t=1 are recorded; t=2 reached the disk but not the journal (which is full):
    # its bytes are kept, and `--resume` takes it again since nothing says it is complete
    assert [info["t"] for _, info in run_stacks(tmp_path / "run")] == [0, 1]
    assert ref_exists(daemon.store.raw_ref(2, 0, "Brightfield"))
    assert not list((tmp_path / "run").rglob("*.partial"))


def test_the_disk_check_reserves_room_for_the_prediction_too(tmp_path, base_port) -> None:
    raw_bytes = 16 * 256 * 256 * 2  # one uint16 stack: 2 MB; its 3-structure float32 prediction: 12.6 MB
    daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), tmp_path / "run",
                    wire.endpoints(base_port=base_port), Policies(min_free_gb=0, drain_timeout_s=0.5),
                    report=lambda line: None,
                    hooks=DaemonHooks(free_space=lambda _p: 3 * raw_bytes))
    summary = daemon.run()
    assert summary.acquired == 0 and exit_code(summary) == 3
    assert "its prediction need" in summary.error


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    import livestain.stackio as stackio

    def imwrite(fh, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stackio.tifffile, "imwrite", imwrite)
    with pytest.raises(OSError, match="No space left"):
        write_stack(tmp_path / "a.ome.tif", np.zeros((2, 4, 4), np.uint16), voxel_size_um=(1, 1, 1), info={})
    assert list(tmp_path.iterdir()) == []


# -- the model is checked first, and a resumed run keeps its own ------------------------------
def test_an_unusable_model_is_refused_before_the_first_frame(tmp_path, base_port) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(bundled_model_path().read_bytes()[:5000])  # a truncated copy
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "demo", "--headless", "--timepoints", "2", "--out", str(out),
                           "--port", str(base_port), "--model", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot use this model" in proc.stderr and str(bad) in proc.stderr
    assert not out.exists()  # refused before the run: no crash-looping worker, no dataset


@pytest.mark.slow
def test_resume_keeps_the_runs_model_and_workers_start_from_any_folder(tmp_path, base_port) -> None:
    # started from a folder holding a directory named `livestain` (a clone's parent folder)
    home = tmp_path / "home"
    (home / "livestain").mkdir(parents=True)
    model = tmp_path / "mine.safetensors"
    shutil.copy(bundled_model_path(), model)
    out = tmp_path / "run"
    first = subprocess.run([str(LIVESTAIN), "demo", "--headless", "--timepoints", "2", "--interval", "0",
                            "--out", str(out), "--port", str(base_port), "--model", str(model)],
                           capture_output=True, text=True, timeout=300, cwd=home)
    assert first.returncode == 0, first.stdout + first.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["path"] == str(model) and run["model"]["name"].startswith("mine@")
    resumed = subprocess.run([str(LIVESTAIN), "demo", "--headless", "--timepoints", "4", "--interval", "0",
                              "--out", str(out), "--port", str(base_port), "--resume"],
                             capture_output=True, text=True, timeout=300, cwd=home)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming with the run's own model mine@" in resumed.stdout
    models = [info["model"] for _, info in run_predictions(out)]
    assert len(models) == 4
    assert all(m.startswith("mine@") for m in models), models
    assert "ImportError" not in first.stderr + resumed.stderr


@pytest.mark.slow
def test_a_live_run_pause_resume_stop_are_logged_and_a_second_daemon_is_refused(tmp_path, base_port) -> None:
    out = tmp_path / "run"
    demo = subprocess.Popen([*CLI, "demo", "--headless", "--timepoints", "50", "--interval", "1",
                             "--out", str(out), "--port", str(base_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(base_port, lambda s: s["stacks_predicted"] >= 1, proc=demo)
        second = subprocess.run([*CLI, "demo", "--headless", "--timepoints", "50", "--out", str(out),
                                 "--port", str(base_port + 4), "--resume"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert "being written by a running livestain daemon" in second.stderr
        assert f"livestain stop --port {base_port}" in second.stderr
        for command in ("pause", "resume", "stop"):
            reply = subprocess.run([*CLI, command, "--port", str(base_port)], capture_output=True,
                                   text=True, timeout=30)
            assert reply.returncode == 0, reply.stderr
        stdout, stderr = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, stderr
    log = (out / "livestain.log").read_text()
    assert "paused by `livestain pause`" in log and "resumed by `livestain resume`" in log
    assert "stop requested by `livestain stop`" in log
    assert "MDA Canceled" not in stdout + stderr
    # the refused second daemon wrote nothing: every stack has exactly one writer
    seqs = [info["seq"] for _, info in run_stacks(out)]
    assert seqs == list(range(len(seqs)))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--port", "70000"], "outside 1024-65532"),
        (["status", "--port", "80"], "outside 1024-65532"),
        (["demo", "--positions", "0"], "--positions must be at least 1"),
        (["demo", "--interval", "-1"], "--interval cannot be negative"),
    ],
)
def test_demo_and_client_options_out_of_range_are_refused(argv, expected, capsys, tmp_path, monkeypatch) -> None:
    from livestain.cli import main

    import logging

    monkeypatch.chdir(tmp_path)
    # main() configures logging onto this test's captured stderr: undo it after
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no dataset folder was made


# -- a worker that takes a stack and never answers ----------------------------------------------
def test_stacks_a_silent_worker_holds_are_re_sent_before_the_drain_ends(tmp_path, base_port) -> None:
    import threading

    import zmq

    from livestain.inference.worker import Worker

    eps = wire.endpoints(base_port=base_port)
    hung: list[str] = []
    # resend_after_s (300 s) far beyond the drain (4 s): the re-send must come from the drain
    daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), tmp_path / "run", eps,
                    Policies(drain_timeout_s=4.0, resend_after_s=300.0), report=lambda line: None,
                    hooks=DaemonHooks(on_hung_worker=lambda holders: hung.extend(holders)))
    silent = zmq.Context.instance().socket(zmq.DEALER)  # takes the first stack, never answers
    silent.connect(eps["stacks"])
    silent.send_multipart(wire.encode_ready("silent-worker", token=daemon.sockets.token.value))
    worker = Worker(eps["stacks"], eps["results"], QuickPredictor())
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        summary = daemon.run()
    finally:
        worker.stop()
        thread.join(30)
        worker.close()
        silent.close(0)
    assert hung == ["silent-worker"]
    assert summary.acquired == 2 and summary.predicted == 2 and summary.not_predicted == 0


def test_run_options_override_the_config(tmp_path) -> None:
    from livestain.cli import build_parser

    cfg = _config(tmp_path, port=6000, keys=None)
    args = build_parser().parse_args(["run", str(cfg), "--out", str(tmp_path / "elsewhere"), "--port", "6100",
                                      "--connect", "127.0.0.1", "--keys", str(tmp_path / "k"),
                                      "--model", "m.safetensors", "--device", "cpu"])
    loaded = load_run_config(args.config, out=args.out, host=args.connect, port=args.port,
                             keys=args.keys, model=args.model)
    opts = loaded.session_options(show_window=False)
    assert opts.out_dir == tmp_path / "elsewhere" and opts.base_port == 6100
    assert opts.keys == str(tmp_path / "k") and opts.model == str(Path("m.safetensors").resolve())
    assert args.device == "cpu"
    # without options the config's own settings stand
    plain = load_run_config(cfg).session_options(show_window=False)
    assert plain.out_dir == tmp_path / "run" and plain.base_port == 6000 and plain.model is None


class _FailingPredictor(QuickPredictor):
    """Fails on the first ``fail_first`` stacks it sees (as a model out of memory would)."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.calls = 0

    def predict(self, stack: np.ndarray, voxel_size_um=None, out: np.ndarray | None = None) -> np.ndarray:  # noqa: ANN001
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return super().predict(stack, voxel_size_um, out)


@pytest.mark.parametrize(("fail_first", "predicted", "failed"), [(99, 0, 2), (1, 2, 0)])
def test_a_stack_the_worker_cannot_predict_is_retried_once_then_recorded(
        tmp_path, base_port, fail_first, predicted, failed) -> None:
    import threading

    from livestain.inference.worker import Worker

    eps = wire.endpoints(base_port=base_port)
    hung: list[str] = []
    lines: list[str] = []
    daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), tmp_path / "run", eps,
                    Policies(drain_timeout_s=60.0, resend_after_s=300.0), report=lines.append,
                    hooks=DaemonHooks(on_hung_worker=lambda holders: hung.extend(holders)))
    predictor = _FailingPredictor(fail_first)
    worker = Worker(eps["stacks"], eps["results"], predictor)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        summary = daemon.run()
    finally:
        worker.stop()
        thread.join(30)
        worker.close()
    assert not hung  # answered at once: not taken for hung while the drain ran out
    assert summary.predicted == predicted and summary.failed == failed
    assert summary.not_predicted == failed and predictor.calls == predicted + 2 * failed + (fail_first == 1)
    if failed:
        assert sum("NOT PREDICTED after 2 attempts (RuntimeError: CUDA out of memory" in ln for ln in lines) == 2
        assert exit_code(summary) == 1
        # recorded with its reason: the audit says why, and a --resume does not try again
        from livestain.acquisition.audit import audit_run
        from livestain.acquisition.journal import Journal

        problems = [v.prediction_problem for v in audit_run(tmp_path / "run", deep=False).problems]
        assert len(problems) == 2 and all("not predictable: RuntimeError: CUDA out of memory" in p
                                          for p in problems)
        assert Journal(tmp_path / "run").count_waiting(("Brightfield",)) == 0


def test_resuming_a_moved_run_acquires_only_what_is_missing_and_overwrites_nothing(tmp_path, base_port) -> None:
    first = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), tmp_path / "a" / "run",
                   wire.endpoints(base_port=base_port), Policies(drain_timeout_s=0.3), report=lambda line: None)
    first.run()
    moved = tmp_path / "b" / "run"
    moved.parent.mkdir()
    (tmp_path / "a" / "run").rename(moved)  # copied to the analysis disk, then resumed there
    before = stack_file(moved, 0).read_bytes()
    resumed = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(3, 0.0), moved,
                     wire.endpoints(base_port=base_port), Policies(drain_timeout_s=0.3),
                     report=lambda line: None, resume=True)
    summary = resumed.run()
    assert summary.acquired == 1  # only t=2: the journal's old paths point at the old disk
    assert stack_file(moved, 0).read_bytes() == before

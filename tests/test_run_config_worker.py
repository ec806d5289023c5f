"""One configuration from YAML to the worker (issue 14): the run config's ``worker:``
section chooses the local worker's device, precision, compilation and uncertainty, and
``livestain demo`` builds the same `RunConfig`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from livestain import launch
from livestain.runconfig import WorkerConfig, load_run_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "simulated.yaml"


def _config(tmp_path: Path, **worker) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["out"] = str(tmp_path / "run")
    data["worker"] = worker
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_worker_section_reaches_the_session(tmp_path) -> None:
    cfg = load_run_config(_config(tmp_path, device="cpu", exact=True, compile=True, uncertainty=True))
    opts = cfg.session_options(show_window=False)
    assert (opts.device, opts.exact, opts.compile, opts.uncertainty) == ("cpu", True, True, True)
    assert opts.policies.storage == "zarr"


def test_a_misspelt_worker_field_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(ValueError, match="devcie"):
        load_run_config(_config(tmp_path, devcie="cuda"))


def test_the_spawned_worker_gets_the_configs_flags(tmp_path, monkeypatch) -> None:
    """What `run_session` hands the worker supervisor: the worker's own command line."""
    seen: dict[str, list[str]] = {}

    class Stop(Exception):
        pass

    class Supervisor:
        def __init__(self, args, *rest, **kw) -> None:  # noqa: ANN001
            seen["args"] = list(args)
            raise Stop

    from livestain.acquisition import supervisor

    monkeypatch.setattr(supervisor, "WorkerSupervisor", Supervisor)
    monkeypatch.setattr(supervisor, "check_worker_model",
                        lambda model, device, **kw: {"name": "bundled", "structures": ["dna"]})
    cfg = load_run_config(_config(tmp_path, device="cpu", exact=True, compile=True, uncertainty=True))
    with pytest.raises(Stop):
        launch.run_session(cfg.build_core(), cfg.sequence(), cfg.session_options(show_window=False))
    args = seen["args"]
    assert args[0] == "worker" and args[args.index("--device") + 1] == "cpu"
    assert {"--exact", "--compile", "--uncertainty"} <= set(args)


def test_defaults_leave_the_worker_to_choose() -> None:
    assert WorkerConfig() == WorkerConfig(device=None, exact=False, compile=False, uncertainty=False)


def test_worker_count_reaches_the_session_and_zero_is_refused(tmp_path) -> None:
    assert load_run_config(_config(tmp_path, count=3)).session_options(show_window=False).workers == 3
    with pytest.raises(ValueError, match="count"):
        load_run_config(_config(tmp_path, count=0))


def test_a_pool_of_workers_is_started_restarted_and_stopped_as_one(tmp_path) -> None:
    """`WorkerPool`: the supervisor interface over several worker processes (here a
    stand-in command that sleeps), health reported as one."""
    import sys

    from livestain.acquisition import supervisor

    pool = supervisor.WorkerPool(["worker"], 2, report=lambda line: None)
    restarted: list[str] = []
    pool.on_restart = restarted.append
    assert all(w.on_restart is pool.on_restart for w in pool.workers)
    for w in pool.workers:  # a stand-in process per worker: no torch needed to test the pool
        w.start = lambda w=w: (setattr(w, "proc", supervisor.subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"])), setattr(w, "_started_at", 0.0))
    pool.start()
    try:
        status = pool.status()
        assert len(status["worker_pids"]) == 2 and len(set(status["worker_pids"])) == 2
        assert status["worker_alive"] is True and status["worker_restarts"] == 0
        pool.workers[1].proc.kill()
        pool.workers[1].proc.wait()
        assert pool.status()["worker_alive"] is False  # one down: the pool is not all alive
        pool.workers[1]._backoff = 0.0
        pool.check()  # notices the exit
        pool.check()  # restarts after the (zero) back-off
        assert pool.status()["worker_alive"] is True and pool.status()["worker_restarts"] == 1
        assert len(restarted) == 1
    finally:
        pool.stop(timeout_s=2)
    assert not any(w.alive for w in pool.workers)


@pytest.mark.slow
def test_two_local_workers_share_a_runs_stacks(tmp_path, base_port) -> None:
    """`livestain demo --workers 2`: both worker processes predict, every stack once."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "livestain.cli", "demo", "--headless", "--timepoints", "6",
                           "--interval", "0", "--positions", "3", "--workers", "2", "--out", str(out),
                           "--port", str(base_port)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from livestain.run_reader import RunReader

    with RunReader(out) as run:
        rows = [(e.seq, e.prediction_info) for e in run.stacks() if e.prediction_ref]
    workers = [info["worker"] for _, info in rows]
    assert len(rows) == 18 and len({seq for seq, _ in rows}) == 18  # every stack, once
    assert len(set(workers)) == 2, workers  # both workers took stacks

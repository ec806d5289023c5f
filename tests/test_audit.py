"""``livestain audit RUN``: every planned stack accounted for, exit 0 only when none is
missing or unreadable (issue 16)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import useq

from livestain import wire
from livestain.acquisition.audit import GAP, INCOMPLETE, MISSING, OK, UNREADABLE, audit_run, planned_keys
from livestain.acquisition.daemon import Daemon, DaemonHooks
from livestain.acquisition.policies import Policies
from livestain.cli import main
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.launch import demo_sequence
from livestain.run_reader import RunReader
from livestain.store import ref_file


from _helpers import QuickPredictor


def _run(tmp_path: Path, port: int, n_t: int = 3, worker: bool = False, scope: SimulatedScope | None = None,
         **policies) -> Path:
    eps = wire.endpoints(base_port=port)
    free_space = policies.pop("free_space", None) or (lambda _p: 10**12)
    daemon = Daemon(build_simulated_core(scope or SimulatedScope()), demo_sequence(n_t, 0.0), tmp_path / "run",
                    eps, Policies(**({"drain_timeout_s": 10.0 if worker else 0.3} | policies)),
                    report=lambda line: None, hooks=DaemonHooks(free_space=free_space))
    thread = None
    if worker:
        from livestain.inference.worker import Worker

        w = Worker(eps["stacks"], eps["results"], QuickPredictor())
        thread = threading.Thread(target=w.serve, daemon=True)
        thread.start()
    try:
        daemon.run()
    finally:
        if thread is not None:
            w.stop()
            thread.join(30)
            w.close()
    return tmp_path / "run"


def test_a_complete_run_passes_and_names_the_model_of_every_prediction(tmp_path, base_port, capsys) -> None:
    run = _run(tmp_path, base_port, worker=True)
    report = audit_run(run)
    assert report.ok and report.planned == 3 and report.counts[OK] == 3
    assert report.predicted_by == {"quick@test": 3} and report.not_predicted == 0
    assert main(["audit", str(run)]) == 0
    assert "AUDIT PASSED" in capsys.readouterr().out


def test_recorded_gaps_carry_their_reason_and_pass(tmp_path, base_port) -> None:
    # plane 5 of the first stack fails every retry: a recorded gap inside a stack
    run = _run(tmp_path, base_port, scope=SimulatedScope(failing_snaps={5, 6, 7}))
    report = audit_run(run)
    assert report.ok
    incomplete = [v for v in report.problems if v.state == INCOMPLETE]
    assert [(v.t, v.p) for v in incomplete] == [(0, 0)] and "planes [5] missing" in incomplete[0].reason
    assert report.not_predicted == 3  # no worker in this run: said, not hidden
    assert all("predict-run" in v.prediction_problem for v in report.problems)


def test_stacks_never_taken_after_a_disk_stop_are_gaps_with_the_cause(tmp_path, base_port) -> None:
    calls = {"n": 0}

    def free_space(_p: Path) -> int:
        calls["n"] += 1
        return 10**12 if calls["n"] <= 1 else 10**6

    run = _run(tmp_path, base_port, n_t=4, free_space=free_space)
    report = audit_run(run)
    assert report.ok and report.counts[OK] == 1 and report.counts[GAP] == 3
    assert "stopped by an error" in report.ended
    assert all("MB free" in v.reason for v in report.problems if v.state == GAP)


def _stack_file(run: Path, t: int) -> Path:
    """The file holding the brightfield stack at ``t``: its OME-TIFF or its Zarr chunk."""
    with RunReader(run) as reader:
        path = ref_file(reader.entry(t).raw_ref)
    assert path is not None and path.is_file()
    return path


@pytest.mark.parametrize("storage", ["zarr", "tiff"])
def test_a_deleted_or_damaged_stack_fails_the_audit(tmp_path, base_port, capsys, storage) -> None:
    run = _run(tmp_path, base_port, storage=storage)
    _stack_file(run, 1).unlink()
    damaged = _stack_file(run, 2)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    report = audit_run(run)
    assert not report.ok and report.missing == 1 and report.unreadable == 1
    states = {(v.t, v.state) for v in report.problems if v.state in (MISSING, UNREADABLE)}
    assert states == {(1, MISSING), (2, UNREADABLE)}
    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    named = "t0002_brightfield.ome.tif" if storage == "tiff" else "raw.ome.zarr#t=2&c=Brightfield"
    assert "AUDIT FAILED: 1 missing, 1 unreadable" in out and named in out
    # --quick only sees that the file exists: the damage needs the default, deep check
    quick = audit_run(run, deep=False)
    assert quick.missing == 1 and quick.unreadable == 0


def test_a_crashed_run_never_resumed_has_missing_stacks_and_says_resume(tmp_path, base_port) -> None:
    run = _run(tmp_path, base_port, n_t=3)
    file_of_t2 = _stack_file(run, 2)
    db = sqlite3.connect(run / "journal.sqlite")
    db.execute("DELETE FROM stacks WHERE t = 2")
    db.execute("DELETE FROM events WHERE what = 'end'")  # as if killed before the end
    db.commit()
    db.close()
    file_of_t2.unlink()
    report = audit_run(run)
    assert not report.ok and report.missing == 1
    assert "did not end cleanly" in report.ended
    assert "--resume" in [v for v in report.problems if v.state == MISSING][0].reason


def test_an_audit_changes_nothing(tmp_path, base_port) -> None:
    run = _run(tmp_path, base_port)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    audit_run(run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("plan", [
    demo_sequence(3, 0.0, 2),
    useq.MDASequence(time_plan={"interval": 1, "loops": 3}, stage_positions=[(0, 0, 0), (1, 1, 0)],
                     channels=["Brightfield", {"config": "Dna", "acquire_every": 2}],
                     z_plan={"range": 2, "step": 1}),
])
def test_planned_keys_match_the_plans_events(plan) -> None:
    from_events = list(dict.fromkeys(
        (e.index.get("t", 0), e.index.get("p", 0), e.channel.config) for e in plan.iter_events()))
    assert list(planned_keys(plan)) == from_events


def test_a_stack_whose_every_plane_failed_is_a_recorded_gap_not_a_missing_stack(tmp_path, base_port) -> None:
    # 16 planes x 3 tries: snaps 16..63 are every attempt at every plane of the second stack
    run = _run(tmp_path, base_port, n_t=3, worker=True, scope=SimulatedScope(failing_snaps=set(range(16, 64))))
    report = audit_run(run)
    assert report.ok and report.missing == 0 and report.planned == 3
    lost = [v for v in report.problems if v.state == INCOMPLETE]
    assert [(v.t, v.reason) for v in lost] == [(1, "every plane failed: the camera failed every retry "
                                                   "(recorded in the file)")]
    assert report.predicted_by == {"quick@test": 2} and report.not_predicted == 0


def test_the_plans_last_stack_with_no_frame_is_recorded_too(tmp_path, base_port) -> None:
    run = _run(tmp_path, base_port, n_t=2, scope=SimulatedScope(failing_snaps=set(range(16, 64))))
    report = audit_run(run)
    assert report.ok and [(v.t, v.state) for v in report.problems if v.reason.startswith("every plane")] == \
        [(1, INCOMPLETE)]


def test_a_run_written_with_a_relative_folder_or_moved_since_is_audited_by_its_layout(
        tmp_path, base_port, monkeypatch) -> None:
    # the demo's default out is relative (livestain-demo/<time>): the journal records
    # paths relative to the folder the daemon started in
    monkeypatch.chdir(tmp_path)
    daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(2, 0.0), Path("rel") / "run",
                    wire.endpoints(base_port=base_port), Policies(drain_timeout_s=0.3),
                    report=lambda line: None)
    daemon.run()
    moved = tmp_path / "archive" / "run"
    moved.parent.mkdir()
    (tmp_path / "rel" / "run").rename(moved)
    monkeypatch.chdir(moved.parent)  # audited from elsewhere, after a move
    report = audit_run(moved)
    assert report.ok and report.counts[OK] == 2, report.lines()

"""Per-stack confidence and input flags from the worker to the journal, status and window."""

from __future__ import annotations

import sqlite3
import threading

import useq

from livestain import wire
from livestain.acquisition.daemon import Daemon
from livestain.acquisition.policies import Policies
from livestain.acquisition.trust import TrustLedger
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.inference.checkpoint import ModelMeta
from livestain.inference.model import UNetConfig
from livestain.inference.normalize import PercentileNorm
from livestain.inference.worker import Worker
from livestain.launch import demo_sequence

from livestain.run_reader import RunReader
from _helpers import QuickPredictor


def _run(tmp_path, port: int, stage_z: float, z_range_um: float | None = None,
         predictor: object | None = None) -> tuple[Daemon, dict]:
    eps = wire.endpoints(base_port=port)
    update: dict = {"stage_positions": (useq.Position(x=0, y=0, z=stage_z),)}
    if z_range_um is not None:
        update["z_plan"] = useq.ZRangeAround(range=z_range_um, step=1.0)
    plan = demo_sequence(2, 0.0).model_copy(update=update)
    daemon = Daemon(build_simulated_core(SimulatedScope()), plan, tmp_path / "run", eps,
                    Policies(drain_timeout_s=20.0), report=lambda line: None)
    statuses: list[dict] = []
    worker = Worker(eps["stacks"], eps["results"], predictor or QuickPredictor())
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    real_drain = daemon._drain_predictions

    def drain_then_look() -> None:
        real_drain()
        statuses.append(daemon.status())

    daemon._drain_predictions = drain_then_look
    try:
        daemon.run()
    finally:
        worker.stop()
        thread.join(30)
        worker.close()
    return daemon, statuses[-1]


def test_a_stack_far_out_of_focus_is_flagged_from_worker_to_journal_and_status(tmp_path, base_port) -> None:
    # the cells sit around z = 4 um; a 16 um stack centred 10 um above them misses focus
    daemon, status = _run(tmp_path, base_port, stage_z=14.0)
    assert daemon.summary.predicted == 2
    last = status["last_confidence"]
    assert last["flags"] == ["out_of_focus"] and last["confidence"] < 0.5
    assert any("contrast has no minimum inside the stack" in r for r in last["reasons"])
    assert status["low_confidence_stacks"] == 2 and status["flagged_stacks"] == 2
    db = sqlite3.connect(tmp_path / "run" / "journal.sqlite")
    rows = db.execute("SELECT confidence, flags FROM stacks ORDER BY seq").fetchall()
    db.close()
    assert all(c < 0.5 and "out_of_focus" in f for c, f in rows)
    _, info = RunReader(tmp_path / "run").prediction(0)
    assert info["confidence"] < 0.5 and "out_of_focus" in info["flags"]


def test_a_stack_on_the_cells_is_trusted(tmp_path, base_port) -> None:
    _, status = _run(tmp_path, base_port, stage_z=4.0)
    assert status["last_confidence"]["flags"] == [] and status["last_confidence"]["confidence"] > 0.9
    assert status["low_confidence_stacks"] == 0


class Quick3DModel(QuickPredictor):
    """`QuickPredictor` with a 3D model's checkpoint metadata: trained on 16 um stacks."""

    model = type("M", (), {"name": "quick3d@test", "meta": ModelMeta(
        UNetConfig(structures=("dna",)), PercentileNorm(), (1.0, 0.325, 0.325), {"train_extent_um": 16.0})})()


def test_a_stack_too_thin_for_the_model_is_flagged_from_worker_to_status(tmp_path, base_port) -> None:
    """3 planes on the cells, predicted by a 3D model of 16 um stacks: flagged, with the fix."""
    daemon, status = _run(tmp_path, base_port, stage_z=4.0, z_range_um=2.0, predictor=Quick3DModel())
    assert daemon.summary.predicted == 2
    last = status["last_confidence"]
    assert last["flags"] == ["thin_stack"] and last["confidence"] < 0.2
    assert any("3 planes (needs 5)" in r and "--z-window 3" in r for r in last["reasons"]), last["reasons"]
    _, info = RunReader(tmp_path / "run").prediction(0)
    assert "thin_stack" in info["flags"]


def test_a_full_stack_passes_the_same_3d_model(tmp_path, base_port) -> None:
    _, status = _run(tmp_path, base_port, stage_z=4.0, predictor=Quick3DModel())
    assert status["last_confidence"]["flags"] == []


class BrokenMetaModel(QuickPredictor):
    """A model whose metadata the checks cannot read (no voxel size)."""

    model = type("M", (), {"name": "broken@test", "meta": type("Meta", (), {"voxel_size_um": None})()})()


def test_a_check_that_fails_costs_no_prediction(tmp_path, base_port) -> None:
    daemon, status = _run(tmp_path, base_port, stage_z=4.0, predictor=BrokenMetaModel())
    assert daemon.summary.predicted == 2
    assert not (status.get("last_confidence") or {}).get("flags")


def test_the_run_warns_at_its_start_when_the_plans_stacks_are_too_thin_for_the_model() -> None:
    """The worker's model check reports what the input checks expect (bundled: 16 um
    stacks, 3D, windowed), and the run's start compares the plan's z-stacks with it."""
    import json

    from _helpers import run_cli_in_process
    from livestain.launch import plan_thickness_warning

    checked = json.loads(run_cli_in_process(["worker", "--check-model", "--device", "cpu"]).strip().splitlines()[-1])
    expect = checked["expectations"]
    assert expect == {"model_voxel_size_um": [1.0, 0.325, 0.325], "model_extent_um": 16.0, "windowed": True,
                      "model_focus_dip": None}
    model = {"name": checked["name"], "expectations": expect}
    thin = demo_sequence(1, 0.0).model_copy(update={"z_plan": useq.ZRangeAround(range=2.0, step=1.0)})
    warning = plan_thickness_warning(thin, model)
    assert warning is not None and "3 planes (needs 5)" in warning and checked["name"] in warning
    short = demo_sequence(1, 0.0).model_copy(update={"z_plan": useq.ZRangeAround(range=2.1, step=0.3)})
    warning = plan_thickness_warning(short, model)  # 8 planes 0.3 um apart: 2.4 um
    assert "2.4 um of z (needs 3.2)" in warning and "plane (needs" not in warning
    enough = demo_sequence(1, 0.0).model_copy(update={"z_plan": useq.ZRangeAround(range=3.0, step=0.3)})
    assert plan_thickness_warning(enough, model) is None  # 11 planes 0.3 um apart: 3.3 um
    assert plan_thickness_warning(demo_sequence(1, 0.0), model) is None  # 16 planes, 1 um apart
    assert plan_thickness_warning(thin, {"name": "mine", "expectations": {**expect, "model_extent_um": None}}) is None


def test_the_window_shows_the_confidence_and_why_it_is_low(qapp) -> None:
    from livestain.ui.status_panel import StatusPanel

    panel = StatusPanel()
    panel.show_status({"run_id": "r", "stacks_acquired": 3, "low_confidence_stacks": 2,
                       "last_confidence": {"t": 2, "p": 0, "confidence": 0.2, "flags": ["out_of_focus"],
                                           "reasons": ["no plane of the stack is in focus"]}})
    assert panel.text("trust") == ("0.20 at t 3 p 1; 2 stack(s) below 0.5 — no plane of the stack is in focus")
    panel.show_status({"run_id": "r", "stacks_acquired": 4, "low_confidence_stacks": 2,
                       "last_confidence": {"t": 3, "p": 0, "confidence": 0.97, "flags": [], "reasons": []}})
    assert panel.text("trust") == "0.97 at t 4 p 1; 2 stack(s) below 0.5"


def test_the_ledger_is_bounded_and_says_a_new_flag_once_per_position() -> None:
    ledger = TrustLedger(max_positions=8)
    first = ledger.add(0, 0, {"confidence": 0.2, "flags": ["empty"], "flag_reasons": ["no cells"]})
    again = ledger.add(1, 0, {"confidence": 0.2, "flags": ["empty"], "flag_reasons": ["no cells"]})
    assert first.new_flags == ("empty",) and "FLAGGED: no cells" in first.line()
    assert again.new_flags == () and "FLAGGED" not in again.line()
    for p in range(10_000):
        ledger.add(5, p, {"confidence": 0.9})
    assert len(ledger.per_position) == 8 and len(ledger.seen_flags) == 8
    assert ledger.stacks == 10_002 and ledger.low == 2
    assert ledger.add(0, 0, {}).confidence is None  # a worker that sends none: nothing made up


def test_the_models_own_validation_r_is_said_at_the_start_in_status_and_in_the_window(qapp, tmp_path,
                                                                                     base_port) -> None:
    """The confidence is relative to the model's validation fields (a user model at r 0.57
    reads ~0.9 on stacks like them), so its validation r travels beside it: from the
    worker's model check, in a start-of-run line, in the status, and in the window's
    model row (not for an adapted version, whose scores differ)."""
    import json

    from _helpers import run_cli_in_process
    from livestain.launch import validation_note
    from livestain.ui.status_panel import StatusPanel

    checked = json.loads(run_cli_in_process(["worker", "--check-model", "--device", "cpu"]).strip().splitlines()[-1])
    validation = checked["validation_pearson"]
    assert set(validation) == {"dna", "membrane", "mitochondria"} and validation["dna"] > 0.9
    note = validation_note(checked["name"], {"dna": 0.569})
    assert note.startswith(f"model {checked['name']}: validation Pearson r dna 0.57") and "not how good" in note
    eps = wire.endpoints(base_port=base_port)
    daemon = Daemon(build_simulated_core(SimulatedScope()), demo_sequence(1, 0.0), tmp_path / "run", eps,
                    Policies(), report=lambda line: None,
                    provenance={"model": {"name": "mine@abc", "validation_pearson": {"dna": 0.569}}})
    try:
        status = daemon.status()
    finally:
        daemon.journal.close()
        daemon.folder.release_lock()
    assert status["model_name"] == "mine@abc" and status["model_validation_r"] == {"dna": 0.569}
    panel = StatusPanel()
    panel.show_status({"run_id": "r", "model_name": "mine@abc", "model_validation_r": {"dna": 0.569}})
    assert panel.text("model") == "mine@abc — validation r dna 0.57"
    panel.show_status({"run_id": "r", "model_name": "mine@abc", "model_validation_r": {"dna": 0.569},
                       "model_version": "mine@abc-adapted1"})
    assert panel.text("model") == "mine@abc-adapted1"

"""Check frames (issue 12, item 2) and the run summary (item 6): real fluorescence every
few time points, scored against the prediction beside it, within a light budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from livestain import wire
from livestain.acquisition.audit import audit_run
from livestain.acquisition.checks import CheckPolicy, CheckScorer, dose_fraction, with_check_channels
from livestain.acquisition.daemon import Daemon
from livestain.acquisition.policies import Policies
from livestain.acquisition.preflight import PlanError
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.launch import demo_sequence
from _helpers import run_with_worker

from livestain.stackio import write_stack

PRESETS = ["Brightfield", "Dna", "Membrane", "Mitochondria"]


def test_the_light_budget_refuses_a_plan_and_names_the_every_that_fits() -> None:
    seq = demo_sequence(timepoints=40)
    # 1 of 3 structures every 10 of 40 time points: 4 / (40 x 3) = 3.3% of a fluorescence run
    assert dose_fraction(40, 10, 1, 3, 50.0, 50.0) == pytest.approx(4 / 120)
    with pytest.raises(PlanError, match=r"set checks.every to 14 or more"):
        with_check_channels(seq, CheckPolicy(every=2, dose_budget=0.025), PRESETS, 3, 50.0)
    added = with_check_channels(seq, CheckPolicy(every=10), PRESETS, 3, 50.0)
    dna = added.channels[-1]
    assert dna.config == "Dna" and dna.acquire_every == 10  # case-insensitive preset match
    with pytest.raises(PlanError, match="no channel preset for 'actin'"):
        with_check_channels(seq, CheckPolicy(every=10, structures=("actin",)), PRESETS, 3, 50.0)


def test_a_check_is_scored_whichever_of_the_pair_arrives_first(tmp_path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((4, 32, 32)).astype(np.float32) * 1000
    z = (truth - truth.mean()) / truth.std()  # the model predicts in z-score units
    prediction = np.stack([z + rng.normal(0, 0.3, truth.shape).astype(np.float32),
                           rng.random(truth.shape).astype(np.float32)])
    write_stack(tmp_path / "check.ome.tif", truth.astype(np.uint16), voxel_size_um=(1, 1, 1), info={})
    write_stack(tmp_path / "pred.ome.tif", prediction, voxel_size_um=(1, 1, 1), info={})
    scorer = CheckScorer(CheckPolicy(every=2), {"Dna": "dna"})
    assert scorer.prediction_written(1, 0, tmp_path / "pred.ome.tif", ("dna", "membrane")) == []  # not a check t
    assert scorer.stack_written(0, 0, "Dna", tmp_path / "check.ome.tif") == []  # waits for its prediction
    (score,) = scorer.prediction_written(0, 0, tmp_path / "pred.ome.tif", ("dna", "membrane"))
    assert score.structure == "dna" and score.pearson > 0.8 and 0 < score.nrmse < 1
    assert scorer.prediction_written(2, 0, tmp_path / "pred.ome.tif", ("dna", "membrane")) == []
    (again,) = scorer.stack_written(2, 0, "Dna", tmp_path / "check.ome.tif")  # prediction first this time
    assert again.pearson == score.pearson
    assert scorer.status()["checks"]["dna"]["count"] == 2
    assert not scorer._checks and not scorer._predictions  # nothing left waiting


def test_check_frames_are_scored_in_a_real_run_within_the_budget(tmp_path, base_port, qapp) -> None:
    from livestain.inference.predict import Predictor

    eps = wire.endpoints(base_port=base_port)
    policies = Policies(checks=CheckPolicy(every=2, dose_budget=0.2), drain_timeout_s=120.0)
    scope = SimulatedScope(seed=3)
    lines: list[str] = []
    daemon = Daemon(build_simulated_core(scope), demo_sequence(4, 0.0), tmp_path / "run", eps, policies,
                    report=lines.append)
    summary, status = run_with_worker(daemon, eps, Predictor(None, "cpu"), input_checks=False)
    assert summary.acquired == 6 and summary.predicted == 4  # 4 brightfield + 2 check stacks
    checks = status["checks"]["dna"]
    assert checks["count"] == 2 and checks["last"]["t"] == 2
    assert checks["last"]["pearson"] >= 0.85  # the bundled model on its own simulator, real fluorescence
    assert sum("check dna: prediction vs real fluorescence r" in ln for ln in lines) == 2
    fraction = status["fluorescence_dose_ms"] / status["equivalent_fluorescence_run_dose_ms"]
    assert 0 < fraction <= 0.2  # measured by the scope's own light ledger
    report = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert report["stacks"]["acquired"] == 6 and report["stacks"]["predicted"] == 4
    dna = report["checks"]["structures"]["dna"]
    assert [r["t"] for r in dna["live_r"]] == [0, 2] and dna["worst_pearson"] >= 0.85
    assert report["fluorescence_dose"]["fraction"] == pytest.approx(fraction, rel=1e-3)
    assert report["ended"] == "plan complete" and report["models"] is not None
    assert set(report["focus"]["positions"]["0"][0]) == {"t", "offset_um", "z_correction_um"}
    assert audit_run(tmp_path / "run", deep=False).ok  # the check stacks are planned, on disk
    from livestain.ui.status_panel import StatusPanel

    from livestain.ui.focus_plot import CheckPlot

    panel, plot = StatusPanel(), CheckPlot()  # the window, fed the real daemon's replies
    panel.show_status(status)
    assert panel.text("checks") == f"dna: r {checks['last']['pearson']:.2f} at t 3 p 1 (2 checked)"
    plot.add_status(status | {"checks": {"dna": {"last": {"t": 0, "p": 0, "pearson": 0.5}}}})
    plot.add_status(status)
    plot.add_status(status)  # the same check again: drawn once
    xs, ys = plot._curves[("dna", "0")].getData()
    assert list(xs) == [1, 3] and ys[-1] == pytest.approx(checks["last"]["pearson"])
    panel.close()
    panel.deleteLater()
    plot.close()
    plot.deleteLater()  # on the GUI thread, not by a later test's garbage collection


def test_doubt_adds_a_check_frame_at_the_next_time_point_until_the_budget_is_spent(tmp_path, base_port) -> None:
    """Fluorescence on doubt (issue 12, item 3): a check scoring below ``when_r_below``
    brings a check frame at the position's next time point, and the light budget caps
    them (here: room for one beyond the planned check at t 1)."""
    from livestain.inference.predict import Predictor

    eps = wire.endpoints(base_port=base_port)
    # every 4 of 4 time points: 1 planned check of 12 fluorescence stacks (4 t x 3 structures);
    # a budget of 17% allows 2: one on doubt. r < 1.0 is always doubtful.
    policies = Policies(checks=CheckPolicy(every=4, dose_budget=0.17, when_r_below=1.0), drain_timeout_s=120.0)
    lines: list[str] = []
    daemon = Daemon(build_simulated_core(SimulatedScope(seed=3)), demo_sequence(4, 2.0), tmp_path / "run", eps,
                    policies, report=lines.append)
    summary, status = run_with_worker(daemon, eps, Predictor(None, "cpu"), input_checks=False)
    assert summary.acquired == 6 and summary.predicted == 4  # 4 brightfield, 1 planned + 1 doubt check
    assert status["checks"]["dna"]["count"] == 2 and status["checks_on_doubt"] == 1
    assert status["stacks_total"] == 6  # the added stack counts towards the plan's progress
    report = json.loads((tmp_path / "run" / "summary.json").read_text())
    first, second = report["checks"]["structures"]["dna"]["live_r"]
    assert first["t"] == 0 and first["reason"] == "every 4 time points"
    assert second["t"] > 0 and second["reason"].startswith("check r ") and "< 1 (dna)" in second["reason"]
    assert any("light budget" in ln and "is spent" in ln for ln in lines)  # the third is refused, and said
    assert report["fluorescence_dose"]["fraction"] <= 0.17
    assert audit_run(tmp_path / "run", deep=False).ok

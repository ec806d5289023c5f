"""Live per-voxel uncertainty (issue 11, item 4): a worker started with --uncertainty
sends each structure's uncertainty as extra channels, the per-stack confidence comes from
it, and the window swaps structures for their uncertainty with one box."""

from __future__ import annotations


import numpy as np

from livestain import wire
from livestain.acquisition.daemon import Daemon
from livestain.acquisition.policies import Policies
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.launch import demo_sequence
from livestain.run_reader import RunReader
from _helpers import run_with_worker



def test_a_worker_with_uncertainty_sends_it_beside_each_structure(tmp_path, base_port) -> None:
    from livestain.inference.predict import Predictor

    eps = wire.endpoints(base_port=base_port)
    daemon = Daemon(build_simulated_core(SimulatedScope(seed=2)), demo_sequence(1, 0.0), tmp_path / "run", eps,
                    Policies(drain_timeout_s=120.0), report=lambda line: None)
    summary, status = run_with_worker(daemon, eps, Predictor(None, "cpu"), uncertainty=True)
    assert summary.predicted == 1
    prediction, info = RunReader(tmp_path / "run").prediction(0)
    names = ["dna", "membrane", "mitochondria"]
    assert info["structures"] == names + [f"{s}{wire.UNCERTAINTY_SUFFIX}" for s in names]
    assert prediction.shape[0] == 6
    uncertainty = prediction[3:]
    assert (uncertainty >= 0).all() and uncertainty.mean() > 0  # a spread, in z-score units
    # the confidence now comes from the uncertainty, not only from the input checks
    per = info["confidence_per_structure"]
    assert set(per) == set(names) and all(0 < v < 1 for v in per.values())
    assert status["last_confidence"]["confidence"] < 1


def test_the_window_swaps_structures_for_their_uncertainty(qapp) -> None:
    from livestain.ui.structure_panel import StructurePanel

    panel = StructurePanel()
    assert panel.uncertainty_check.isHidden()  # no uncertainty channels yet: no box
    for name in ("dna", "membrane", "dna_uncertainty", "membrane_uncertainty"):
        panel.ensure(name)
    assert not panel.uncertainty_check.isHidden()
    visible = {n: s.visible for n, s in panel.styles.items()}
    assert visible == {"dna": True, "membrane": True, "dna_uncertainty": False, "membrane_uncertainty": False}
    assert panel.styles["dna_uncertainty"].color == panel.styles["dna"].color
    panel.uncertainty_check.setChecked(True)
    visible = {n: s.visible for n, s in panel.styles.items()}
    assert visible == {"dna": False, "membrane": False, "dna_uncertainty": True, "membrane_uncertainty": True}
    assert panel.checks["dna_uncertainty"].isChecked() and not panel.checks["dna"].isChecked()
    panel.uncertainty_check.setChecked(False)
    assert panel.styles["dna"].visible and not panel.styles["dna_uncertainty"].visible
    assert np.isfinite(panel.default_opacity)

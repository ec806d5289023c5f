"""Brightfield or phase contrast, from the stack, and the bundled model made for each
(issue 11: the brightfield model scored DNA r 0.38 on phase contrast; a phase-contrast
fine-tune scored 0.89 there and lost brightfield, so the worker picks per stack)."""

from __future__ import annotations

import numpy as np
import pytest

from livestain.devices import randomize
from livestain.inference.checkpoint import bundled_model_path
from livestain.inference.predict import Predictor
from livestain.metrics import pearson
from livestain.modality import BRIGHTFIELD, PHASE, detect_modality

pytestmark = pytest.mark.skipif(not bundled_model_path("phase").is_file(),
                                reason="the bundled phase-contrast model is not installed")


def _field(modality: str, seed: int = 7331, focus_offset_um: float = 0.0, size: int = 128):
    p = randomize.training_default()
    p.update(modality=modality, focus_offset_um=focus_offset_um)
    if modality == PHASE:
        p["phase_ring_amplitude"] = 0.5
    return randomize.render(p, seed, (0, 0), size)[0]


@pytest.mark.parametrize("offset", [0.0, -4.0, 4.0])
@pytest.mark.parametrize("modality", [BRIGHTFIELD, PHASE])
def test_the_modality_is_read_from_the_stack(modality, offset) -> None:
    est = detect_modality(_field(modality, focus_offset_um=offset).brightfield)
    assert est.modality == modality, est.reason
    if modality == BRIGHTFIELD:
        assert est.sign_change > 0.3  # the halos reverse through focus
    else:
        assert est.sign_change < 0.05 and est.skew > 1.5


def test_without_a_pattern_it_is_taken_for_brightfield() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(1000, 20, (16, 64, 64)).astype(np.float32)
    for stack, words in [(noise, "no pattern"), (noise[:3], "too few planes")]:
        est = detect_modality(stack)
        assert est.modality == BRIGHTFIELD and words in est.reason


def test_the_bundled_predictor_predicts_each_stack_with_the_model_for_its_modality() -> None:
    phase, bright = _field(PHASE, seed=8443), _field(BRIGHTFIELD, seed=8443)
    routed = Predictor(None, "cpu")
    pinned = Predictor(None, "cpu", modality=BRIGHTFIELD)
    r = {}
    for name, predictor in [("routed", routed), ("brightfield only", pinned)]:
        pred = predictor.predict(phase.brightfield, phase.voxel_size_um)
        r[name] = pearson(pred[0], phase.targets[0])
        if name == "routed":
            assert predictor.model.name.startswith("bundled-phase@")
            assert predictor.last_modality is not None and predictor.last_modality.modality == PHASE
        else:
            assert predictor.model.name.startswith("bundled@") and predictor.last_modality is None
    assert r["routed"] >= 0.8 and r["routed"] >= r["brightfield only"] + 0.3, r
    # the next brightfield stack goes back to the brightfield model, and is as good as pinned
    pred = routed.predict(bright.brightfield, bright.voxel_size_um)
    assert routed.model.name.startswith("bundled@")
    np.testing.assert_allclose(pred, pinned.predict(bright.brightfield, bright.voxel_size_um), atol=1e-5)


def test_a_model_of_your_own_is_never_swapped(tmp_path) -> None:
    own = Predictor(str(bundled_model_path()), "cpu")
    own.predict(_field(PHASE).brightfield)
    assert own.model.name.startswith("bundled@") and own.last_modality is None
    with pytest.raises(ValueError, match="bundled models"):
        Predictor(str(bundled_model_path()), "cpu", modality=PHASE)
    with pytest.raises(ValueError, match="modality must be"):
        Predictor(None, "cpu", modality="dic")


@pytest.mark.parametrize(("offset", "flagged_end"), [(0.0, None), (-8.0, "last"), (8.0, "first")])
def test_a_phase_stack_is_out_of_focus_only_when_sharpest_at_its_end(offset, flagged_end) -> None:
    """Phase contrast peaks at focus: no brightfield minimum is expected of it."""
    from livestain.inference.ood import check_stack

    pair = _field(PHASE, seed=8443, focus_offset_um=offset)
    report = check_stack(pair.brightfield, pair.voxel_size_um)
    assert report.stats["modality"] == PHASE
    if flagged_end is None:
        assert report.codes == []
    else:
        assert report.codes == ["out_of_focus"]
        assert f"sharpest at the stack's {flagged_end} plane" in report.flags[0].reason
    bright = _field(BRIGHTFIELD, seed=8443, focus_offset_um=offset)
    assert ("out_of_focus" in check_stack(bright.brightfield, bright.voxel_size_um).codes) == (offset != 0.0)


def test_the_worker_says_which_model_and_modality_made_each_prediction(base_port) -> None:
    """Over real sockets: a phase stack then a brightfield one, each header naming its model."""
    import threading

    from livestain import wire
    from livestain.acquisition.streaming import DaemonSockets
    from livestain.inference.worker import Worker

    eps = wire.endpoints(base_port=base_port)
    daemon = DaemonSockets(eps)
    worker = Worker(eps["stacks"], eps["results"], Predictor(None, "cpu"), shm=False)
    thread = threading.Thread(target=worker.serve, kwargs={"max_stacks": 2}, daemon=True)
    thread.start()
    results = []
    try:
        for seq, modality in enumerate((PHASE, BRIGHTFIELD)):
            stack = _field(modality, seed=9551).brightfield
            daemon.offer(wire.StackHeader(kind="stack", run_id="r", seq=seq, t=seq, p=0, shape=list(stack.shape),
                                          dtype=str(stack.dtype), voxel_size_um=[1.0, 0.325, 0.325]), stack)
            for _ in range(600):
                daemon.receive_ready()
                daemon.pump()
                if daemon.results.poll(100):
                    results.append(daemon.receive_result()[0])
                    break
        thread.join(timeout=30)
    finally:
        worker.close()
        daemon.close()
    assert [h.model.split("@")[0] for h in results] == ["bundled-phase", "bundled"]
    assert [h.model_extra["modality"] for h in results] == [PHASE, BRIGHTFIELD]
    assert "phase contrast" in results[0].model_extra["modality_reason"]

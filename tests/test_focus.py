"""The cells' focal plane from brightfield alone, and predicting from the model's z window
centred on it (issue 11: a stack taller than the model's, or off-centre on the cells,
collapsed the bundled model's r)."""

from __future__ import annotations

import numpy as np
import pytest

from livestain.devices import randomize
from livestain.focus import estimate_focus
from livestain.inference import zwindow


def _field(n_planes: int = 16, z_step_um: float = 1.0, focus_offset_um: float = 0.0, seed: int = 7331,
           size: int = 64):
    p = randomize.training_default()
    p.update(n_planes=n_planes, z_step_um=z_step_um, z_range_um=(n_planes - 1) * z_step_um,
             focus_offset_um=focus_offset_um)
    pair, record = randomize.render(p, seed, (0, 0), size)
    truth_offset = record["cells_mid_um"] - float(np.mean(pair.z_um))  # from the stack's centre
    return pair, truth_offset


@pytest.mark.parametrize(("n", "step", "offset"), [(16, 1.0, 0.0), (16, 1.0, -4.0), (16, 1.0, 5.0),
                                                   (40, 1.0, 6.0), (16, 0.3, 0.0), (16, 2.0, 0.0)])
def test_the_focal_plane_is_found_where_the_cells_are(n, step, offset) -> None:
    pair, truth = _field(n, step, offset)
    est = estimate_focus(pair.brightfield, step)
    assert est.offset_um is not None, est.reason
    assert abs(est.offset_um - truth) <= max(0.5, 0.6 * step)  # within half a micrometre, or a plane


def test_no_focus_is_claimed_when_the_cells_are_outside_the_stack() -> None:
    pair, truth = _field(16, 1.0, 9.0)
    assert abs(truth) > 8  # the cells lie beyond the stack's last plane
    est = estimate_focus(pair.brightfield, 1.0)
    assert est.plane is None and "outside" in est.reason
    flat = np.full((16, 64, 64), 1000, np.uint16)
    assert estimate_focus(flat, 1.0).plane is None
    assert "too few" in estimate_focus(pair.brightfield[:4], 1.0).reason


def test_the_window_prediction_is_put_back_in_place_with_the_background_outside() -> None:
    stack = np.zeros((30, 8, 8), np.uint16)
    window = zwindow.Window(first=10, indices=np.arange(10, 26), focus=estimate_focus(stack, 1.0))
    part = np.stack([np.arange(16, dtype=np.float32)[:, None, None] * np.ones((1, 8, 8), np.float32) + 100 * s
                     for s in range(2)])
    full = zwindow.place(part, window, 30)
    assert full.shape == (2, 30, 8, 8)
    np.testing.assert_array_equal(full[:, 10:26], part)
    assert (full[0, :10] == 0).all() and (full[0, 26:] == 15).all()  # the nearest edge plane's median
    assert (full[1, :10] == 100).all() and (full[1, 26:] == 115).all()
    # a window hanging over the stack's start (cells near its first plane): the rest is placed
    early = zwindow.Window(first=-4, indices=np.clip(np.arange(-4, 12), 0, 29), focus=window.focus)
    full = zwindow.place(part, early, 30)
    np.testing.assert_array_equal(full[:, :12], part[:, 4:])
    assert (full[0, 12:] == 15).all()


def test_the_window_is_where_training_put_the_cells() -> None:
    pair, _ = _field(32, 1.0, 0.0)
    focus = estimate_focus(pair.brightfield, 1.0)
    w = zwindow.plan_window(pair.brightfield, 1.0, 16.0, focus, focus_offset_um=-0.6)
    assert w is not None and w.size == 16
    centre = w.first + 7.5
    assert abs((focus.plane - centre) - (-0.6)) <= 0.5  # the cells sit 0.6 um below its centre
    assert zwindow.plan_window(pair.brightfield[:4], 1.0, 16.0) is None  # no focus: predict as is


def test_a_tall_stack_is_predicted_as_well_as_the_training_one_only_with_the_window() -> None:
    """The bundled model on a 36-plane stack: r collapses without the window (measured on
    main before it: DNA 0.12-0.29 at 32-40 planes) and holds with it."""
    from livestain.inference.evaluate import pearson
    from livestain.inference.predict import Predictor

    pair, _ = _field(36, 1.0, 0.0, seed=8443, size=96)
    predictor = Predictor(None, "cpu")
    windowed = predictor.predict(pair.brightfield, pair.voxel_size_um)
    assert predictor.last_focus is not None and predictor.last_focus.plane is not None
    whole = predictor.predict(pair.brightfield, pair.voxel_size_um, focus_window=False)
    dna = pair.structures.index("dna")
    r_window = pearson(windowed[dna], pair.targets[dna])
    r_whole = pearson(whole[dna], pair.targets[dna])
    assert r_window >= 0.8, r_window
    assert r_window - r_whole >= 0.3, (r_window, r_whole)

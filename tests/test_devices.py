"""The simulated microscope: real pymmcore-plus devices imaging one seeded 3D sample."""

from __future__ import annotations

import numpy as np
import pytest
import useq

from livestain.devices.optics import FieldRenderer
from livestain.devices.pairs import simulate_pairs
from livestain.devices.sample import make_field
from livestain.devices.simulated import CHANNELS, SimulatedScope, build_simulated_core


@pytest.fixture(scope="module")
def core():
    return build_simulated_core(SimulatedScope(seed=3))


def test_core_has_camera_stages_light_path_shutter_channels_and_pixel_size(core) -> None:
    assert core.getCameraDevice() == "Camera"
    assert core.getFocusDevice() == "Z"
    assert core.getXYStageDevice() == "XY"
    assert core.getShutterDevice() == "Shutter"
    assert tuple(core.getAvailableConfigs("Channel")) == CHANNELS
    assert core.getPixelSizeUm() == pytest.approx(0.325)
    assert (core.getImageHeight(), core.getImageWidth()) == (256, 256)


def test_snap_shows_lit_brightfield_and_dark_frames_with_shutter_closed(core) -> None:
    core.setConfig("Channel", "Brightfield")
    core.snapImage()
    lit = core.getImage()
    assert lit.dtype == np.uint16
    # background = offset + 300 photons/ms x 10 ms
    assert 2900 < np.median(lit) < 3300
    assert not core.getShutterOpen()  # auto-shutter closed it again
    core.setAutoShutter(False)
    try:
        core.snapImage()
        dark = core.getImage()
    finally:
        core.setAutoShutter(True)
    assert abs(float(dark.mean()) - 100.0) < 2.0  # offset and read noise only


def test_fluorescence_lies_on_the_labelled_structure(core) -> None:
    scope = core.livestain_scope
    core.setXYPosition(0.0, 0.0)
    core.setPosition(scope.z_um)
    core.setConfig("Channel", "Dna")
    core.snapImage()
    img = core.getImage().astype(float)
    core.setConfig("Channel", "Brightfield")
    dna = make_field(3, (0, 0), scope.geometry).labels["dna"].max(axis=0) > 0
    assert dna.any() and (~dna).any()
    assert img[dna].mean() > 2 * img[~dna].mean()


def test_brightfield_contrast_is_weakest_near_focus_and_reverses_across_it() -> None:
    field = make_field(5)
    r = FieldRenderer(field)
    z_cells = 5.0 + field.geometry.z0_um + 3.5  # coverslip at stage 0, cells ~3.5 um high
    contrast = {dz: float(r.brightfield(z_cells + dz).std()) for dz in (-6, -3, 0, 3, 6)}
    assert contrast[0] < min(contrast[-6], contrast[6])
    # the halo at the cell edges flips sign from one side of focus to the other
    edge = field.labels["membrane"].max(axis=0) > 0
    below = r.brightfield(z_cells - 6)[edge] - 1
    above = r.brightfield(z_cells + 6)[edge] - 1
    assert np.corrcoef(below, above)[0, 1] < 0


def test_same_seed_same_cells_and_other_positions_other_cells() -> None:
    a = make_field(11, (0, 0)).delta_n
    b = make_field(11, (0, 0)).delta_n
    c = make_field(11, (0, 1)).delta_n
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mda_runs_a_z_stack_at_the_planned_focus_positions(core) -> None:
    seq = useq.MDASequence(
        stage_positions=[{"x": 0, "y": 0, "z": 4.0}],
        channels=["Brightfield"],
        z_plan={"range": 4.0, "step": 1.0},
    )
    seen: list[tuple[int, float, float]] = []
    scope = core.livestain_scope
    core.mda.events.frameReady.connect(
        lambda img, ev, meta: seen.append((ev.index["z"], ev.z_pos, scope.z_um))
    )
    core.mda.run(seq)
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
    assert [s[2] for s in seen] == pytest.approx([2.0, 3.0, 4.0, 5.0, 6.0])


def test_simulated_pairs_are_reproducible_and_aligned() -> None:
    (p1,) = simulate_pairs([(2, 2)], seed=9)
    (p2,) = simulate_pairs([(2, 2)], seed=9)
    np.testing.assert_array_equal(p1.brightfield, p2.brightfield)
    assert p1.targets.shape == (3, *p1.brightfield.shape)
    assert p1.structures == ("dna", "membrane", "mitochondria")
    assert p1.voxel_size_um == pytest.approx((1.0, 0.325, 0.325))

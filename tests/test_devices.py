"""The simulated microscope: real pymmcore-plus devices imaging one seeded 3D sample."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tifffile
import useq
from scipy import ndimage

from livestain.devices.dose import PhotoConfig, bleach_factor
from livestain.devices.optics import FieldRenderer
from livestain.devices.pairs import simulate_pairs
from livestain.devices.sample import SampleGeometry, make_field
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


# -- physics of the rendered stacks ---------------------------------------------------

SMALL = SampleGeometry(shape=(40, 128, 128))  # 41.6 um fields: fast, still whole cells
Z_CELLS = 3.5  # stage z of the cells' mid-plane (coverslip at 0, cells ~7 um high)


def _cell_pixels(field) -> np.ndarray:
    return field.delta_n.max(axis=0) > 0


def test_brightfield_halo_changes_sign_across_focus_at_the_same_cell_pixels() -> None:
    field = make_field(2, (0, 0), SMALL)
    r = FieldRenderer(field)
    # where the projected phase has a sharp maximum (nucleoli, droplets, cell centres),
    # defocus makes a bright spot on one side of focus and a dark one on the other
    phase = field.delta_n.sum(axis=0)
    lap = ndimage.laplace(ndimage.gaussian_filter(phase, 1.0))
    peaks = _cell_pixels(field) & (lap < np.percentile(lap[_cell_pixels(field)], 3))
    below = r.brightfield(Z_CELLS - 4)[peaks] - 1
    above = r.brightfield(Z_CELLS + 4)[peaks] - 1
    assert peaks.sum() > 50
    assert np.sign(below.mean()) == -np.sign(above.mean())
    assert abs(below.mean()) > 0.02 and abs(above.mean()) > 0.02
    assert np.mean(np.sign(below) != np.sign(above)) > 0.8  # pixel by pixel, not on average only


def test_brightfield_contrast_is_lowest_near_focus_and_grows_with_defocus() -> None:
    field = make_field(4, (0, 0), SMALL)
    r = FieldRenderer(field)
    cells = _cell_pixels(field)
    zs = np.arange(-8.0, 16.5, 1.0)
    contrast = np.array([r.brightfield(z)[cells].std() for z in zs])
    i = int(np.argmin(contrast))
    assert abs(zs[i] - Z_CELLS) <= 1.5, (zs[i], contrast.round(3))
    # out of focus on either side, the halos grow (up to ~2 um beyond the cell's
    # surfaces, then the partial-coherence envelope blurs them slowly away)
    assert contrast[i] < contrast[i - 1] < contrast[i - 2]
    assert contrast[i] < contrast[i + 1] < contrast[i + 2]
    assert min(contrast[i - 2], contrast[i + 2]) > 1.5 * contrast[i]
    six = np.isin(zs, (Z_CELLS - 6.5, Z_CELLS + 6.5))  # ~3 um beyond the cells' surfaces
    assert six.sum() == 2 and contrast[six].min() > 1.3 * contrast[i]


@pytest.mark.parametrize("channel", ["Dna", "Membrane", "Mitochondria"])
def test_each_fluorescence_channel_lies_on_its_own_structure(channel) -> None:
    scope = SimulatedScope(seed=6, geometry=SMALL, exposure_ms=50.0)
    scope.clock = lambda: 0.0
    core = build_simulated_core(scope)
    core.setPosition(Z_CELLS)
    core.setConfig("Channel", channel)
    core.snapImage()
    img = core.getImage().astype(float) - scope.optics.offset_adu
    field = scope.renderer((0, 0)).sample
    near = np.abs(field.geometry.plane_z_um() - Z_CELLS) <= 1.0  # planes in focus
    masks = {s: field.labels[s][near].max(axis=0) > 0 for s in field.labels}
    own = masks[channel.lower()]
    assert img[own].mean() > 3 * img[~own].mean()
    # and it is this structure, not another one, that the channel shows
    blurred = {s: ndimage.gaussian_filter(field.labels[s][near].mean(axis=0), 1.0) for s in field.labels}
    r = {s: np.corrcoef(img.ravel(), b.ravel())[0, 1] for s, b in blurred.items()}
    assert max(r, key=r.get) == channel.lower(), r


def _zstack(core, channel: str = "Brightfield", n: int = 4) -> np.ndarray:
    seq = useq.MDASequence(stage_positions=[{"x": 0, "y": 0, "z": Z_CELLS}],
                           channels=[channel], z_plan={"range": n - 1.0, "step": 1.0})
    frames: list[np.ndarray] = []
    core.mda.events.frameReady.connect(lambda img, ev, meta: frames.append(img.copy()))
    core.mda.run(seq)
    return np.stack(frames)


def test_same_seed_same_stacks_other_seed_other_stacks() -> None:
    def stacks(seed: int) -> list[np.ndarray]:
        scope = SimulatedScope(seed=seed, geometry=SMALL)
        scope.clock = lambda: 30.0
        core = build_simulated_core(scope)
        return [_zstack(core, "Brightfield"), _zstack(core, "Mitochondria")]

    a, b, c = stacks(8), stacks(8), stacks(9)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


# -- light dose, bleaching, harm ------------------------------------------------------

def _snaps(core, channel: str, n: int) -> list[np.ndarray]:
    core.setConfig("Channel", channel)
    out = []
    for _ in range(n):
        core.snapImage()
        out.append(core.getImage().astype(float))
    return out


def test_bleaching_lowers_each_channels_signal_with_its_own_dose() -> None:
    scope = SimulatedScope(seed=3, geometry=SMALL, exposure_ms=100.0)
    scope.clock = lambda: 0.0
    core = build_simulated_core(scope)
    core.setPosition(Z_CELLS)
    offset = scope.optics.offset_adu
    signal = [img.mean() - offset for img in _snaps(core, "Dna", 20)]
    k = scope.photo.bleach_dose_ms["dna"]
    # frame i integrates exp(-dose/k) over dose 100 i .. 100 (i + 1)
    expected = [bleach_factor(100.0 * i, 100.0 * (i + 1), k) for i in range(20)]
    measured = np.array(signal) / signal[0]
    np.testing.assert_allclose(measured, np.array(expected) / expected[0], rtol=0.02)
    assert measured[-1] < 0.55  # 2000 ms of 3000: e^-2/3 = 0.51
    # the membrane dye at this position and the DNA dye at another were not bleached
    membrane = _snaps(core, "Membrane", 1)[0].mean() - offset
    fresh = SimulatedScope(seed=3, geometry=SMALL, exposure_ms=100.0)
    fresh_membrane = fresh.expected_plane("Membrane", Z_CELLS, (0, 0), t_s=0.0).mean()
    assert membrane == pytest.approx(fresh_membrane * bleach_factor(0, 100, 1500.0), rel=0.02)
    core.setXYPosition(SMALL.field_um[1], 0.0)
    other = _snaps(core, "Dna", 1)[0].mean() - offset
    other_fresh = fresh.expected_plane("Dna", Z_CELLS, (0, 1), t_s=0.0).mean()
    assert other == pytest.approx(other_fresh * bleach_factor(0, 100, k), rel=0.02)


def test_ledger_counts_every_exposure_per_channel_and_position() -> None:
    scope = SimulatedScope(seed=1, geometry=SMALL, exposure_ms=20.0)
    core = build_simulated_core(scope)
    core.setProperty("LightPath", "Intensity", 50.0)
    _snaps(core, "Dna", 3)
    _snaps(core, "Mitochondria", 2)
    _snaps(core, "Brightfield", 4)
    core.setXYPosition(SMALL.field_um[1], 0.0)  # tile (0, 1)
    core.setExposure(40.0)
    _snaps(core, "Membrane", 1)
    core.setAutoShutter(False)  # shutter closed: no light, no entry
    _snaps(core, "Dna", 5)
    core.setAutoShutter(True)
    ledger = json.loads(core.getProperty("Camera", "DoseLedger"))
    assert ledger == scope.dose_ledger()
    p0, p1 = ledger["positions"]["0,0"], ledger["positions"]["0,1"]
    assert p0["channels"] == {
        "Dna": {"dose": 30.0, "exposures": 3},  # 3 x 20 ms x 50 %
        "Mitochondria": {"dose": 20.0, "exposures": 2},
        "Brightfield": {"dose": 0.0, "exposures": 4},
    }
    assert p0["fluorescence_dose"] == 50.0 and p0["harmed_at_s"] is None
    assert p1["channels"] == {"Membrane": {"dose": 20.0, "exposures": 1}}


def test_brightfield_light_adds_no_dose_and_bleaches_nothing() -> None:
    scope = SimulatedScope(seed=1, geometry=SMALL, exposure_ms=100.0)
    scope.clock = lambda: 50.0
    core = build_simulated_core(scope)
    before = scope.expected_plane("Mitochondria", Z_CELLS, (0, 0))
    _snaps(core, "Brightfield", 30)
    after = scope.expected_plane("Mitochondria", Z_CELLS, (0, 0))
    np.testing.assert_array_equal(before, after)
    assert scope.ledger.fluorescence_dose((0, 0)) == 0.0
    assert scope.dose_ledger()["positions"]["0,0"]["channels"]["Brightfield"] == \
        {"dose": 0.0, "exposures": 30}


# -- motion with the scope's clock ----------------------------------------------------

def _shift_of(template: np.ndarray, image: np.ndarray, mask: np.ndarray, search: int) -> np.ndarray:
    """(dy, dx) moving ``template`` (inside ``mask``) onto ``image``: the peak of their
    cross-correlation within +-search pixels."""
    t = np.where(mask, template - template[mask].mean(), 0.0)
    xc = np.fft.irfft2(np.conj(np.fft.rfft2(t)) * np.fft.rfft2(image - image.mean()), s=image.shape)
    lags = np.fft.fftfreq(image.shape[0], 1 / image.shape[0]).astype(int)
    ok = (np.abs(lags)[:, None] <= search) & (np.abs(lags)[None, :] <= search)
    iy, ix = np.unravel_index(np.argmax(np.where(ok, xc, -np.inf)), xc.shape)
    return np.array([lags[iy], lags[ix]])


def test_cells_migrate_with_the_clock_measured_by_cross_correlation() -> None:
    scope = SimulatedScope(seed=3)
    core = build_simulated_core(scope)
    core.setPosition(Z_CELLS)
    core.setConfig("Channel", "Dna")
    images = {}
    for t in (0.0, 600.0):
        scope.clock = lambda t=t: t
        images[t] = scope.expected_plane("Dna", Z_CELLS, (0, 0))
    field = scope.renderer((0, 0)).sample
    expected_px = field.displacement(600.0) / scope.pixel_size_um
    moved = 0
    for i, comp in enumerate(field.components):
        if comp.kind != "cell":
            continue
        nucleus = np.zeros(field.geometry.shape[1:], bool)
        z0, y0, x0 = comp.offset
        nucleus[y0:y0 + comp.delta_n.shape[1], x0:x0 + comp.delta_n.shape[2]] = \
            comp.labels["dna"].max(axis=0) > 0
        nucleus = ndimage.binary_dilation(nucleus, iterations=4)
        measured = _shift_of(images[0.0], images[600.0], nucleus, search=25)
        assert np.abs(measured - expected_px[i]).max() <= 1.0, (i, measured, expected_px[i])
        moved += np.abs(expected_px[i]).max() > 3
    assert moved >= 2  # the cells really moved, by more than 1 um


def test_mitochondria_move_faster_than_their_cells() -> None:
    scope = SimulatedScope(seed=5, geometry=SMALL)
    change = {}
    for ch in ("Dna", "Mitochondria"):
        a = scope.expected_plane(ch, Z_CELLS, (0, 0), t_s=0.0)
        b = scope.expected_plane(ch, Z_CELLS, (0, 0), t_s=20.0)
        change[ch] = 1 - np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert change["Mitochondria"] > 0.05
    assert change["Mitochondria"] > 3 * change["Dna"]


def test_cells_harmed_by_fluorescence_stop_moving_and_others_go_on() -> None:
    scope = SimulatedScope(seed=5, geometry=SMALL, exposure_ms=50.0,
                           photo=PhotoConfig(harm_dose_ms=400.0))
    scope.clock = lambda: 100.0
    core = build_simulated_core(scope)
    _snaps(core, "Mitochondria", 9)  # 450 ms: harmed at t = 100 s
    assert scope.ledger.harmed_at((0, 0)) == 100.0
    assert scope.dose_ledger()["positions"]["0,0"]["harmed_at_s"] == 100.0
    for tile, should_move in (((0, 0), False), ((0, 1), True)):
        a = scope.expected_plane("Brightfield", Z_CELLS, tile, t_s=100.0)
        b = scope.expected_plane("Brightfield", Z_CELLS, tile, t_s=1000.0)
        assert np.array_equal(a, b) != should_move
    still = scope.displacement((0, 0), 5000.0)
    np.testing.assert_array_equal(still, scope.displacement((0, 0), 100.0))


# -- camera and focus drive -----------------------------------------------------------

def test_binning_roi_bit_depth_and_pixel_size() -> None:
    scope = SimulatedScope(seed=2, geometry=SMALL)
    core = build_simulated_core(scope)
    core.snapImage()
    full = core.getImage().astype(float)
    core.setProperty("Camera", "Binning", "2")
    assert core.getPixelSizeUm() == pytest.approx(0.65)
    assert (core.getImageHeight(), core.getImageWidth()) == (64, 64)
    core.snapImage()
    summed = core.getImage().astype(float)
    assert summed.shape == (64, 64)
    # on-chip sum: four pixels' light, one offset
    assert summed.mean() - 100 == pytest.approx(4 * (full.mean() - 100), rel=0.01)
    core.setProperty("Camera", "BinningMode", "Average")
    core.snapImage()
    assert core.getImage().mean() == pytest.approx(full.mean(), rel=0.01)
    with pytest.raises(ValueError):
        core.setProperty("Camera", "Binning", 3)
    core.setProperty("Camera", "Binning", 1)
    core.setROI(10, 20, 50, 30)
    core.snapImage()
    assert core.getImage().shape == (30, 50)
    core.clearROI()
    core.setProperty("Camera", "BitDepth", 10)
    core.snapImage()
    assert core.getImageBitDepth() == 10
    assert core.getImage().max() == 1023  # brightfield background (~3100) clips
    core.setExposure(1.0)
    core.snapImage()
    assert 300 < core.getImage().mean() < 500  # 1 ms: offset + 300 photons
    assert core.getPixelSizeUm() == pytest.approx(scope.optics.camera_pixel_um / scope.optics.magnification)


def _best_plane(img: np.ndarray, scope: SimulatedScope, zs) -> float:
    r = {z: np.corrcoef(img.ravel().astype(float),
                        scope.expected_plane("Brightfield", z, (0, 0)).ravel())[0, 1] for z in zs}
    return max(r, key=r.get)


def test_hardware_sequenced_z_stack_runs_as_one_camera_sequence() -> None:
    scope = SimulatedScope(seed=3, geometry=SMALL, z_sequence_max_length=64)
    scope.clock = lambda: 0.0
    core = build_simulated_core(scope)
    assert core.isStageSequenceable("Z") and core.isStageLinearSequenceable("Z")
    starts = []
    core.events.sequenceAcquisitionStarted.connect(lambda *a: starts.append(a))
    stack = _zstack(core, "Brightfield", n=5)
    assert len(starts) == 1  # five planes, one camera sequence
    zs = Z_CELLS + np.arange(-2.0, 3.0)
    assert [_best_plane(p, scope, zs) for p in stack] == list(zs)
    assert stack.mean() > 2000 and not core.getShutterOpen()  # lit, then closed again
    # a linear sequence through the core API: the stage steps on each frame
    core.setPosition(0.0)
    core.setStageLinearSequence("Z", 2.0, 3)
    core.startStageSequence("Z")
    core.startSequenceAcquisition(3, 0, True)
    while core.isSequenceRunning():
        time.sleep(0.01)
    frames = [core.popNextImage() for _ in range(core.getRemainingImageCount())]
    core.stopStageSequence("Z")
    assert [_best_plane(f, scope, (0.0, 2.0, 4.0)) for f in frames] == [0.0, 2.0, 4.0]


def test_focus_is_not_sequenceable_by_default() -> None:
    core = build_simulated_core(SimulatedScope(geometry=SMALL))
    assert not core.isStageSequenceable("Z")
    assert not core.isStageLinearSequenceable("Z")


# -- livestain simulate -----------------------------------------------------------------

def test_simulate_writes_the_paired_dataset_layout(tmp_path) -> None:
    import argparse

    from livestain.devices.simulate_cli import register
    from livestain.stackio import read_stack, voxel_size_of

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    args = ap.parse_args(["simulate", "--out", str(tmp_path / "ds"), "--fields", "2",
                          "--z", "4", "--size", "96", "--seed", "7"])
    assert args.func(args) == 0
    (pair,) = simulate_pairs([(0, 1)], seed=7, z_planes_um=4.0 + np.arange(-1.5, 2.0),
                             geometry=SampleGeometry(shape=(40, 96, 96)), noisy_fluorescence=True)
    folder = tmp_path / "ds" / "field001"
    bf, info = read_stack(folder / "brightfield.ome.tif")
    assert bf.dtype == np.uint16 and bf.shape == (4, 96, 96)
    np.testing.assert_array_equal(bf, pair.brightfield)
    assert info["tile"] == [0, 1] and info["seed"] == 7
    assert voxel_size_of(folder / "brightfield.ome.tif") == pytest.approx((1.0, 0.325, 0.325))
    for k, s in enumerate(("dna", "membrane", "mitochondria")):
        truth, _ = read_stack(folder / f"{s}.ome.tif")
        noisy, _ = read_stack(folder / f"{s}_noisy.ome.tif")
        assert truth.dtype == np.float32 and noisy.dtype == np.uint16
        np.testing.assert_array_equal(truth, pair.targets[k])
        # the camera image is the truth in photons, plus offset and noise
        photons = truth * scope_fl_photons(10.0)
        assert np.corrcoef(noisy.ravel(), photons.ravel())[0, 1] > 0.9
        assert (noisy.astype(float) - 100).mean() == pytest.approx(photons.mean(), rel=0.05)
        with tifffile.TiffFile(folder / f"{s}_noisy.ome.tif") as tif:
            assert f'Name="{s.capitalize()}"' in tif.ome_metadata
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["field000", "field001", "simulate.json"]


def scope_fl_photons(exposure_ms: float) -> float:
    return SimulatedScope().optics.fl_photons_per_ms * exposure_ms

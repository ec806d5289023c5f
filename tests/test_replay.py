"""The replay camera: recorded z-stacks played back, bit for bit, as if acquired.

Tests on real data read ``../shared/data`` (the ``shared_data`` fixture skips without
it); the others write their own small OME-TIFFs and always run.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import useq

from livestain import wire
from livestain.devices.replay import build_replay_core, load_replay
from livestain.run_reader import RunReader
from livestain.stackio import write_stack

BFDC3D = "bfdc3d_imodpasteur/dict_redLED_SP_100nm_1_MMStack_Pos0.ome.tif"


def _snap(core, z: float, channel: str = "Brightfield") -> np.ndarray:
    core.setConfig("Channel", channel)
    core.setPosition(z)
    core.snapImage()
    return core.getImage()


def _mda(core, seq: useq.MDASequence) -> list[tuple[useq.MDAEvent, np.ndarray]]:
    frames: list[tuple[useq.MDAEvent, np.ndarray]] = []
    core.mda.events.frameReady.connect(lambda img, ev, meta: frames.append((ev, img.copy())))
    core.mda.run(seq)
    return frames


# -- self-made files (always run) --------------------------------------------------------

def test_a_czyx_ome_tiff_replays_every_plane_and_channel_exactly(tmp_path) -> None:
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 65535, (2, 4, 24, 32), dtype=np.uint16)
    zs = [10.0, 10.5, 11.0, 11.5]
    path = write_stack(tmp_path / "cell.ome.tif", stack, voxel_size_um=(0.5, 0.2, 0.2), info={},
                       channel_names=["BF", "Dna"], plane_positions_um=[(0, 0, z) for z in zs])
    core = build_replay_core(path)
    assert core.getAvailableConfigs("Channel") == ("Brightfield", "Dna")
    assert core.getPixelSizeUm() == pytest.approx(0.2)
    assert (core.getImageHeight(), core.getImageWidth()) == (24, 32)
    for c, channel in enumerate(("Brightfield", "Dna")):
        for k, z in enumerate(zs):
            img = _snap(core, z, channel)
            assert img.dtype == np.uint16
            np.testing.assert_array_equal(img, stack[c, k])
    np.testing.assert_array_equal(_snap(core, 10.7), stack[0, 1])  # the nearest plane
    np.testing.assert_array_equal(_snap(core, -50.0), stack[0, 0])
    core.setXYPosition(32 * 0.2, 0.0)  # one field to the right: no data there
    with pytest.raises(ValueError, match="no recorded position"):
        core.snapImage()


def test_a_folder_of_position_folders_plays_camera_images_by_xy(tmp_path) -> None:
    rng = np.random.default_rng(1)
    stacks = {}
    for name in ("field000", "field001"):
        bf = rng.integers(0, 4000, (3, 16, 16), dtype=np.uint16)
        dna = rng.integers(0, 4000, (3, 16, 16), dtype=np.uint16)
        for stem, arr in (("brightfield", bf), ("dna", dna.astype(np.float32) / 4000),
                          ("dna_noisy", dna)):
            write_stack(tmp_path / name / f"{stem}.ome.tif", arr, voxel_size_um=(1.0, 0.325, 0.325),
                        info={})
        stacks[name] = (bf, dna)
    data = load_replay(tmp_path)
    assert [p.name for p in data.positions] == ["field000", "field001"]
    core = build_replay_core(data)
    assert core.getAvailableConfigs("Channel") == ("Brightfield", "dna")
    for i, name in enumerate(("field000", "field001")):
        core.setXYPosition(i * 16 * 0.325, 0.0)
        for k, z in enumerate((-1.0, 0.0, 1.0)):  # 1 um steps centred on 0
            np.testing.assert_array_equal(_snap(core, z), stacks[name][0][k])
            np.testing.assert_array_equal(_snap(core, z, "dna"), stacks[name][1][k])  # camera image


# -- real recorded data -----------------------------------------------------------------

def test_real_brightfield_stack_replays_bit_for_bit_by_snap_and_by_mda(shared_data) -> None:
    path = shared_data / BFDC3D
    planes = tifffile.imread(path)
    assert planes.shape == (21, 165, 157)
    core = build_replay_core(path)
    assert core.getPixelSizeUm() == pytest.approx(0.11)  # from the ImageJ resolution tags
    zs = (np.arange(21) - 10) * 0.1  # ImageJ spacing 0.1 um, centred on 0
    for k in (0, 7, 10, 20):
        np.testing.assert_array_equal(_snap(core, zs[k]), planes[k])
    seq = useq.MDASequence(stage_positions=[{"x": 0, "y": 0, "z": 0.0}], channels=["Brightfield"],
                           z_plan={"range": 2.0, "step": 0.1})
    frames = _mda(core, seq)
    assert len(frames) == 21
    for k, (ev, img) in enumerate(frames):
        assert ev.index["z"] == k
        np.testing.assert_array_equal(img, planes[k])


def test_real_stack_replays_exactly_as_a_hardware_sequenced_z_stack(shared_data) -> None:
    planes = tifffile.imread(shared_data / BFDC3D)
    core = build_replay_core(shared_data / BFDC3D, z_sequence_max_length=100)
    starts = []
    core.events.sequenceAcquisitionStarted.connect(lambda *a: starts.append(a))
    seq = useq.MDASequence(stage_positions=[{"x": 0, "y": 0, "z": 0.0}], channels=["Brightfield"],
                           z_plan={"range": 2.0, "step": 0.1})
    frames = _mda(core, seq)
    assert len(starts) == 1 and len(frames) == 21
    np.testing.assert_array_equal(np.stack([img for _, img in frames]), planes)


def test_real_defocus_series_and_dapi_xy_selects_the_field_light_path_the_channel(shared_data) -> None:
    folder = shared_data / "sephace_bf_dapi"
    core = build_replay_core(folder)
    data = core.livestain_replay.data
    assert [p.name for p in data.positions] == ["Set1", "Set2"]
    assert core.getAvailableConfigs("Channel") == ("Brightfield", "dapi")
    assert core.getImageBitDepth() == 8
    z_set1 = [1327.6, 1341.95, 1351.6, 1352.25, 1362.0, 1376.8]  # from the files' descriptions
    seq = useq.MDASequence(
        axis_order="pcz",
        stage_positions=[{"x": data.stage_x_um(0), "y": 0.0}, {"x": data.stage_x_um(1), "y": 0.0}],
        channels=["Brightfield"],
        z_plan={"absolute": z_set1},
    )
    frames = _mda(core, seq)
    assert len(frames) == 12
    for ev, img in frames:
        p, k = ev.index["p"], ev.index["z"]
        ref = tifffile.imread(folder / f"Set{p + 1}_brightfield_zstack.ome.tif")
        assert img.dtype == np.uint8
        np.testing.assert_array_equal(img, ref[k])  # Set2's planes are nearest Set1's z
    for p in (0, 1):
        core.setXYPosition(data.stage_x_um(p), 0.0)
        dapi = tifffile.imread(folder / f"Set{p + 1}_dapi.ome.tif")
        np.testing.assert_array_equal(_snap(core, 1352.0, "dapi"), dapi)  # one plane: any z


@pytest.mark.slow
def test_real_brightfield_goes_through_the_daemon_into_the_raw_stack(shared_data, tmp_path,
                                                                       base_port) -> None:
    from livestain.acquisition.daemon import Daemon
    from livestain.acquisition.policies import Policies

    planes = tifffile.imread(shared_data / BFDC3D)
    core = build_replay_core(shared_data / BFDC3D)
    seq = useq.MDASequence(axis_order="tpcz", stage_positions=[{"x": 0, "y": 0, "z": 0.0}],
                           channels=[{"config": "Brightfield", "exposure": 10.0}],
                           z_plan={"range": 2.0, "step": 0.1})
    daemon = Daemon(core, seq, tmp_path / "run", wire.endpoints(base_port=base_port),
                    Policies(drain_timeout_s=0.5), report=lambda line: None)
    summary = daemon.run()
    assert summary.acquired == 1
    raw, info = RunReader(tmp_path / "run").raw(0)
    np.testing.assert_array_equal(raw, planes)
    assert info["gaps"] == []
    assert info["voxel_size_um"] == pytest.approx((0.1, 0.11, 0.11))

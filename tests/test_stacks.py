"""Stack assembly by event index and the OME-TIFF files users open in Fiji/napari."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import useq

from livestain.acquisition.stacks import StackAssembler
from livestain.stackio import read_stack, voxel_size_of, write_stack


def _event(t: int, z: int, p: int = 0, channel: str = "Brightfield") -> useq.MDAEvent:
    return useq.MDAEvent(index={"t": t, "p": p, "c": 0, "z": z}, channel=channel,
                         z_pos=float(z), x_pos=1.0, y_pos=2.0)


def test_frames_are_placed_by_index_not_arrival_order() -> None:
    asm = StackAssembler(n_z=3)
    planes = {z: np.full((2, 2), 10 * z + 1, np.uint16) for z in range(3)}
    assert asm.add(_event(0, 2), planes[2]) == []
    assert asm.add(_event(0, 0, channel="Dna"), planes[0]) == []  # another channel between
    assert asm.add(_event(0, 0), planes[0]) == []
    (done,) = asm.add(_event(0, 1), planes[1])
    assert done.key == (0, 0, "Brightfield")
    assert [int(done.planes[z, 0, 0]) for z in range(3)] == [1, 11, 21]
    assert done.positions_um[:, 2].tolist() == [0.0, 1.0, 2.0]
    assert asm.n_open == 1  # the Dna stack waits for its planes


def test_a_failed_frame_is_a_recorded_gap_and_shifts_nothing() -> None:
    asm = StackAssembler(n_z=4)
    for z in (0, 1, 3):  # plane 2 of t=0 never arrives (a failed snap)
        assert asm.add(_event(0, z), np.full((2, 2), z + 1, np.uint16)) == []
    # the first frame of the next time point closes t=0 with its gap recorded
    (stack,) = asm.add(_event(1, 0), np.full((2, 2), 9, np.uint16))
    assert stack.key[0] == 0 and stack.gaps == [2]
    assert [int(v) for v in stack.planes[:, 0, 0]] == [1, 2, 0, 4]
    (rest,) = asm.flush()
    assert rest.key[0] == 1 and rest.gaps == [1, 2, 3]


def test_stack_file_round_trip_with_physical_sizes_and_header(tmp_path) -> None:
    arr = np.random.default_rng(0).integers(0, 4000, (5, 16, 20), dtype=np.uint16)
    pos = [[1.0, 2.0, float(z)] for z in range(5)]
    path = write_stack(tmp_path / "p000" / "t0000.ome.tif", arr, voxel_size_um=(1.0, 0.325, 0.325),
                       info={"t": 0, "run_id": "r"}, channel_names=["Brightfield"], plane_positions_um=pos)
    back, info = read_stack(path)
    np.testing.assert_array_equal(back, arr)
    assert info == {"t": 0, "run_id": "r"}
    assert voxel_size_of(path) == pytest.approx((1.0, 0.325, 0.325))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX"
    assert not list(tmp_path.rglob("*.partial"))


def test_prediction_file_has_named_channels(tmp_path) -> None:
    arr = np.random.default_rng(1).normal(size=(3, 4, 8, 8)).astype(np.float32)
    path = write_stack(tmp_path / "pred.ome.tif", arr, voxel_size_um=(1, 0.5, 0.5), info={},
                       channel_names=["dna", "membrane", "mitochondria"])
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "CZYX"
        names = [c["Name"] for c in tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]["Channel"]]
    assert names == ["dna", "membrane", "mitochondria"]
    np.testing.assert_array_equal(read_stack(path)[0], arr)


def test_the_doorbell_wakes_a_zmq_poll_from_another_thread_and_clears() -> None:
    import threading

    import zmq

    from livestain.acquisition.doorbell import Doorbell

    bell = Doorbell()
    poller = zmq.Poller()
    poller.register(bell, zmq.POLLIN)
    try:
        assert poller.poll(0) == []
        ringer = threading.Thread(target=lambda: [bell.ring() for _ in range(3)])
        ringer.start()
        ringer.join()
        assert dict(poller.poll(1000)).get(bell.fileno()) == zmq.POLLIN
        bell.clear()  # one wake-up serves all three rings
        assert poller.poll(0) == []
    finally:
        bell.close()

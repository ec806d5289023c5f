"""Runs stored as OME-Zarr (the default) or OME-TIFF: what is written reads back exactly,
validates as NGFF, opens with zarr-python and napari's reader hook, exports to OME-TIFF
for Fiji, and a multi-position run stays a few hundred files (issue 14)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaozarrs
import zarr

from livestain.napari_reader import get_reader, read_run
from livestain.run_export import export_ome_tiff
from livestain.run_reader import RunReader
from livestain.stackio import read_stack
from livestain.store import StoreError, open_store, read_ref, ref_exists, ref_file, storage_of

from _helpers import CLI

VOXEL = (1.0, 0.325, 0.325)
STRUCTURES = ["dna", "membrane", "mitochondria"]


def _stack(seed: int, shape=(4, 16, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape, dtype=np.uint16)


def test_zarr_store_reads_back_exactly_what_it_wrote_and_grows_in_t_and_c(tmp_path) -> None:
    store = open_store(tmp_path, "zarr", timepoints=2, interval_s=60.0)
    refs = {t: store.write_raw(t, 0, "Brightfield", _stack(t), voxel_size_um=VOXEL, info={}) for t in range(4)}
    check = store.write_raw(3, 0, "DNA", _stack(99), voxel_size_um=VOXEL, info={})  # a channel first seen at t=3
    pred = np.random.default_rng(5).normal(size=(3, 4, 16, 24)).astype(np.float32)
    pref = store.write_prediction(1, 0, pred, structures=STRUCTURES, voxel_size_um=VOXEL, info={})
    for t, ref in refs.items():
        array, info = read_ref(ref)
        np.testing.assert_array_equal(array, _stack(t))
        assert info["t"] == t and info["channel"] == "Brightfield" and info["voxel_size_um"] == list(VOXEL)
    np.testing.assert_array_equal(read_ref(check)[0], _stack(99))
    back, info = read_ref(pref)
    np.testing.assert_array_equal(back, pred)
    assert info["structures"] == STRUCTURES
    # what zarr-python sees: TCZYX, grown from 2 to 4 time points and to 2 channels
    raw = zarr.open_array(str(tmp_path / "p000" / "raw.ome.zarr" / "0"), mode="r")
    assert raw.shape == (4, 2, 4, 16, 24) and raw.dtype == np.uint16
    np.testing.assert_array_equal(raw[3, 1], _stack(99))
    assert not raw[2, 1].any()  # never written: no DNA at t=2
    assert ref_exists(refs[2]) and not ref_exists(store.raw_ref(2, 0, "DNA"))
    assert storage_of(tmp_path) == "zarr"


def test_zarr_images_are_valid_ngff_with_scales_names_and_colours(tmp_path) -> None:
    store = open_store(tmp_path, "zarr", timepoints=1, interval_s=30.0)
    store.write_raw(0, 0, "Brightfield", _stack(0), voxel_size_um=VOXEL, info={})
    store.write_prediction(0, 0, np.zeros((3, 4, 16, 24), np.float32), structures=STRUCTURES,
                           voxel_size_um=VOXEL, info={})
    for name in ("raw.ome.zarr", "prediction.ome.zarr"):
        image = tmp_path / "p000" / name
        yaozarrs.validate_zarr_store(str(image))  # raises on anything NGFF 0.5 forbids
        ome = json.loads((image / "zarr.json").read_text())["attributes"]["ome"]
        (multiscale,) = ome["multiscales"]
        assert [a["name"] for a in multiscale["axes"]] == ["t", "c", "z", "y", "x"]
        assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [30.0, 1.0, *VOXEL]
    channels = json.loads((tmp_path / "p000" / "prediction.ome.zarr" / "zarr.json").read_text()
                          )["attributes"]["ome"]["omero"]["channels"]
    assert [c["label"] for c in channels] == STRUCTURES
    assert channels[0]["color"] == "286EFF"  # the window's DNA blue


def test_a_stack_of_zeros_is_still_on_disk(tmp_path) -> None:
    """Every plane a gap reads as zeros; tensorstore would skip such a chunk, and the
    resume would then take a recorded gap for a missing stack."""
    store = open_store(tmp_path, "zarr")
    ref = store.write_raw(0, 0, "Brightfield", np.zeros((4, 16, 24), np.uint16), voxel_size_um=VOXEL, info={})
    assert ref_exists(ref) and ref_file(ref).stat().st_size == 4 * 16 * 24 * 2


def test_chunks_lie_side_by_side_and_runs_with_nested_chunks_still_read(tmp_path) -> None:
    """A stack is one file in the array's own folder (no folder per time point: four
    mkdirs per stack cost a third of small-stack write speed); arrays written before,
    with the spec's default nested keys, are still found by `ref_file` / `ref_exists`."""
    import shutil

    store = open_store(tmp_path / "new", "zarr")
    stack = np.arange(4 * 16 * 24, dtype=np.uint16).reshape(4, 16, 24)
    ref = store.write_raw(3, 0, "Brightfield", stack, voxel_size_um=VOXEL, info={})
    array = tmp_path / "new" / "p000" / "raw.ome.zarr" / "0"
    assert ref_file(ref) == array / "c.3.0.0.0.0" and ref_exists(ref)
    assert sorted(p.name for p in array.iterdir() if p.is_dir()) == []
    # the same image as an earlier livestain wrote it: "/" keys, c/3/0/0/0/0
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    meta = json.loads((old / "p000" / "raw.ome.zarr" / "0" / "zarr.json").read_text())
    meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/"}}
    (old / "p000" / "raw.ome.zarr" / "0" / "zarr.json").write_text(json.dumps(meta))
    nested = old / "p000" / "raw.ome.zarr" / "0" / "c" / "3" / "0" / "0" / "0"
    nested.mkdir(parents=True)
    (old / "p000" / "raw.ome.zarr" / "0" / "c.3.0.0.0.0").rename(nested / "0")
    old_ref = str(ref).replace(str(tmp_path / "new"), str(old))
    assert ref_file(old_ref) == nested / "0" and ref_exists(old_ref)
    back, _ = read_ref(old_ref)
    np.testing.assert_array_equal(back, stack)


def test_a_full_disk_mid_chunk_leaves_the_chunk_before_and_no_partial(tmp_path, monkeypatch) -> None:
    """A stack is written plane by plane to ``.partial`` and renamed: a full disk halfway
    leaves the earlier stack as it was, no stray file, and says so as an OSError."""
    import builtins
    import errno

    store = open_store(tmp_path, "zarr", timepoints=2)
    first = np.full((4, 16, 24), 7, np.uint16)
    ref0 = store.write_raw(0, 0, "Brightfield", first, voxel_size_um=VOXEL, info={})
    real_open = builtins.open

    class FullDisk:
        def __init__(self, fh):  # noqa: ANN001
            self.fh, self.n = fh, 0

        def write(self, data):  # noqa: ANN001, ANN202
            self.n += 1
            if self.n == 3:  # the third plane finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(self.fh, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            return self.fh.__exit__(*exc)

    def opening(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        fh = real_open(path, mode, *args, **kwargs)
        return FullDisk(fh) if str(path).endswith(".partial") else fh

    monkeypatch.setattr(builtins, "open", opening)
    with pytest.raises(OSError, match="No space left"):
        store.write_raw(1, 0, "Brightfield", np.ones((4, 16, 24), np.uint16), voxel_size_um=VOXEL, info={})
    monkeypatch.undo()
    array = tmp_path / "p000" / "raw.ome.zarr" / "0"
    assert sorted(p.name for p in array.iterdir()) == ["c.0.0.0.0.0", "zarr.json"]
    np.testing.assert_array_equal(read_ref(ref0)[0], first)
    assert not ref_exists(store.raw_ref(1, 0, "Brightfield"))


def test_a_stack_that_does_not_fit_the_run_is_refused_with_the_fix(tmp_path) -> None:
    store = open_store(tmp_path, "zarr")
    store.write_raw(0, 0, "Brightfield", _stack(0), voxel_size_um=VOXEL, info={})
    with pytest.raises(StoreError, match=r"storage: tiff"):
        store.write_raw(1, 0, "Brightfield", _stack(1, (5, 16, 24)), voxel_size_um=VOXEL, info={})
    store.write_prediction(0, 0, np.zeros((3, 4, 16, 24), np.float32), structures=STRUCTURES,
                           voxel_size_um=VOXEL, info={})
    with pytest.raises(StoreError, match="new run"):
        store.write_prediction(1, 0, np.zeros((1, 4, 16, 24), np.float32), structures=["nucleoli"],
                               voxel_size_um=VOXEL, info={})
    np.testing.assert_array_equal(read_ref(store.raw_ref(0, 0, "Brightfield"))[0], _stack(0))  # intact


def test_tiff_store_writes_one_file_per_stack_with_its_header(tmp_path) -> None:
    store = open_store(tmp_path, "tiff")
    ref = store.write_raw(2, 1, "Brightfield", _stack(2), voxel_size_um=VOXEL, info={"t": 2, "seq": 7})
    assert Path(ref) == tmp_path / "p001" / "t0002_brightfield.ome.tif"
    array, info = read_stack(ref)
    np.testing.assert_array_equal(array, _stack(2))
    assert info["seq"] == 7 and storage_of(tmp_path) == "tiff"


@pytest.mark.slow
def test_demo_writes_an_ome_zarr_run_that_napari_zarr_and_fiji_users_open(tmp_path, base_port) -> None:
    """3 positions x 20 time points: raw and predictions in place, a few hundred files."""
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "demo", "--headless", "--timepoints", "20", "--positions", "3", "--interval", "0",
                           "--out", str(out), "--port", str(base_port)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 300, len(files)  # measured 137 (the TIFF layout: 125)
    with RunReader(out) as run:
        entries = run.stacks("Brightfield")
        assert len(entries) == 60 and all(e.prediction_ref for e in entries)
        raw, info = run.raw(19, 2)
        pred, pinfo = run.prediction(19, 2)
    assert raw.shape == (16, 256, 256) and info["t"] == 19 and info["p"] == 2 and info["gaps"] == []
    assert pred.shape == (3, 16, 256, 256) and pinfo["source_seq"] == info["seq"]
    for p in range(3):
        for name in ("raw.ome.zarr", "prediction.ome.zarr"):
            yaozarrs.validate_zarr_store(str(out / f"p{p:03d}" / name))
    # zarr-python: the same pixels, all 20 time points of position 2
    stored = zarr.open_array(str(out / "p002" / "raw.ome.zarr" / "0"), mode="r")
    assert stored.shape == (20, 1, 16, 256, 256)
    np.testing.assert_array_equal(stored[19, 0], raw)
    # napari's reader hook (no napari needed): one layer group per position and kind
    reader = get_reader(str(out))
    assert reader is read_run
    layers = reader(str(out))
    assert len(layers) == 6
    data, kwargs, kind = layers[1]  # p000's predictions
    assert kind == "image" and kwargs["channel_axis"] == 1 and data.shape == (20, 3, 16, 256, 256)
    assert kwargs["name"] == ["p000 dna", "p000 membrane", "p000 mitochondria"]
    assert kwargs["scale"] == pytest.approx([1.0, 1.0, 0.325, 0.325])
    assert kwargs["colormap"][0]["colors"][1][:3] == pytest.approx([40 / 255, 110 / 255, 1.0])  # DNA blue
    assert get_reader(str(tmp_path)) is None  # not a run
    # Fiji users: one OME-TIFF per stack, the same pixels and headers
    report = export_ome_tiff(out, tmp_path / "tiff")
    assert report.written == 120
    back, binfo = read_stack(tmp_path / "tiff" / "p002" / "t0019_brightfield.ome.tif")
    np.testing.assert_array_equal(back, raw)
    assert binfo["seq"] == info["seq"]
    with tifffile.TiffFile(tmp_path / "tiff" / "p002" / "t0019_prediction.ome.tif") as tif:
        assert tif.is_ome and "dna" in tif.ome_metadata
    assert export_ome_tiff(out, tmp_path / "tiff").kept == 120  # a second call continues, rewrites nothing


def test_export_command_refuses_a_folder_that_is_no_run(tmp_path) -> None:
    from livestain.cli import main

    assert main(["export", str(tmp_path), "--format", "ome-tiff", "--out", str(tmp_path / "x")]) == 2


def test_napari_itself_opens_a_zarr_run_through_livestains_plugin(tmp_path) -> None:
    """Where napari is installed (not in CI: `pip install napari`), its own plugin
    machinery finds livestain's npe2 reader and builds the layers, without a window."""
    pytest.importorskip("napari")
    from napari.components import ViewerModel
    from napari.plugins import _initialize_plugins

    store = open_store(tmp_path, "zarr", timepoints=2, interval_s=60.0)
    for t in range(2):
        store.write_raw(t, 0, "Brightfield", _stack(t), voxel_size_um=VOXEL, info={})
        store.write_prediction(t, 0, np.full((3, 4, 16, 24), t + 1.0, np.float32), structures=STRUCTURES,
                               voxel_size_um=VOXEL, info={})
    _initialize_plugins()
    viewer = ViewerModel()
    viewer.open(str(tmp_path), plugin="livestain")
    assert [layer.name for layer in viewer.layers] == ["p000 Brightfield", "p000 dna", "p000 membrane",
                                                       "p000 mitochondria"]
    dna = viewer.layers["p000 dna"]
    assert dna.data.shape == (2, 4, 16, 24) and list(dna.scale) == pytest.approx([60.0, *VOXEL])
    assert dna.colormap.colors[-1][:3] == pytest.approx([40 / 255, 110 / 255, 1.0]) and dna.blending == "additive"
    assert float(np.asarray(dna.data[1]).mean()) == pytest.approx(2.0)
    np.testing.assert_array_equal(np.asarray(viewer.layers["p000 Brightfield"].data[1]), _stack(1))


def test_a_multi_well_run_is_stored_as_hcs_plates_that_readers_open(tmp_path, base_port) -> None:
    """Positions from useq's WellPlatePlan carry their wells: the run is two NGFF 0.5
    plates (raw, predictions) with one image per field, valid, read back by the run
    reader, the audit, napari's reader hook and the OME-TIFF export, and resumable."""
    import useq

    from livestain import wire
    from livestain.acquisition.audit import audit_run
    from livestain.acquisition.daemon import Daemon
    from livestain.acquisition.policies import Policies
    from livestain.devices.simulated import SimulatedScope, build_simulated_core
    from livestain.inference.predict import Predictor
    from livestain.launch import demo_sequence
    from livestain.plate import PlateLayout, row_name

    from _helpers import run_with_worker

    plate = useq.WellPlatePlan(plate=96, a1_center_xy=(0, 0), selected_wells=([0, 1], [0, 2]),
                               well_points_plan=useq.GridRowsColumns(rows=1, columns=2, fov_width=80, fov_height=80))
    plan = demo_sequence(2, 0.0).model_copy(update={"stage_positions": plate})
    layout = PlateLayout.from_sequence(plan)
    assert layout is not None and layout.image_path(2) == "B/3/0" and layout.label(3) == "B3 field 1"
    out = tmp_path / "run"
    eps = wire.endpoints(base_port=base_port)
    daemon = Daemon(build_simulated_core(SimulatedScope()), plan, out, eps, Policies(drain_timeout_s=60.0),
                    report=lambda line: None)
    summary, _ = run_with_worker(daemon, eps, Predictor(None, "cpu"), input_checks=False)
    assert summary.acquired == 8 and summary.predicted == 8 and summary.error is None
    for kind in ("raw.ome.zarr", "prediction.ome.zarr"):
        yaozarrs.validate_zarr_store(str(out / kind))  # the plate, its wells and fields
        ome = json.loads((out / kind / "zarr.json").read_text())["attributes"]["ome"]["plate"]
        assert [w["path"] for w in ome["wells"]] == ["A/1", "B/3"] and ome["field_count"] == 2
        assert [r["name"] for r in ome["rows"]] == ["A", "B"] and [c["name"] for c in ome["columns"]] == ["1", "3"]
        for well in ("A/1", "B/3"):
            images = json.loads((out / kind / well / "zarr.json").read_text())["attributes"]["ome"]["well"]["images"]
            assert [i["path"] for i in images] == ["0", "1"]
    assert not list(out.glob("p[0-9][0-9][0-9]"))  # no per-position folders
    stored = zarr.open_array(str(out / "raw.ome.zarr" / "B" / "3" / "1" / "0"), mode="r")
    with RunReader(out) as run:
        raw, info = run.raw(1, 3)
        pred, _ = run.prediction(1, 3)
    assert stored.shape == (2, 1, 16, 256, 256) and info["p"] == 3
    np.testing.assert_array_equal(stored[1, 0], raw)
    assert pred.shape == (3, 16, 256, 256)
    report = audit_run(out)
    assert report.ok and report.planned == 8 and sum(report.predicted_by.values()) == 8
    layers = read_run(str(out))
    assert len(layers) == 8  # raw and predictions of 4 fields
    assert layers[5][1]["name"][0] == "B3 field 0 dna"
    assert export_ome_tiff(out, tmp_path / "tiff").written == 16
    assert storage_of(out) == "zarr" and row_name(26) == "AA"


def test_a_journal_with_headers_inline_from_before_still_reads(tmp_path) -> None:
    """Journals of 2026-12-01 kept the headers as columns of ``stacks``; the run reader
    and a resumed run's journal read them, and new headers go to the ``headers`` table."""
    import sqlite3

    from livestain.acquisition.journal import Journal

    store = open_store(tmp_path, "zarr")
    ref = store.write_raw(0, 0, "Brightfield", _stack(0), voxel_size_um=VOXEL, info={})
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    db.executescript("""
        CREATE TABLE stacks (seq INTEGER PRIMARY KEY, t INTEGER NOT NULL, p INTEGER NOT NULL,
            channel TEXT NOT NULL, raw_path TEXT NOT NULL, gaps INTEGER NOT NULL DEFAULT 0,
            acquired_at REAL NOT NULL, predicted_path TEXT, predicted_at REAL, latency_s REAL,
            info TEXT, prediction_info TEXT);""")
    db.execute("INSERT INTO stacks (seq, t, p, channel, raw_path, acquired_at, info) VALUES (0, 0, 0, "
               "'Brightfield', ?, 0, ?)", (ref, json.dumps({"seq": 0, "old": True})))
    db.commit()
    db.close()
    journal = Journal(tmp_path)  # a resume opens it
    journal.stack_written(1, 1, 0, "Brightfield", Path(store.write_raw(1, 0, "Brightfield", _stack(1),
                          voxel_size_um=VOXEL, info={})), 0, info={"seq": 1, "new": True})
    assert journal.info(0) == {"seq": 0, "old": True} and journal.info(1) == {"seq": 1, "new": True}
    journal.close()
    with RunReader(tmp_path) as run:
        assert [e.info for e in run.stacks()] == [{"seq": 0, "old": True}, {"seq": 1, "new": True}]
        assert run.raw(0, 0)[1]["old"] is True


def test_a_prediction_image_names_the_models_that_predicted_into_it(tmp_path) -> None:
    """Provenance in the image: each model and the time point it took over (a swap by
    adaptation), kept across a reopen; the metadata stays valid NGFF."""
    pred = np.zeros((3, 4, 16, 24), np.float32)
    store = open_store(tmp_path, "zarr", timepoints=4)
    for t, model in ((0, "bundled@aaa"), (1, "bundled@aaa"), (2, "adapted-001@bbb")):
        store.write_prediction(t, 0, pred, structures=STRUCTURES, voxel_size_um=VOXEL,
                               info={"model": model, "device": "cpu", "versions": {"livestain": "0.1.0"}})
    again = open_store(tmp_path, "zarr", timepoints=4)  # a resumed run
    again.write_prediction(3, 0, pred, structures=STRUCTURES, voxel_size_um=VOXEL, info={"model": "adapted-001@bbb"})
    image = tmp_path / "p000" / "prediction.ome.zarr"
    yaozarrs.validate_zarr_store(str(image))
    models = json.loads((image / "zarr.json").read_text())["attributes"]["livestain"]["models"]
    assert [(m["model"], m["from_t"]) for m in models] == [("bundled@aaa", 0), ("adapted-001@bbb", 2)]
    assert models[0]["device"] == "cpu" and models[0]["livestain"] == "0.1.0"

"""Bring your own data: the formats livestain reads, structure aliases, 2.5D prediction
files, single planes, and choosing what training validates on.

Every format test writes a small real file in that format (tifffile's ImageJ writer,
Pillow PNGs, tensorstore zarr arrays with NGFF 0.4/0.5 metadata) and checks that
``livestain predict`` and ``livestain train`` read the right pixels and voxel size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from livestain.cli import main
from livestain.inference.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from livestain.inference.dataset import Field, load_fields, split_for_validation
from livestain.inference.evaluate import evaluate_model
from livestain.inference.formats import read_image, voxel_size
from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.predict import Predictor
from livestain.inference.structures import canonical, find, match
from livestain.stackio import read_stack, voxel_size_of, write_stack

SHAPE = (6, 24, 32)  # y != x, so a transposed read shows
VOXEL = (2.0, 0.5, 0.25)  # the data's (z, y, x) um
MODEL_VOXEL = (1.0, 0.5, 0.5)  # the model's: predictions resample, so a wrong voxel size shows
FORMATS = ("imagej", "plain", "png", "zarr04", "zarr05")
NEEDS_VOXEL = {"plain", "png"}  # formats with no physical size of their own


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stack(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(1000, 4000, shape).astype(np.uint16)


def tiny_model(folder: Path, structures: tuple[str, ...] = ("dna",), **config) -> Path:
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(structures=structures, depth=1, base_channels=2, **config)).eval()
    return save_checkpoint(folder / "tiny", net, ModelMeta(net.config, voxel_size_um=MODEL_VOXEL))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ writers, one per format


def write_ome_zarr(root: Path, array: np.ndarray, voxel: tuple[float, ...], version: str) -> Path:
    """An NGFF image, two levels: 0.4 (zarr v2, axes c,z,y,x in micrometer) or 0.5
    (zarr v3, axes t,c,z,y,x in nanometer, metadata under "ome")."""
    import tensorstore as ts

    lead = 1 if version == "0.4" else 2
    unit, per_um = ("micrometer", 1.0) if version == "0.4" else ("nanometer", 1000.0)
    names = ["c", "z", "y", "x"] if version == "0.4" else ["t", "c", "z", "y", "x"]
    axes = [{"name": n, "type": {"t": "time", "c": "channel"}.get(n, "space")} for n in names]
    for a in axes[lead:]:
        a["unit"] = unit
    datasets = []
    for level, step in enumerate((1, 2)):
        data = array[:, ::step, ::step].reshape((1,) * lead + array[:, ::step, ::step].shape)
        spec = {"driver": "zarr" if version == "0.4" else "zarr3",
                "kvstore": {"driver": "file", "path": str(root / str(level))}}
        ts.open(spec, create=True, dtype=str(data.dtype), shape=data.shape).result().write(data).result()
        scale = [1.0] * lead + [voxel[0] * per_um, voxel[1] * per_um * step, voxel[2] * per_um * step]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    ms = {"name": root.stem, "axes": axes, "datasets": datasets}
    if version == "0.4":
        (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        (root / ".zattrs").write_text(json.dumps({"multiscales": [{"version": "0.4", **ms}]}))
    else:
        (root / "zarr.json").write_text(json.dumps({
            "zarr_format": 3, "node_type": "group",
            "attributes": {"ome": {"version": "0.5", "multiscales": [ms]}}}))
    return root


def write_format(kind: str, base: Path, array: np.ndarray, voxel: tuple[float, float, float] = VOXEL) -> Path:
    """``array`` (z, y, x) saved as ``base`` + the format's suffix; returns the path."""
    base.parent.mkdir(parents=True, exist_ok=True)
    z, y, x = voxel
    if kind == "imagej":
        path = base.with_name(base.name + ".tif")
        tifffile.imwrite(path, array, imagej=True, resolution=(1 / x, 1 / y),
                         metadata={"spacing": z, "unit": "um", "axes": "ZYX"})
    elif kind == "plain":
        path = base.with_name(base.name + ".tif")
        tifffile.imwrite(path, array, photometric="minisblack")
    elif kind == "png":
        image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write PNG planes")
        path = base
        path.mkdir()
        for i, plane in enumerate(array):  # z0 ... z5: natural order, not z0, z10, z2
            image.fromarray(plane).save(path / f"z{i}.png")
    elif kind in ("zarr04", "zarr05"):
        pytest.importorskip("tensorstore", reason="tensorstore is needed to write OME-Zarr")
        path = write_ome_zarr(base.with_name(base.name + (".zarr" if kind == "zarr04" else ".ome.zarr")),
                              array, voxel, "0.4" if kind == "zarr04" else "0.5")
    else:
        raise AssertionError(kind)
    return path


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("kind", FORMATS)
def test_predict_reads_each_format_with_its_voxel_size(kind, model, tmp_path, capsys) -> None:
    bf = stack()
    src = write_format(kind, tmp_path / "brightfield", bf)
    array, _ = read_image(src)
    np.testing.assert_array_equal(np.squeeze(array), bf)
    out = tmp_path / "pred.ome.tif"
    extra = ["--voxel-size", ",".join(map(str, VOXEL))] if kind in NEEDS_VOXEL else []
    if kind in NEEDS_VOXEL:
        code, _, err = run(capsys, "predict", model, src, "--out", out)
        assert code == 2 and "--voxel-size Z,Y,X" in err and str(src) in err
    else:
        assert voxel_size(src) == pytest.approx(VOXEL)
    code, printed, err = run(capsys, "predict", model, src, "--out", out, *extra)
    assert code == 0, err
    pred, info = read_stack(out)
    assert pred.shape == (1, *SHAPE) and info["source"] == str(src.resolve())
    assert voxel_size_of(out) == pytest.approx(VOXEL)
    # the right pixels at the right voxel size: the same as predicting the array itself
    np.testing.assert_allclose(pred, Predictor(str(model), "cpu").predict(bf, VOXEL), atol=1e-6)


@pytest.mark.parametrize("kind", FORMATS)
def test_train_reads_each_format_with_its_voxel_size(kind, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    for i in range(2):
        write_format(kind, data / f"field{i:03d}" / "brightfield", stack(i))
        write_format(kind, data / f"field{i:03d}" / "dna", stack(10 + i))
    given = VOXEL if kind in NEEDS_VOXEL else None
    fields = load_fields(data, ["dna"], given)
    for i, f in enumerate(fields):
        np.testing.assert_array_equal(f.brightfield, stack(i))
        np.testing.assert_array_equal(f.targets[0], stack(10 + i))
        assert f.voxel_size_um == pytest.approx(VOXEL)
    extra = ["--voxel-size", ",".join(map(str, VOXEL))] if given else []
    code, _, err = run(capsys, "train", data, "--structures", "dna", "--out", tmp_path / "m", "--steps", "2",
                       "--batch", "1", "--depth", "1", "--base-channels", "2", "--patch", "4,16,16", *extra)
    assert code == 0, err
    trained = load_checkpoint(tmp_path / "m.safetensors")
    assert trained.meta.voxel_size_um == pytest.approx(VOXEL)


def test_unknown_formats_are_refused_with_the_accepted_list(model, tmp_path, capsys) -> None:
    czi = tmp_path / "stack.czi"
    czi.write_bytes(b"ZISRAWFILE" + bytes(100))
    code, _, err = run(capsys, "predict", model, czi, "--out", tmp_path / "o.ome.tif")
    assert code == 2 and "stack.czi is a .czi file" in err
    assert all(s in err for s in ("OME-TIFF", "ImageJ", "PNG", "OME-Zarr"))
    field = tmp_path / "data" / "field000"
    field.mkdir(parents=True)
    (field / "brightfield.czi").write_bytes(b"x")
    code, _, err = run(capsys, "train", tmp_path / "data", "--structures", "dna", "--out", tmp_path / "m")
    assert code == 2 and "brightfield.czi is in no format livestain reads" in err and "OME-Zarr" in err


def test_colour_png_and_imagej_channels_are_refused_with_the_fix(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write PNG")
    rgb = tmp_path / "rgb.png"
    image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb)
    with pytest.raises(ValueError, match="RGB PNG.*grayscale"):
        read_image(rgb)
    planes = tmp_path / "planes"
    planes.mkdir()
    image.fromarray(np.zeros((8, 8), np.uint8)).save(planes / "z0.png")
    image.fromarray(np.zeros((8, 9), np.uint8)).save(planes / "z1.png")
    with pytest.raises(ValueError, match="differ in size"):
        read_image(planes)
    hyper = tmp_path / "hyper.tif"
    tifffile.imwrite(hyper, stack(shape=(2, 8, 8)), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(ValueError, match="2 channel.*Split Channels"):
        read_image(hyper)
    uncalibrated = tmp_path / "nocal.tif"
    tifffile.imwrite(uncalibrated, stack(shape=(3, 8, 8)), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match="no OME metadata with a physical voxel size.*--voxel-size"):
        voxel_size(uncalibrated)


def test_a_single_png_is_one_plane(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write PNG")
    plane = stack(shape=(24, 32))
    image.fromarray(plane).save(tmp_path / "bf.png")
    array, info = read_image(tmp_path / "bf.png")
    assert array.shape == (1, 24, 32) and array.dtype == np.uint16 and info["format"] == "png"
    np.testing.assert_array_equal(array[0], plane)


# ------------------------------------------------------------------ write_stack


def test_write_stack_takes_a_single_plane_and_leaves_stacks_as_they_were(tmp_path) -> None:
    plane = stack(shape=(24, 32))
    write_stack(tmp_path / "plane.ome.tif", plane, voxel_size_um=VOXEL, info={"kind": "x"})
    back, info = read_stack(tmp_path / "plane.ome.tif")
    assert back.shape == (1, 24, 32) and info == {"kind": "x", "shape": [1, 24, 32]}
    np.testing.assert_array_equal(back[0], plane)
    assert voxel_size_of(tmp_path / "plane.ome.tif") == pytest.approx(VOXEL)
    for array in (stack(), stack(shape=(2, 3, 24, 32))):  # ZYX and CZYX: no shape added
        write_stack(tmp_path / "s.ome.tif", array, voxel_size_um=VOXEL, info={"kind": "x"})
        back, info = read_stack(tmp_path / "s.ome.tif")
        assert back.shape == array.shape and info == {"kind": "x"}
    with pytest.raises(ValueError, match="YX plane, ZYX or CZYX"):
        write_stack(tmp_path / "bad.ome.tif", np.zeros(5), voxel_size_um=VOXEL, info={})


# ------------------------------------------------------------------ structure aliases


def test_structure_names_match_their_aliases() -> None:
    for canon, names in {"dna": ("DAPI", "Hoechst", "nuclei", "H2B", "nucleus"),
                         "membrane": ("CellMask", "plasma-membrane", "Plasma Membrane", "WGA"),
                         "mitochondria": ("mito", "MitoTracker", "TOMM20"),
                         "actin": ("phalloidin", "LifeAct"), "tubulin": ("microtubules",)}.items():
        assert all(canonical(n) == canon for n in (canon, *names)), canon
    assert canonical("Golgi") == "golgi"
    assert match(["dapi", "membrane", "actin"], ["dna", "cellmask"]) == {"dapi": "dna", "membrane": "cellmask"}
    assert find("dna", ["dapi", "dna"]) == "dna"  # its own name first
    with pytest.raises(ValueError, match="dapi, hoechst all name the structure 'dna'"):
        find("dna", ["dapi", "hoechst"])


def test_a_dapi_model_is_evaluated_on_dna_data(tmp_path, capsys) -> None:
    model = tiny_model(tmp_path, ("dapi", "membrane"))
    data = tmp_path / "data"
    for i in range(2):
        for name, seed in (("brightfield", i), ("dna", 10 + i), ("membrane", 20 + i)):
            write_stack(data / f"field{i:03d}" / f"{name}.ome.tif", stack(seed), voxel_size_um=MODEL_VOXEL, info={})
    code, out, err = run(capsys, "evaluate", model, data, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["structures"] == ["dapi", "membrane"] and report["matched"] == {"dapi": "dna"}
    assert sorted(report["fields"]) == ["field000", "field001"]
    # the library path matches aliases too: fields named dna, model named dapi
    direct = evaluate_model(str(model), load_fields(data, ["dna", "membrane"]))
    assert direct["mean"]["dapi"] == pytest.approx(report["mean"]["dapi"])
    code, out, _ = run(capsys, "evaluate", model, data)
    assert code == 0 and "the model's dapi is scored against the data's dna" in out
    # and training asks for dna where the files say hoechst
    for i in range(2):
        (data / f"field{i:03d}" / "dna.ome.tif").rename(data / f"field{i:03d}" / "hoechst.ome.tif")
    fields = load_fields(data, ["dna"])
    assert fields[0].structures == ("dna",)
    np.testing.assert_array_equal(fields[1].targets[0], stack(11))


# ------------------------------------------------------------------ 2.5D predictions


@pytest.mark.parametrize("structures", [("dna", "membrane"), ("dna",)])
def test_2_5d_predictions_are_written_as_czyx_with_channel_names(structures, tmp_path, capsys) -> None:
    model = tiny_model(tmp_path, structures, mode="2.5d", z_window=3)
    src = tmp_path / "bf.ome.tif"
    write_stack(src, stack(), voxel_size_um=MODEL_VOXEL, info={})
    out = tmp_path / "pred.ome.tif"
    code, _, err = run(capsys, "predict", model, src, "--out", out)
    assert code == 0, err
    pred, info = read_stack(out)
    assert pred.shape == (len(structures), 1, SHAPE[1], SHAPE[2]) and pred.dtype == np.float32
    assert info["structures"] == list(structures) and info["mode"] == "2.5d"
    with tifffile.TiffFile(out) as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    channels = pixels["Channel"] if isinstance(pixels["Channel"], list) else [pixels["Channel"]]
    assert [c["Name"] for c in channels] == list(structures)
    assert (pixels["SizeC"], pixels["SizeZ"]) == (len(structures), 1)


# ------------------------------------------------------------------ validation fields


def train_argv(data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", data, "--structures", "dna", "--out", out, "--steps", "4", "--batch", "1",
            "--depth", "1", "--base-channels", "2", "--patch", "4,16,16", "--val-every", "2", *extra]


def paired(data: Path, n: int, shape: tuple[int, int, int] = SHAPE) -> Path:
    for i in range(n):
        bf = stack(i, shape)
        write_stack(data / f"field{i:03d}" / "brightfield.ome.tif", bf, voxel_size_um=MODEL_VOXEL, info={})
        write_stack(data / f"field{i:03d}" / "dna.ome.tif", (bf.astype(np.float32) ** 2) / 1e6,
                    voxel_size_um=MODEL_VOXEL, info={})
    return data


def test_val_fields_are_the_fields_validated_on(tmp_path, capsys) -> None:
    data = paired(tmp_path / "data", 3)
    code, out, err = run(capsys, *train_argv(data, tmp_path / "m", "--val-fields", "field001"))
    assert code == 0, err
    extra = load_checkpoint(tmp_path / "m.safetensors").meta.extra
    assert extra["data"]["val_fields"] == ["field001"]
    assert extra["data"]["train_fields"] == ["field000", "field002"]
    assert [h["step"] for h in extra["history"]] == [2, 4] and "validating on 1 (field001)" in out
    code, _, err = run(capsys, *train_argv(data, tmp_path / "m2", "--val-fields", "field000,field002"))
    assert code == 0, err
    assert load_checkpoint(tmp_path / "m2.safetensors").meta.extra["data"]["val_fields"] == ["field000", "field002"]
    for bad, says in (("field009", "--val-fields field009: no such field.*field000, field001, field002"),
                      ("field000,field001,field002", "names every field")):
        code, _, err = run(capsys, *train_argv(data, tmp_path / "m3", "--val-fields", bad))
        assert code == 2 and __import__("re").search(says, err), err


def test_a_single_field_validates_on_its_last_rows(tmp_path, capsys) -> None:
    data = paired(tmp_path / "data", 1, shape=(6, 64, 32))
    code, out, err = run(capsys, *train_argv(data, tmp_path / "m", "--val-fraction", "0.25"))
    assert code == 0, err
    extra = load_checkpoint(tmp_path / "m.safetensors").meta.extra
    assert extra["data"]["val_fields"] == ["field000[y 48-64]"]
    assert extra["data"]["train_fields"] == ["field000[y 0-48]"]
    assert -1 <= extra["val_pearson"]["dna"] <= 1 and "validating on its last 16 of 64 rows" in out
    # the two parts tile the field without overlap
    (field,) = load_fields(data, ["dna"])
    (trn,), (val,), _ = split_for_validation([field], fraction=0.25)
    assert trn.brightfield.shape[1] + val.brightfield.shape[1] == 64
    np.testing.assert_array_equal(np.concatenate([trn.brightfield, val.brightfield], axis=1), field.brightfield)
    np.testing.assert_array_equal(np.concatenate([trn.targets, val.targets], axis=-2), field.targets)
    # too small to split: trains without validation, and says so
    tiny = Field("f", np.zeros((2, 6, 8)), np.zeros((1, 2, 6, 8), np.float32), ("dna",), MODEL_VOXEL)
    trn, val, note = split_for_validation([tiny], fraction=0.25, min_yx=4)
    assert val == [] and "too few" in note

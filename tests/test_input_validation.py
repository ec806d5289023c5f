"""Bad input a new user brings: refused with one line naming the file, the problem and the fix.

Each test writes real files in ``tmp_path`` and runs the real CLI (``livestain.cli.main``
in-process, the same code path as the ``livestain`` command), then checks the exit code
(2: a problem the user can fix), the message, and that no output was written. Covered:
truncated/damaged TIFFs, RGB images, NaN/inf voxels, stacks too small for the model,
plain TIFFs without a voxel size (``--voxel-size``), progress and bounded memory of
tiled prediction, and the torch.compile deprecation warnings in the test run.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from livestain.cli import main
from livestain.inference import tiling
from livestain.inference.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from livestain.inference.dataset import load_fields, write_pairs
from livestain.inference.fast import OneDnnConv3d
from livestain.inference.model import UNet3D, UNetConfig
from livestain.stackio import StackError, as_zyx, read_stack, validate_stack, write_stack

ROOT = Path(__file__).resolve().parents[1]
VOXEL = (1.0, 0.325, 0.325)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: tiny networks gain nothing from more on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny untrained depth-2 model (needs >= 4x4 pixels), enough to run predict/evaluate."""
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(structures=("dna",), depth=2, base_channels=2)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny", net, ModelMeta(net.config, voxel_size_um=VOXEL))


def stack(shape: tuple[int, ...] = (16, 32, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2000, 4000, shape).astype(np.uint16)


class _Pair:
    """What `write_pairs` takes: one field with one structure."""

    def __init__(self, bf: np.ndarray, seed: int = 0) -> None:
        self.brightfield = bf
        self.targets = np.random.default_rng(seed).random((1, *bf.shape)).astype(np.float32)
        self.structures = ("dna",)
        self.voxel_size_um = VOXEL


def dataset(folder: Path, shape: tuple[int, int, int] = (4, 16, 16), n: int = 2) -> Path:
    write_pairs([_Pair(stack(shape, seed=i), seed=i) for i in range(n)], folder)
    return folder


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def run(capsys, *argv: object) -> tuple[int, str, str]:
    """``livestain ARGV`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def predict(capsys, model: Path, src: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    return run(capsys, "predict", model, src, "--out", out, *extra)


def train_argv(data: Path, out: Path, *extra: object, depth: int = 1) -> list[object]:
    return ["train", data, "--structures", "dna", "--out", out, "--steps", "2", "--batch", "1",
            "--depth", depth, "--base-channels", "2", "--patch", "4,16,16", *extra]


# ------------------------------------------------------------------ 1. truncated files


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_predict_refuses_a_truncated_stack(model, tmp_path, capsys, fraction) -> None:
    src = truncate(write_stack(tmp_path / "cells.ome.tif", stack(), voxel_size_um=VOXEL, info={}), fraction)
    out = tmp_path / "pred.ome.tif"
    code, _, err = predict(capsys, model, src, out)
    assert code == 2 and not out.exists()
    assert f"{src} is truncated or damaged" in err and "re-export or re-copy it" in err
    assert len(err.strip().splitlines()) == 1  # one line: tifffile's own ERROR lines held back
    if fraction < 0.99:
        assert "only 1 plane can be read" in err  # it used to predict 1 plane of 16 and exit 0
    else:
        assert "its metadata (the ImageDescription" in err  # all planes there, the OME-XML cut off


def test_a_cut_ifd_chain_is_reported_against_the_planes_the_ome_metadata_declares(tmp_path) -> None:
    path = write_stack(tmp_path / "cut.ome.tif", stack(), voxel_size_um=VOXEL, info={})
    with tifffile.TiffFile(path) as tif:  # end the IFD chain after the first plane; the OME-XML stays
        fmt, first = tif.tiff, tif.pages[0].offset
        with open(path, "rb") as fh:
            fh.seek(first)
            (count,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
    with open(path, "r+b") as fh:
        fh.seek(first + fmt.tagnosize + count * fmt.tagsize)
        fh.write(struct.pack(fmt.offsetformat, 0))
    with pytest.raises(StackError, match="its OME metadata declares 16 planes but only 1 can be read"):
        read_stack(path)


def test_a_valid_stack_still_reads_back_as_written(tmp_path) -> None:
    """The daemon relies on read_stack: a whole file of any shape reads as before."""
    for shape in [(16, 32, 32), (1, 32, 32), (1, 1, 8, 8), (2, 3, 8, 8)]:
        array = stack(shape)
        path = write_stack(tmp_path / f"s{len(shape)}{shape[0]}.ome.tif", array, voxel_size_um=VOXEL,
                           info={"shape": list(shape)})
        back, info = read_stack(path)
        np.testing.assert_array_equal(back, array)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, stack((3, 16, 16)), photometric="minisblack")
    assert read_stack(plain)[0].shape == (3, 16, 16)


def test_a_file_that_is_not_a_tiff_says_so(model, tmp_path, capsys) -> None:
    src = tmp_path / "cells.png"
    src.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    code, _, err = predict(capsys, model, src, tmp_path / "o.tif")
    # .png is read (as one plane) since bring-your-own-data: a damaged one says what it is not
    assert code == 2 and "is not a PNG livestain can read" in err and "OME-TIFF" in err
    src = src.rename(tmp_path / "cells.tif")
    code, _, err = predict(capsys, model, src, tmp_path / "o.tif")
    assert code == 2 and "is not a TIFF file livestain can read" in err and "OME-TIFF" in err


@pytest.mark.parametrize("which", ["brightfield", "dna"])
def test_train_and_evaluate_refuse_a_truncated_file_in_the_dataset(model, tmp_path, capsys, which) -> None:
    data = dataset(tmp_path / "data", shape=(16, 16, 16))
    bad = truncate(data / "field001" / f"{which}.ome.tif")
    out = tmp_path / "m"
    code, _, err = run(capsys, *train_argv(data, out))
    assert code == 2 and f"{bad} is truncated or damaged" in err and "only 1 plane can be read" in err
    assert "mixes single-plane and stack targets" not in err  # what a cut target used to be called
    assert not out.with_suffix(".safetensors").exists()
    code, _, err = run(capsys, "evaluate", model, data)
    assert code == 2 and f"{bad} is truncated or damaged" in err


# ------------------------------------------------------------------ 2. RGB


def test_predict_refuses_an_rgb_image(model, tmp_path, capsys) -> None:
    src = tmp_path / "colour.tif"
    tifffile.imwrite(src, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    out = tmp_path / "pred.ome.tif"
    code, _, err = predict(capsys, model, src, out, "--voxel-size", "1,0.325,0.325")
    assert code == 2 and not out.exists()
    assert f"{src} looks like an RGB colour image (last axis has 3 samples)" in err
    assert "grayscale z-stack" in err and "photometric='minisblack'" in err


def test_an_rgb_image_saved_as_a_grayscale_stack_is_too_small_with_a_hint(model, tmp_path, capsys) -> None:
    """(64, 64, 3) written as 64 planes of 64x3: the samples axis taken for x."""
    src = tmp_path / "colour_as_stack.ome.tif"
    write_stack(src, np.zeros((64, 64, 3), np.uint16), voxel_size_um=VOXEL, info={})
    code, _, err = predict(capsys, model, src, tmp_path / "o.tif")
    assert code == 2 and "has shape (64, 64, 3) (z, y, x): too small to predict from" in err
    assert "an RGB colour image saved as a stack?" in err


def test_train_refuses_an_rgb_file_in_the_dataset(tmp_path, capsys) -> None:
    data = dataset(tmp_path / "data")
    bad = data / "field000" / "brightfield.ome.tif"
    tifffile.imwrite(bad, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    code, _, err = run(capsys, *train_argv(data, tmp_path / "m"))
    assert code == 2 and f"{bad} looks like an RGB colour image" in err


# ------------------------------------------------------------------ 3. NaN and infinity


def test_predict_refuses_an_all_nan_stack(model, tmp_path, capsys) -> None:
    src = write_stack(tmp_path / "nan.ome.tif", np.full((4, 16, 16), np.nan, np.float32),
                      voxel_size_um=VOXEL, info={})
    out = tmp_path / "pred.ome.tif"
    code, _, err = predict(capsys, model, src, out)
    assert code == 2 and not out.exists()
    assert f"{src} holds no finite value: all 1024 voxels are NaN or infinite (1024 NaN, 0 infinite)" in err


def test_predict_refuses_a_few_nan_and_inf_voxels_counting_them(model, tmp_path, capsys) -> None:
    """One NaN makes the normalisation's percentiles NaN: the whole prediction would be NaN."""
    array = stack((4, 16, 16)).astype(np.float32)
    array[1, 2, 3] = np.nan
    array[2, 0, 0] = np.nan
    array[3, 5, 5] = -np.inf
    src = write_stack(tmp_path / "holes.ome.tif", array, voxel_size_um=VOXEL, info={})
    out = tmp_path / "pred.ome.tif"
    code, _, err = predict(capsys, model, src, out)
    assert code == 2 and not out.exists()
    assert "has 2 NaN and 1 infinite voxels of 1024 (the first at z=1, y=2, x=3)" in err
    assert "Remove NaNs" in err and "nan_to_num" in err


def test_train_and_evaluate_refuse_nan_in_a_target(model, tmp_path, capsys) -> None:
    data = dataset(tmp_path / "data")
    target = np.ones((4, 16, 16), np.float32)
    target[0, 0, 0] = np.nan
    bad = write_stack(data / "field001" / "dna.ome.tif", target, voxel_size_um=VOXEL, info={})
    code, _, err = run(capsys, *train_argv(data, tmp_path / "m"))
    assert code == 2 and f"{bad} has 1 NaN and 0 infinite voxels" in err
    code, _, err = run(capsys, "evaluate", model, data)
    assert code == 2 and f"{bad} has 1 NaN" in err


def test_validate_stack_accepts_finite_floats_and_integers() -> None:
    validate_stack(np.full((1, 8, 8), 3.0e38, np.float32), "big")  # their sum overflows; still finite
    validate_stack(stack((2, 8, 8)), "ints")
    with pytest.raises(StackError, match="complex64 pixels"):
        validate_stack(np.zeros((1, 8, 8), np.complex64), "c")


# ------------------------------------------------------------------ 4. too small


def test_predict_refuses_a_one_voxel_stack_giving_shape_and_minimum(model, tmp_path, capsys) -> None:
    src = write_stack(tmp_path / "dot.ome.tif", np.ones((1, 1, 1), np.uint16), voxel_size_um=VOXEL,
                      info={"shape": [1, 1, 1]})
    out = tmp_path / "pred.ome.tif"
    code, _, err = predict(capsys, model, src, out)
    assert code == 2 and not out.exists()
    assert "has shape (1, 1, 1) (z, y, x): too small to predict from" in err  # was "shape ()"
    assert "at least 4x4 pixels in y, x" in err


def test_train_refuses_fields_too_small_for_the_network(tmp_path, capsys) -> None:
    data = dataset(tmp_path / "dots", shape=(1, 1, 1))
    out = tmp_path / "m"
    code, _, err = run(capsys, *train_argv(data, out))
    assert code == 2 and "has shape (1, 1, 1) (z, y, x): too small to train on" in err
    assert not out.with_suffix(".safetensors").exists()
    data = dataset(tmp_path / "small", shape=(4, 4, 4))  # enough for depth 1 or 2, not depth 3
    code, _, err = run(capsys, *train_argv(data, out, depth=3))
    assert code == 2 and "has shape (4, 4, 4)" in err and "at least 8x8 pixels" in err


def test_as_zyx_keeps_y_and_x() -> None:
    assert as_zyx(np.zeros((1, 1, 1))).shape == (1, 1, 1)
    assert as_zyx(np.zeros((1, 1, 1, 1))).shape == (1, 1, 1)
    assert as_zyx(np.zeros((8, 8))).shape == (1, 8, 8)
    assert as_zyx(np.zeros((1, 16, 1, 8, 8))).shape == (16, 8, 8)
    assert as_zyx(np.zeros((2, 3, 8, 8))).shape == (2, 3, 8, 8)  # left for the caller to refuse


# ------------------------------------------------------------------ 5. progress and memory


def test_tiled_predict_prints_progress(model, tmp_path, capsys) -> None:
    src = write_stack(tmp_path / "cells.ome.tif", stack((4, 64, 64)), voxel_size_um=VOXEL, info={})
    out = tmp_path / "pred.ome.tif"
    code, printed, _ = predict(capsys, model, src, out, "--tile", "4,32,32")
    assert code == 0 and out.exists()
    lines = [line.split() for line in printed.splitlines() if line.startswith("predicting: tile")]
    done, total = lines[-1][2].split("/")
    assert done == total == str(len(lines)) and int(total) > 1 and "ETA" in lines[-1]


def test_default_cpu_tiles_are_bounded_whatever_memory_is_free(monkeypatch) -> None:
    """A 1x4096x4096 plane once took 10 GB: the default tile planned with half of all free memory."""
    net = load_checkpoint(None).net
    monkeypatch.setattr(tiling, "free_memory_bytes", lambda device: 10**12)
    shape = (4, 4096, 4096)  # one plane, padded to the network's multiple
    tile = tiling.default_tile(net, shape, "cpu", free_bytes=tiling.tile_memory_bytes("cpu"))
    assert np.prod(tile) * tiling.bytes_per_voxel(net) <= tiling.CPU_TILE_BYTES
    calls = []
    real = tiling.predict_tiled
    monkeypatch.setattr(tiling, "predict_tiled", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    monkeypatch.setattr(tiling, "CPU_TILE_BYTES", 4 * 96 * 96 * tiling.bytes_per_voxel(net))
    x = torch.randn(1, 1, 1, 200, 200)
    ticks = []
    out = tiling.predict_volume(net, x, on_tile=lambda done, total: ticks.append((done, total)))
    assert calls and out.shape == (1, 3, 1, 200, 200) and out.is_contiguous()
    assert ticks[-1][0] == ticks[-1][1] == len(ticks) > 1


def test_cpu_tiles_run_on_onednn_and_leave_the_network_as_it_was() -> None:
    """PyTorch's own kernel choice made tile-sized inputs ~1.8x slower per voxel on the CPU."""
    net = load_checkpoint(None).net
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    seen: set[type] = set()
    hooks = [c.register_forward_pre_hook(lambda m, args: seen.add(type(m))) for c in convs]
    x = torch.randn(1, 1, 4, 200, 200)
    tiled = tiling.predict_tiled(net, x, (4, 96, 96))
    for h in hooks:
        h.remove()
    assert seen == {OneDnnConv3d} and all(type(c) is torch.nn.Conv3d for c in convs)  # restored after
    with torch.inference_mode():
        whole = net(x)
    assert float((tiled - whole).abs().max() / whole.std()) < 1e-3
    assert torch.equal(tiling.predict_volume(net, x[..., :64, :64]), net(x[..., :64, :64]))  # one pass: eager


def test_balanced_tiles_split_the_volume_evenly() -> None:
    net = load_checkpoint(None).net
    m, ov = tiling.multiple_of(net), tiling.default_overlap(net)
    for size, tile in [(4096, 2928), (4096, 1264), (2048, 632), (120, 96), (256, 256)]:
        (balanced,) = tiling.balanced_tile(net, (size,), (tile,))
        assert balanced <= tile and balanced % m == 0 and balanced >= min(tiling.min_tile(net), size)
        assert len(tiling.tile_starts(size, balanced, ov, m)) == len(tiling.tile_starts(size, tile, ov, m))
    assert tiling.balanced_tile(net, (4096,), (2928,)) == (2072,)  # 2 tiles either way, 29% fewer voxels


# ------------------------------------------------------------------ 6. voxel size


def _plain_dataset(folder: Path) -> Path:
    """A dataset saved with plain tifffile: right names, no OME metadata, no voxel size."""
    for i in range(2):
        d = folder / f"field{i:03d}"
        d.mkdir(parents=True)
        tifffile.imwrite(d / "brightfield.ome.tif", stack((4, 16, 16), seed=i), photometric="minisblack")
        tifffile.imwrite(d / "dna.ome.tif", stack((4, 16, 16), seed=10 + i).astype(np.float32),
                         photometric="minisblack")
    return folder


def test_no_voxel_size_messages_name_the_voxel_size_option(model, tmp_path, capsys) -> None:
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, stack((4, 16, 16)), photometric="minisblack")
    code, _, err = predict(capsys, model, plain, tmp_path / "o.tif")
    assert code == 2 and "has no OME metadata" in err and "--voxel-size Z,Y,X" in err
    data = _plain_dataset(tmp_path / "data")
    for argv in (train_argv(data, tmp_path / "m"), ["evaluate", model, data]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "has no OME metadata" in err and "--voxel-size Z,Y,X" in err, argv


def test_train_and_evaluate_take_a_voxel_size_for_plain_tiffs(model, tmp_path, capsys) -> None:
    data = _plain_dataset(tmp_path / "data")
    out = tmp_path / "m"
    code, _, err = run(capsys, *train_argv(data, out, "--voxel-size", "2,0.5,0.5"))
    assert code == 0, err
    assert load_checkpoint(out.with_suffix(".safetensors")).meta.voxel_size_um == pytest.approx((2, 0.5, 0.5))
    code, printed, err = run(capsys, "evaluate", model, data, "--voxel-size", "2,0.5,0.5")
    assert code == 0 and "pearson" in printed, err
    assert load_fields(data, ["dna"], (2, 0.5, 0.5))[0].voxel_size_um == (2, 0.5, 0.5)


# ------------------------------------------------------------------ 7. warnings


def test_torch_compile_deprecation_warnings_are_filtered_narrowly() -> None:
    """torch.compile's inductor imports torch.utils.mkldnn, whose 14 @torch.jit.script_method
    warn (torch's code, not ours). pyproject's filter silences exactly that message from
    torch.jit._script: the same import under it, with every other DeprecationWarning an
    error, runs clean; without it, it fails."""
    ours = re.findall(r'^\s*"(ignore:[^"]*torch\.jit\.script_method[^"]*)",', (ROOT / "pyproject.toml").read_text(), re.M)
    assert len(ours) == 1 and ours[0].startswith("ignore:") and ours[0].endswith(":torch.jit._script")
    code = "import torch.utils.mkldnn"
    strict = [sys.executable, "-W", "error::DeprecationWarning"]
    assert subprocess.run([*strict, "-c", code], capture_output=True).returncode != 0  # the warnings exist
    done = subprocess.run([*strict, "-W", ours[0], "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr, done.stderr

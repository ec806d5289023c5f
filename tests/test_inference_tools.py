"""Tiled prediction, paired datasets on disk, evaluation metrics and the train/predict/evaluate commands.

Everything runs on tiny networks (depth 1-2, 4 base channels) and 64x64 crops so each
test takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from livestain.inference import commands, tiling
from livestain.inference.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from livestain.inference.dataset import fingerprint, load_fields, write_pairs
from livestain.inference.evaluate import evaluate_model, nrmse, ssim, structure_metrics
from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.predict import Predictor
from livestain.stackio import read_stack, voxel_size_of, write_stack

# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: tiny convolutions gain nothing from more, and on a shared 2-core
    machine oversubscribed threads made these tests 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(depth: int = 2, structures: tuple[str, ...] = ("dna", "membrane", "mitochondria")) -> UNet3D:
    """An eval-mode net whose BatchNorm statistics are not the identity defaults."""
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(structures=structures, depth=depth, base_channels=4))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, 8, 32, 32) * 2 + 0.5)
    return net.eval()


def smooth_volume(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """(1, 1, Z, Y, X) unit-variance smooth noise: a network's output is smooth too, so seams show."""
    v = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), (1, 2, 2)).astype(np.float32)
    return torch.from_numpy(v / v.std())[None, None]


def whole(net: UNet3D, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(x)


def boundaries(size: int, tile: int, overlap: int, m: int) -> list[int]:
    """Positions i where a tile starts or ends inside the volume (between voxel i-1 and i)."""
    starts = tiling.tile_starts(size + (-size) % m, tile, overlap, m)
    return sorted({s for s in starts if s > 0} | {s + tile for s in starts if s + tile < size})


def seam_ratio(out: np.ndarray, edges: list[int]) -> float:
    """Mean |x-gradient| across tile edges over the mean |x-gradient| everywhere."""
    g = np.abs(np.diff(out, axis=-1)).mean(axis=tuple(range(out.ndim - 1)))
    return float(g[[i - 1 for i in edges]].mean() / g.mean())


class OOMNet(torch.nn.Module):
    """Wraps a net; raises out-of-memory for inputs above ``max_voxels`` (as a GPU would)."""

    def __init__(self, net: UNet3D, max_voxels: int, error: type[BaseException] | None = None) -> None:
        super().__init__()
        self.net, self.config, self.max_voxels = net, net.config, max_voxels
        self.error = error
        self.seen: list[tuple[int, ...]] = []
        self.failures = 0

    @property
    def multiple(self) -> int:
        return self.net.multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-3:]))
        if x[0, 0].numel() > self.max_voxels:
            self.failures += 1
            if self.error is None:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise self.error("out of memory (simulated)")
        return self.net(x)


# ------------------------------------------------------------------ tiling


def test_tiled_prediction_matches_the_whole_volume_pass() -> None:
    net = tiny_net(depth=2)
    x = smooth_volume((12, 220, 200))
    ref = whole(net, x)
    tile = (12, 96, 96)
    assert tiling.default_overlap(net) == 48 and tiling.tile_starts(220, 96, 48, 4) == [0, 48, 96, 124]
    out = tiling.predict_tiled(net, x, tile)
    assert out.shape == ref.shape
    rel = float((out - ref).abs().max() / ref.std())
    assert rel < 1e-4, rel  # measured 3.8e-7 (float rounding)
    naive = float((tiling.predict_tiled(net, x, tile, overlap=0) - ref).abs().max() / ref.std())
    assert naive > 0.05, naive  # measured 0.35: the comparison is sensitive, hard cuts fail it


def test_tiling_in_z_and_odd_sizes_match_within_tolerance() -> None:
    net = tiny_net(depth=1)
    x = smooth_volume((39, 71, 61), seed=1)  # odd sizes: padded as the net pads a whole volume
    ref = whole(net, x)
    assert tiling.tile_starts(40, 24, 18, 2) == [0, 12, 16]
    out = tiling.predict_tiled(net, x, (24, 36, 36))  # overlap 18, clipped to 12 in z
    assert out.shape == ref.shape
    rel = float((out - ref).abs().max() / ref.std())
    assert rel < 5e-3, rel  # measured 1.3e-3


def test_blended_tiles_leave_no_seam() -> None:
    net = tiny_net(depth=1)
    x = smooth_volume((12, 150, 130))
    tile, ov = 48, tiling.default_overlap(net)
    out = tiling.predict_tiled(net, x, (12, tile, tile))[0].numpy()
    assert seam_ratio(out, boundaries(130, tile, ov, 2)) < 1.1  # measured 0.97
    cut = tiling.predict_tiled(net, x, (12, tile, tile), overlap=0)[0].numpy()
    assert seam_ratio(cut, boundaries(130, tile, 0, 2)) > 1.3  # measured 1.52: the metric sees seams


def test_single_tile_volume_is_bit_identical_to_one_pass() -> None:
    net = tiny_net(depth=2)
    x = smooth_volume((10, 30, 26))
    assert torch.equal(tiling.predict_volume(net, x), whole(net, x))
    assert torch.equal(tiling.predict_volume(net, x, tile=(16, 64, 64)), whole(net, x))


def test_tta_averages_the_four_flips() -> None:
    net = tiny_net(depth=1)
    x = smooth_volume((6, 40, 36))
    out = tiling.predict_volume(net, x, tta=True)
    assert out.shape == (1, 3, 6, 40, 36) and torch.isfinite(out).all()
    with torch.inference_mode():
        manual = sum(net(x.flip(d)).flip(d) if d else net(x) for d in ((), (-1,), (-2,), (-2, -1))) / 4
    torch.testing.assert_close(out, manual, rtol=0, atol=1e-6)
    assert (out - whole(net, x)).abs().max() > 1e-3  # the flips really changed something
    tiled = tiling.predict_volume(net, smooth_volume((6, 90, 80)), tile=(8, 32, 32), tta=True)
    assert tiled.shape == (1, 3, 6, 90, 80) and torch.isfinite(tiled).all()


@pytest.mark.parametrize("error", [None, torch.OutOfMemoryError])
def test_out_of_memory_halves_the_tile_and_succeeds(error) -> None:
    net = tiny_net(depth=1)
    x = smooth_volume((8, 96, 96))
    oom = OOMNet(net, max_voxels=8 * 40 * 40, error=error)
    out = tiling.predict_volume(oom, x)  # default tile: the whole volume, which "does not fit"
    assert oom.failures == 2  # whole volume, then 8x48x48; 8x36x36 (the minimum tile) fits
    assert set(oom.seen[2:]) == {(8, 36, 36)}
    rel = float((out - whole(net, x)).abs().max() / whole(net, x).std())
    assert rel < 1e-3, rel  # measured 1.1e-4


def test_out_of_memory_at_the_smallest_tile_and_other_errors_propagate() -> None:
    net = tiny_net(depth=1)
    x = smooth_volume((4, 16, 16))
    with pytest.raises(RuntimeError, match="out of memory even in tiles of"):
        tiling.predict_volume(OOMNet(net, max_voxels=1), x)
    floor = OOMNet(net, max_voxels=4 * 36 * 36 - 1)  # nothing down to the minimum tile fits
    with pytest.raises(RuntimeError, match="out of memory even in tiles of"):
        tiling.predict_volume(floor, smooth_volume((4, 80, 80)))
    assert min(np.prod(s) for s in floor.seen) == 4 * 36 * 36  # it stopped at min_tile, not at 2x2

    class Broken(OOMNet):
        def forward(self, x):
            raise RuntimeError("shape mismatch, a bug")

    broken = Broken(net, 0)
    with pytest.raises(RuntimeError, match="a bug") as info:
        tiling.predict_volume(broken, x)
    assert "out of memory" not in str(info.value)  # passed through untouched, not retried


def test_default_tile_follows_the_memory_estimate() -> None:
    net = tiny_net(depth=2)
    bpv = tiling.bytes_per_voxel(net)
    assert bpv == pytest.approx((4 + 8 / 8 + 16 / 64) * tiling.ACTIVATION_FACTOR)
    assert tiling.min_tile(net) == 96
    shape = (16, 2048, 2048)
    for free in (10**8, 10**9, 10**10):
        t = tiling.default_tile(net, shape, free_bytes=free)
        assert t[0] == 16 and all(v % 4 == 0 and v >= 96 for v in t[1:])  # whole z kept
        assert np.prod(t) * bpv <= free * tiling.MEMORY_FRACTION
        bigger = (t[0], t[1] + 4, t[2] + 4)
        assert np.prod(bigger) * bpv > free * tiling.MEMORY_FRACTION  # the largest that fits
    assert tiling.default_tile(net, shape, free_bytes=10**6) == (16, 96, 96)  # never below min_tile
    thick = tiling.default_tile(net, (400, 2048, 2048), free_bytes=10**9)
    assert 96 <= thick[0] < 400 and thick[1:] == (96, 96)  # z gives way only once y/x are minimal
    assert np.prod(thick) * bpv <= 10**9 * tiling.MEMORY_FRACTION
    assert tiling.default_tile(net, (10, 30, 30), free_bytes=10**12) == (12, 32, 32)  # padded volume
    assert tiling.free_memory_bytes("cpu") > 0


def test_predictor_tiles_when_memory_is_short_and_keeps_small_stacks_in_one_pass(tmp_path, monkeypatch) -> None:
    net = tiny_net(depth=2, structures=("dna", "membrane"))
    path = save_checkpoint(tmp_path / "m", net, ModelMeta(net.config))
    predictor = Predictor(load_checkpoint(path), "cpu")
    stack = (np.random.default_rng(0).normal(3000, 60, (8, 120, 100))).astype(np.uint16)
    one_pass = predictor.predict(stack)
    with torch.inference_mode():
        direct = net(torch.from_numpy(predictor.model.meta.norm(stack))[None, None])[0].numpy()
    np.testing.assert_array_equal(one_pass, direct)  # unchanged behaviour for small stacks
    calls = []
    real = tiling.predict_tiled
    monkeypatch.setattr(tiling, "predict_tiled", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    monkeypatch.setattr(tiling, "free_memory_bytes", lambda device: 8 * 48 * 48 * tiling.bytes_per_voxel(net) * 2)
    tiled = predictor.predict(stack)
    assert calls and tuple(calls[0]) == (8, 96, 96)  # it did tile, on its own, at the minimum tile
    assert np.abs(tiled - one_pass).max() < 1e-3 * one_pass.std()
    forced = predictor.predict(stack, tile=(8, 64, 64), tta=True)
    assert forced.shape == (2, 8, 120, 100) and np.isfinite(forced).all()


# ------------------------------------------------------------------ datasets


def _crop_pairs(n: int = 3, size: int = 64, seed: int = 4):
    """Simulated pairs (8 planes) cropped to ``size`` around a nucleus, so every crop has cells."""
    from livestain.devices.pairs import simulate_pairs

    tiles = [(0, 0), (0, 1), (1, 0), (1, 1)][:n]
    pairs = list(simulate_pairs(tiles, seed=seed, z_planes_um=np.arange(8) + 0.5))
    for p in pairs:
        ny, nx = p.brightfield.shape[-2:]
        cy, cx = np.unravel_index(np.argmax(p.targets[0].max(axis=0)), (ny, nx))
        y0 = int(np.clip(cy - size // 2, 0, ny - size))
        x0 = int(np.clip(cx - size // 2, 0, nx - size))
        p.brightfield = p.brightfield[:, y0 : y0 + size, x0 : x0 + size].copy()
        p.targets = p.targets[:, :, y0 : y0 + size, x0 : x0 + size].copy()
    return pairs


@pytest.fixture(scope="module")
def pairs():
    return _crop_pairs()


@pytest.fixture(scope="module")
def dataset(pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_pairs(pairs, out)
    return out


def test_write_and_load_pairs_round_trip(pairs, dataset) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == ["field000", "field001", "field002"]
    assert sorted(p.name for p in (dataset / "field000").iterdir()) == [
        "brightfield.ome.tif", "dna.ome.tif", "membrane.ome.tif", "mitochondria.ome.tif"]
    fields = load_fields(dataset, ["membrane", "dna"])
    assert [f.name for f in fields] == ["field000", "field001", "field002"]
    for f, p in zip(fields, pairs):
        assert f.structures == ("membrane", "dna")
        np.testing.assert_array_equal(f.brightfield, p.brightfield)
        assert f.brightfield.dtype == np.uint16
        np.testing.assert_array_equal(f.targets[0], p.targets[1])
        np.testing.assert_array_equal(f.targets[1], p.targets[0])
        assert f.voxel_size_um == pytest.approx(p.voxel_size_um)
    assert load_fields(dataset)[0].structures == ("dna", "membrane", "mitochondria")
    _, info = read_stack(dataset / "field001" / "dna.ome.tif")
    assert info["structure"] == "dna" and info["tile"] == [0, 1]
    with pytest.raises(FileExistsError, match="already exists"):
        write_pairs(pairs[:1], dataset)


def test_fingerprint_changes_with_the_files(pairs, tmp_path) -> None:
    write_pairs(pairs[:2], tmp_path / "d")
    a = fingerprint(tmp_path / "d")
    assert a == fingerprint(tmp_path / "d") and len(a) == 64
    write_pairs(pairs[2:], tmp_path / "d", start=2)
    b = fingerprint(tmp_path / "d")
    assert b != a
    (tmp_path / "d" / "field002" / "dna.ome.tif").unlink()
    c = fingerprint(tmp_path / "d")
    assert c not in (a, b)
    write_stack(tmp_path / "d" / "field001" / "dna.ome.tif", np.zeros((8, 64, 32), np.float32),
                voxel_size_um=(1, 1, 1), info={})  # same names, other content
    assert fingerprint(tmp_path / "d") not in (a, b, c)


def test_dataset_errors_name_the_problem_and_the_fix(pairs, tmp_path) -> None:
    with pytest.raises(ValueError, match="holds no field.*field000/brightfield.ome.tif"):
        load_fields(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_fields(tmp_path / "nope")
    write_pairs(pairs[:2], tmp_path / "d")
    (tmp_path / "d" / "field001" / "membrane.ome.tif").unlink()
    with pytest.raises(ValueError, match=r"field001 has no stack for membrane.*leave membrane out of --structures"):
        load_fields(tmp_path / "d", ["dna", "membrane"])
    bad = tmp_path / "d" / "field000" / "dna.ome.tif"
    write_stack(bad, np.zeros((8, 32, 64), np.float32), voxel_size_um=(1, 1, 1), info={})
    with pytest.raises(ValueError, match=r"dna.ome.tif has shape \(8, 32, 64\).*registered"):
        load_fields(tmp_path / "d", ["dna"])
    plain = tmp_path / "p" / "field000"
    plain.mkdir(parents=True)
    tifffile.imwrite(plain / "brightfield.ome.tif", np.zeros((2, 8, 8), np.uint16))
    tifffile.imwrite(plain / "dna.ome.tif", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="no OME metadata with a physical voxel size"):
        load_fields(tmp_path / "p")


def test_inference_modules_import_neither_pymmcore_nor_devices_nor_matplotlib() -> None:
    code = (
        "import sys\n"
        "import livestain.inference.commands, livestain.inference.dataset, "
        "livestain.inference.evaluate, livestain.inference.tiling, livestain.inference.predict\n"
        "bad = [m for m in sys.modules if m.startswith(('pymmcore', 'livestain.devices', 'matplotlib'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ metrics


def test_ssim_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.normal(size=(3, 40, 40)), 2)
    assert ssim(a, a) == pytest.approx(1.0)
    # constant images: only the luminance term (2ab + C1) / (a^2 + b^2 + C1) is left
    L = 10.0
    c1 = (0.01 * L) ** 2
    got = ssim(np.full((2, 30, 30), 3.0), np.full((2, 30, 30), 5.0), data_range=L)
    assert got == pytest.approx((2 * 3 * 5 + c1) / (9 + 25 + c1), rel=1e-9)
    noisy = a + rng.normal(0, 0.05, a.shape)
    noisier = a + rng.normal(0, 0.5, a.shape)
    assert 1.0 > ssim(noisy, a) > ssim(noisier, a) > 0
    b = a - a.min() + 0.1  # positive, like intensities
    inverted = b.max() + b.min() - b  # same range, contrast reversed
    assert ssim(inverted, b) < -0.5
    assert ssim(a[0], a[0]) == pytest.approx(1.0)  # 2-D works too
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, a[:, :-1])


def test_structure_metrics_perfect_scaled_and_mean_predictions() -> None:
    rng = np.random.default_rng(1)
    truth = ndimage.gaussian_filter(rng.gamma(2.0, 100.0, (4, 40, 40)), 1.5)  # fluorescence-like, > 0
    z = (truth - truth.mean()) / truth.std()
    perfect = structure_metrics(z, truth)
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["nrmse"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["ssim"] == pytest.approx(1.0)
    half = structure_metrics(0.5 * z, truth)
    assert half["pearson"] == pytest.approx(1.0) and half["nrmse"] == pytest.approx(0.5, rel=1e-5)
    assert half["ssim"] < 0.99
    flat = structure_metrics(np.zeros_like(z), truth)
    assert flat["nrmse"] == pytest.approx(1.0, rel=1e-5) and flat["pearson"] == 0.0
    assert nrmse(z, z) == 0.0
    assert nrmse(truth + truth.std(), truth) == pytest.approx(1.0)  # an offset of one sd, any units
    assert nrmse(truth + truth.std(), truth) == pytest.approx(nrmse(1 + z, z))


def test_evaluate_model_scores_each_field_and_draws_figures(pairs, tmp_path) -> None:
    net = tiny_net(depth=1, structures=("dna", "membrane"))
    meta = ModelMeta(net.config, voxel_size_um=pairs[0].voxel_size_um)
    model = load_checkpoint(save_checkpoint(tmp_path / "m", net, meta))
    report = evaluate_model(model, pairs, figures_dir=tmp_path / "figs")
    assert report["structures"] == ["dna", "membrane"]  # mitochondria: not predicted by the model
    assert list(report["fields"]) == ["field000", "field001", "field002"]
    pred = Predictor(model, "cpu").predict(pairs[1].brightfield, pairs[1].voxel_size_um)
    expect = structure_metrics(pred[1], pairs[1].targets[1])
    assert report["fields"]["field001"]["membrane"] == pytest.approx(expect)
    for m in ("pearson", "ssim", "nrmse"):
        values = [report["fields"][f]["dna"][m] for f in report["fields"]]
        assert report["mean"]["dna"][m] == pytest.approx(np.mean(values))
    import matplotlib.image

    img = matplotlib.image.imread(report["figures"][1])
    assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05  # 2 rows x 3 panels
    with pytest.raises(ValueError, match="share|at least one of the model's structures"):
        evaluate_model(model, [type("F", (), {"name": "x", "brightfield": pairs[0].brightfield,
                                              "targets": pairs[0].targets[2:], "structures": ("mitochondria",),
                                              "voxel_size_um": pairs[0].voxel_size_um})()])


# ------------------------------------------------------------------ commands


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livestain")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    return parser


def test_register_adds_parsers_with_funcs_and_checks_values(capsys) -> None:
    p = _parser()
    a = p.parse_args(["train", "D", "--structures", "dna,membrane", "--out", "m", "--patch", "8,32,32"])
    assert a.func is commands.cmd_train and a.structures == ("dna", "membrane") and a.patch == (8, 32, 32)
    assert a.steps == 600 and a.val_fraction == 0.2 and a.base_channels == 8
    a = p.parse_args(["predict", "m.safetensors", "in.tif", "--out", "o.tif", "--tile", "16,128,128", "--tta"])
    assert a.func is commands.cmd_predict and a.tile == (16, 128, 128) and a.tta and a.voxel_size is None
    a = p.parse_args(["evaluate", "m.safetensors", "D", "--json", "--figures", "F"])
    assert a.func is commands.cmd_evaluate and a.json and a.figures == Path("F") and a.tile is None
    for bad, says in ((["--patch", "8,32"], "3 positive integers Z,Y,X"), (["--patch", "8,0,32"], "positive"),
                      (["--structures", "dna,,x"], "distinct structure names"),
                      (["--structures", "dna,dna"], "distinct structure names")):
        with pytest.raises(SystemExit):
            p.parse_args(["train", "D", "--out", "m", "--structures", "dna", *bad])
        assert says in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("model") / "tiny"
    argv = ["train", str(dataset), "--structures", "dna,membrane", "--out", str(out), "--steps", "20",
            "--patch", "8,32,32", "--batch", "2", "--depth", "1", "--base-channels", "4", "--val-fraction", "0.34"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        a = _parser().parse_args(argv)
        assert a.func(a) == 0
    return out.with_suffix(".safetensors"), buf.getvalue()


def test_train_command_writes_model_metadata_and_curve(trained, dataset) -> None:
    path, printed = trained
    model = load_checkpoint(path)
    assert model.meta.config.structures == ("dna", "membrane") and model.meta.config.depth == 1
    extra = model.meta.extra
    assert extra["data"]["fingerprint"] == fingerprint(dataset)
    assert len(extra["data"]["val_fields"]) == 1 and len(extra["data"]["train_fields"]) == 2
    assert not set(extra["data"]["val_fields"]) & set(extra["data"]["train_fields"])
    assert set(extra["val_pearson"]) == {"dna", "membrane"}
    assert all(-1 <= r <= 1 for r in extra["val_pearson"].values())
    assert extra["history"][-1]["step"] == 20 and extra["settings"]["patch"] == [8, 32, 32]
    assert model.meta.voxel_size_um == pytest.approx(voxel_size_of(dataset / "field000" / "brightfield.ome.tif"))
    assert "step 20/20" in printed and "ETA" in printed and "validation Pearson r" in printed
    curve = path.with_suffix(".curve.png")
    assert curve.name == "tiny.curve.png" and curve.stat().st_size > 5000


def test_train_command_errors(dataset, tmp_path) -> None:
    p = _parser()
    a = p.parse_args(["train", str(dataset), "--structures", "dna,actin", "--out", str(tmp_path / "m")])
    with pytest.raises(ValueError, match="field000 has no stack for actin"):
        a.func(a)
    a = p.parse_args(["train", str(tmp_path), "--structures", "dna", "--out", str(tmp_path / "m")])
    with pytest.raises(ValueError, match="holds no field"):
        a.func(a)
    a = p.parse_args(["train", str(dataset), "--structures", "dna", "--out", str(tmp_path / "m"),
                      "--val-fraction", "1"])
    with pytest.raises(ValueError, match="--val-fraction"):
        a.func(a)


def test_predict_command_writes_named_channels_with_the_input_voxel_size(trained, dataset, tmp_path) -> None:
    model, _ = trained
    src = dataset / "field002" / "brightfield.ome.tif"
    out = tmp_path / "pred.ome.tif"
    p = _parser()
    a = p.parse_args(["predict", str(model), str(src), "--out", str(out)])
    assert a.func(a) == 0
    pred, info = read_stack(out)
    assert pred.dtype == np.float32 and pred.shape == (2, 8, 64, 64)
    assert info["structures"] == ["dna", "membrane"] and info["kind"] == "prediction"
    with tifffile.TiffFile(out) as tif:
        channels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]["Channel"]
    assert [c["Name"] for c in channels] == ["dna", "membrane"]
    assert voxel_size_of(out) == pytest.approx(voxel_size_of(src))
    stack, _ = read_stack(src)
    np.testing.assert_allclose(pred, Predictor(str(model), "cpu").predict(stack, voxel_size_of(src)), atol=1e-6)
    a = p.parse_args(["predict", str(model), str(src), "--out", str(tmp_path / "t.ome.tif"), "--tile", "8,32,32"])
    assert a.func(a) == 0
    tiled, info = read_stack(tmp_path / "t.ome.tif")
    predictor = Predictor(str(model), "cpu")
    np.testing.assert_allclose(tiled, predictor.predict(stack, voxel_size_of(src), tile=(8, 32, 32)), atol=1e-6)
    assert info["tile"] == [8, 32, 32] and not np.array_equal(tiled, pred)  # it really tiled...
    assert np.abs(tiled - pred).max() < 0.1 * pred.std()  # ...and blended (measured 0.035 on this barely trained net)
    a = p.parse_args(["predict", str(model), str(src), "--out", str(tmp_path / "a.ome.tif"), "--tta"])
    assert a.func(a) == 0
    tta, info = read_stack(tmp_path / "a.ome.tif")
    assert info["tta"] is True and tta.shape == pred.shape and np.isfinite(tta).all()
    assert not np.allclose(tta, pred, atol=1e-4)


def test_predict_command_errors_and_voxel_size_option(trained, tmp_path) -> None:
    model, _ = trained
    p = _parser()
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.full((4, 32, 32), 3000, np.uint16), photometric="minisblack")
    a = p.parse_args(["predict", str(model), str(plain), "--out", str(tmp_path / "o.tif")])
    with pytest.raises(ValueError, match="--voxel-size|no OME metadata"):
        a.func(a)
    a = p.parse_args(["predict", str(model), str(plain), "--out", str(tmp_path / "o.tif"),
                      "--voxel-size", "2,0.65,0.65"])
    assert a.func(a) == 0 and voxel_size_of(tmp_path / "o.tif") == pytest.approx((2, 0.65, 0.65))
    a = p.parse_args(["predict", str(model), str(plain), "--out", str(plain)])
    with pytest.raises(ValueError, match="is the input file"):
        a.func(a)
    a = p.parse_args(["predict", str(model), str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o2.tif")])
    with pytest.raises(ValueError, match="does not exist"):
        a.func(a)
    czyx = tmp_path / "czyx.ome.tif"
    write_stack(czyx, np.zeros((2, 4, 16, 16), np.uint16), voxel_size_um=(1, 1, 1), info={})
    a = p.parse_args(["predict", str(model), str(czyx), "--out", str(tmp_path / "o3.tif")])
    with pytest.raises(ValueError, match="one ZYX brightfield stack"):
        a.func(a)


def test_evaluate_command_json_and_figures(trained, dataset, tmp_path, capsys) -> None:
    model, _ = trained
    a = _parser().parse_args(["evaluate", str(model), str(dataset), "--json", "--figures", str(tmp_path / "f")])
    assert a.func(a) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["structures"] == ["dna", "membrane"] and report["same_data_as_training"] is True
    assert sorted(report["fields"]) == ["field000", "field001", "field002"]
    direct = evaluate_model(str(model), load_fields(dataset, ["dna", "membrane"]))
    for s, metrics in direct["mean"].items():
        assert report["mean"][s] == pytest.approx(metrics)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["field000.png", "field001.png", "field002.png"]
    a = _parser().parse_args(["evaluate", str(model), str(dataset)])
    assert a.func(a) == 0
    text = capsys.readouterr().out
    assert "optimistic" in text and "pearson" in text and "membrane" in text

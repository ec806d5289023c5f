"""2.5D models, training augmentation / mixed precision / resumable state, export to
ONNX and bioimage.io, and the real-data pipeline.

Tiny networks (depth 1-2, 4 base channels), small synthetic fields and a few steps, so
each test takes seconds on a shared 2-core CPU. Export tests skip without onnx /
onnxruntime (or bioimageio.spec); real-data tests skip without ../shared/data or
ndev-sampledata.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from livestain.inference import commands, tiling
from livestain.inference.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from livestain.inference.dataset import load_fields, write_pairs
from livestain.inference.evaluate import evaluate_model
from livestain.inference.model import UNet3D, UNetConfig, window_indices
from livestain.inference.normalize import PercentileNorm, zscore
from livestain.inference.predict import Predictor
from livestain.inference.train import (
    TrainSettings,
    _sample,
    cpu_has_native_bf16,
    evaluate,
    load_training_state,
    pearson,
    resolve_precision,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def net_2_5d(z_window: int = 3, structures=("dna", "membrane"), depth: int = 2, seed: int = 0) -> UNet3D:
    """An eval-mode 2.5D net whose BatchNorm statistics are not the identity defaults."""
    torch.manual_seed(seed)
    net = UNet3D(UNetConfig(structures=structures, depth=depth, base_channels=4, mode="2.5d", z_window=z_window))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, z_window, 32, 32) * 2 + 0.5)
    return net.eval()


def defocus_field(seed: int, nz: int = 5, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A toy defocus series of blobs and the blobs as a single-plane truth.

    Plane z shows the blobs blurred by |z - centre| and with the sign of z - centre
    (halos reverse across focus, as in brightfield); the in-focus plane shows almost
    nothing, so a model must combine planes.
    """
    rng = np.random.default_rng(seed)
    blobs = np.zeros((size, size), np.float32)
    for _ in range(8):
        cy, cx = rng.integers(6, size - 6, 2)
        blobs[cy, cx] = 1.0
    truth = ndimage.gaussian_filter(blobs, 2.5)
    truth /= truth.max()
    c = nz // 2
    planes = [np.sign(z - c) * ndimage.gaussian_filter(truth, 1 + abs(z - c)) * 40 for z in range(nz)]
    bf = 1000 + np.stack(planes) + rng.normal(0, 1.0, (nz, size, size))
    return bf.astype(np.float32), truth[None]


# ------------------------------------------------------------------ model


def test_2_5d_config_validation_and_old_checkpoints_read_as_3d() -> None:
    cfg = UNetConfig(mode="2.5d", z_window=5)
    assert cfg.spatial_dims == 2 and cfg.net_in_channels == 5
    assert UNetConfig().spatial_dims == 3 and UNetConfig().net_in_channels == 1
    with pytest.raises(ValueError, match="z_window"):
        UNetConfig(mode="3d", z_window=3)
    with pytest.raises(ValueError, match="mode"):
        UNetConfig(mode="2d")
    with pytest.raises(ValueError, match="target_2d"):
        UNetConfig(mode="2.5d", target_2d="mean")
    old = {"in_channels": 1, "structures": ["dna"], "depth": 2, "base_channels": 8}  # written before 2.5D
    assert UNetConfig.from_dict(old) == UNetConfig(structures=("dna",), depth=2, base_channels=8, mode="3d")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("shape", [(37, 41), (8, 8), (3, 5), (64, 48)])
def test_2_5d_net_takes_any_plane_size(shape) -> None:
    net = net_2_5d(z_window=5)
    with torch.inference_mode():
        out = net(torch.randn(2, 5, *shape))
    assert out.shape == (2, 2, *shape)
    assert not any(isinstance(m, torch.nn.Conv3d) for m in net.modules())  # really 2D convolutions
    with pytest.raises(ValueError, match=r"\(N, 5, Y, X\)"):
        net(torch.randn(1, 1, 5, *shape))


def test_window_indices_repeat_edge_planes() -> None:
    assert window_indices(6, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert window_indices(10, 3).tolist() == [4, 5, 6]
    assert window_indices(10, 3, 0).tolist() == [0, 0, 1]
    assert window_indices(10, 4, 9).tolist() == [7, 8, 9, 9]
    assert window_indices(2, 5).tolist() == [0, 0, 1, 1, 1]  # centre: plane 1
    assert window_indices(1, 1).tolist() == [0]


def test_2_5d_checkpoint_round_trip_is_bit_exact(tmp_path) -> None:
    net = net_2_5d(z_window=3)
    meta = ModelMeta(net.config, PercentileNorm(1.0, 99.0), (2.0, 0.4, 0.4), {"note": "x"})
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m", net, meta))
    assert loaded.meta.config == net.config and loaded.meta.config.mode == "2.5d"
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(1, 3, 24, 40)
    with torch.inference_mode():
        assert torch.equal(net(x), loaded.net(x))


def test_2_5d_tiled_prediction_matches_one_pass() -> None:
    net = net_2_5d(z_window=3, depth=1)
    v = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(3, 150, 130)), (0, 2, 2)).astype(np.float32)
    x = torch.from_numpy(v / v.std())[None]
    with torch.inference_mode():
        ref = net(x)
    out = tiling.predict_tiled(net, x, (48, 48))
    assert out.shape == ref.shape == (1, 2, 150, 130)
    rel = float((out - ref).abs().max() / ref.std())
    assert rel < 1e-4, rel
    cut = float((tiling.predict_tiled(net, x, (48, 48), overlap=0) - ref).abs().max() / ref.std())
    assert cut > 0.02, cut  # hard cuts do differ: the comparison can fail
    assert tiling.default_tile(net, (4000, 4000), free_bytes=10**8)[0] < 4000  # 2-axis tile from memory
    assert tiling.halve((96, 96), 2, (20, 20)) == (48, 48) and tiling.halve((20, 20), 2, (20, 20)) is None


def test_predictor_2_5d_centre_window_slide_and_z_centre(tmp_path) -> None:
    net = net_2_5d(z_window=3)
    model = load_checkpoint(save_checkpoint(tmp_path / "m", net, ModelMeta(net.config)))
    predictor = Predictor(model, "cpu")
    stack = np.random.default_rng(1).normal(3000, 80, (7, 40, 36)).astype(np.float32)
    x = torch.from_numpy(PercentileNorm()(stack))

    def manual(centre: int) -> np.ndarray:
        with torch.inference_mode():
            return net(x[window_indices(7, 3, centre)][None])[0].numpy()

    centre = predictor.predict(stack)
    assert centre.shape == (2, 1, 40, 36)  # 4-D like every prediction on the wire
    np.testing.assert_allclose(centre[:, 0], manual(3), atol=1e-6)
    np.testing.assert_allclose(predictor.predict(stack, z_centre=1)[:, 0], manual(1), atol=1e-6)
    assert not np.allclose(manual(1), manual(3), atol=1e-3)  # the window really moved
    slide = predictor.predict(stack, slide=True)
    assert slide.shape == (2, 7, 40, 36)
    for k in (0, 3, 6):
        np.testing.assert_allclose(slide[:, k], manual(k), atol=1e-6)
    tiled = predictor.predict(stack, tile=(16, 16))
    assert np.abs(tiled - centre).max() < 0.2 * centre.std()  # tiles of a 2D image, blended
    with pytest.raises(ValueError, match="z_centre"):
        predictor.predict(stack, z_centre=7)
    resampled = predictor.predict(stack, voxel_size_um=(1.0, 0.65, 0.65))  # model voxel 0.325 um
    assert resampled.shape == (2, 1, 40, 36) and np.isfinite(resampled).all()


# ------------------------------------------------------------------ data


def test_single_plane_truth_files_load_beside_zyx_brightfield(tmp_path) -> None:
    class P:
        structures = ("dna",)
        voxel_size_um = (1.0, 0.5, 0.5)

    pairs = []
    for seed in range(2):
        p = P()
        p.brightfield, p.targets = defocus_field(seed, size=32)
        p.brightfield = p.brightfield.astype(np.uint16)
        pairs.append(p)
    write_pairs(pairs, tmp_path / "d")
    fields = load_fields(tmp_path / "d")
    assert [f.name for f in fields] == ["field000", "field001"]
    f = fields[1]
    assert f.planar and f.targets.shape == (1, 32, 32) and f.brightfield.shape == (5, 32, 32)
    np.testing.assert_allclose(f.targets, pairs[1].targets, rtol=1e-6)
    # a stack target beside a plane target in one field: refused
    from livestain.stackio import write_stack

    write_stack(tmp_path / "d" / "field000" / "membrane.ome.tif", np.zeros((5, 32, 32), np.float32),
                voxel_size_um=(1.0, 0.5, 0.5), info={})
    with pytest.raises(ValueError, match="mixes single-plane and stack targets"):
        load_fields(tmp_path / "d", ["dna", "membrane"])
    write_stack(tmp_path / "d" / "field000" / "membrane.ome.tif", np.zeros((2, 32, 32), np.float32),
                voxel_size_um=(1.0, 0.5, 0.5), info={})
    with pytest.raises(ValueError, match="single plane of the same y, x"):
        load_fields(tmp_path / "d", ["dna", "membrane"])


# ------------------------------------------------------------------ training


def test_2_5d_training_on_single_plane_truth_beats_an_untrained_network() -> None:
    pairs = [defocus_field(s) for s in range(4)]
    cfg = UNetConfig(structures=("dna",), depth=2, base_channels=4, mode="2.5d", z_window=5)
    torch.manual_seed(0)
    before = evaluate(UNet3D(cfg), pairs[3:], PercentileNorm())[0]
    result = train(pairs[:3], pairs[3:], cfg, TrainSettings(steps=60, patch=(5, 48, 48), batch=4, lr=3e-3),
                   val_every=30)
    after = result.history[-1]["val_pearson"]["dna"]
    assert [h["step"] for h in result.history] == [30, 60]
    assert after > before + 0.3 and after > 0.7, (before, after)  # measured: 0.04 -> 0.93


def test_2_5d_max_projection_and_per_plane_targets() -> None:
    rng = np.random.default_rng(0)
    bf = rng.normal(1000, 10, (6, 32, 32)).astype(np.float32)
    stack_truth = rng.gamma(2.0, 1.0, (1, 6, 32, 32)).astype(np.float32)
    cfg_max = UNetConfig(structures=("dna",), depth=1, base_channels=4, mode="2.5d", z_window=3, target_2d="max")
    cfg_plane = UNetConfig(structures=("dna",), depth=1, base_channels=4, mode="2.5d", z_window=3)
    from livestain.inference.train import prepare_targets

    np.testing.assert_allclose(prepare_targets(stack_truth, cfg_max, bf.shape), zscore(stack_truth[0].max(0))[None])
    assert prepare_targets(stack_truth, cfg_plane, bf.shape).shape == (1, 6, 32, 32)
    with pytest.raises(ValueError, match="2.5D model"):
        prepare_targets(stack_truth[:, 0], UNetConfig(structures=("dna",)), bf.shape)
    with pytest.raises(ValueError, match="do not fit"):
        prepare_targets(stack_truth[:, :5], cfg_plane, bf.shape)
    # per-plane targets: patches pair each window with its centre plane
    x = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 32, 32)).copy()
    y = np.broadcast_to(np.arange(6, dtype=np.float32)[None, :, None, None], (1, 6, 32, 32)).copy()
    s = TrainSettings(patch=(3, 16, 16), foreground_fraction=0.0)
    rng2 = np.random.default_rng(3)
    for _ in range(20):
        xp, yp = _sample(rng2, [(x, y)], [np.zeros((0, 3), int)], s, cfg_plane)
        assert xp.shape == (3, 16, 16) and yp.shape == (1, 16, 16)
        c = int(yp[0, 0, 0])
        assert xp[:, 0, 0].tolist() == window_indices(6, 3, c).astype(float).tolist()


def test_augmentations_change_the_input_only_and_as_specified() -> None:
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.normal(size=(8, 40, 40)), 2).astype(np.float32)
    y = np.stack([np.abs(x) * 3, x * 2])  # (2, z, y, x) targets
    data, fg = [(x, y)], [np.argwhere(y.max(0) > np.median(y.max(0)) + 0.5)]
    cfg = UNetConfig(structures=("a", "b"))
    plain = TrainSettings(patch=(4, 16, 16))

    def draw(settings, seed=7):
        return _sample(np.random.default_rng(seed), data, fg, settings, cfg)

    x0, y0 = draw(plain)
    for kw in ({"intensity": 0.3}, {"gamma": 0.5}, {"noise": 0.2}):
        xa, ya = draw(TrainSettings(patch=(4, 16, 16), **kw))
        np.testing.assert_array_equal(ya, y0)  # targets untouched, same patch and rotation
        assert xa.dtype == np.float32 and not np.allclose(xa, x0)
        if "intensity" in kw:  # affine in the input
            a, b = np.polyfit(x0.ravel(), xa.ravel(), 1)
            assert 0.7 <= a <= 1.3 and abs(b) <= 0.3 and pearson(xa, x0) > 0.9999
        elif "gamma" in kw:  # monotone, same extremes
            order = np.argsort(x0.ravel())
            assert np.all(np.diff(xa.ravel()[order]) >= -1e-6)
            assert xa.min() == pytest.approx(x0.min(), abs=1e-5) and xa.max() == pytest.approx(x0.max(), abs=1e-5)
        else:
            assert 0 < float((xa - x0).std()) < 0.2 * 1.5
    # z shift: planes that encode their own index show the input/target offset
    zx = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None], (12, 24, 24)).copy()
    zy = zx[None].copy()
    shifts = set()
    gen = np.random.default_rng(1)
    for _ in range(40):
        xp, yp = _sample(gen, [(zx, zy)], [np.zeros((0, 3), int)],
                         TrainSettings(patch=(4, 16, 16), z_shift=2, foreground_fraction=0.0), UNetConfig(structures=("a",)))
        d = float(xp[0, 0, 0, 0] - yp[0, 0, 0, 0])
        assert np.all(xp[0] - yp[0] == d)  # the whole patch shifted by whole planes
        shifts.add(d)
    assert shifts <= {-2.0, -1.0, 0.0, 1.0, 2.0} and len(shifts) >= 4


def test_precision_resolution_and_bf16_training_learns() -> None:
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("int8", "cpu")
    pairs = [defocus_field(s) for s in range(3)]
    cfg = UNetConfig(structures=("dna",), depth=2, base_channels=4, mode="2.5d", z_window=5)
    runs = {
        p: train(pairs[:2], pairs[2:], cfg,
                 TrainSettings(steps=40, patch=(5, 48, 48), batch=4, lr=3e-3, precision=p), val_every=40)
        for p in ("fp32", "bf16")
    }
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16.precision == "bf16" and all(np.isfinite(bf16.losses))
    assert all(p.dtype == torch.float32 for p in bf16.net.parameters())  # autocast: fp32 master weights
    assert bf16.losses != fp32.losses  # bf16 really computed something else...
    assert np.allclose(bf16.losses[:3], fp32.losses[:3], rtol=0.05)  # ...to bf16's precision
    r16, r32 = (r.history[-1]["val_pearson"]["dna"] for r in (bf16, fp32))
    assert r16 > 0.7 and abs(r16 - r32) < 0.1, (r16, r32)  # measured 0.89 vs 0.91


def test_resumed_training_reaches_the_same_weights_bit_for_bit(tmp_path) -> None:
    pairs = [defocus_field(s, size=48) for s in range(3)]
    cfg = UNetConfig(structures=("dna",), depth=1, base_channels=4, mode="2.5d", z_window=3)
    s = TrainSettings(steps=8, patch=(3, 32, 32), batch=2, noise=0.05, gamma=0.2, z_shift=1)
    straight = train(pairs[:2], pairs[2:], cfg, s, val_every=4, state_path=tmp_path / "a.safetensors", save_every=3)

    class Stop(Exception):
        pass

    def crash(step: int, loss: float) -> None:
        if step == 5:
            raise Stop  # a crash in step 5: the last save is step 3's

    with pytest.raises(Stop):
        train(pairs[:2], pairs[2:], cfg, s, on_step=crash, val_every=4,
              state_path=tmp_path / "b.safetensors", save_every=3)
    state, tensors = load_training_state(tmp_path / "b.safetensors")
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert "optimizer/0/exp_avg" in tensors and "model/head.weight" in tensors and "rng/torch" in tensors
    assert state["optimizer"]["param_groups"][0]["lr"] < s.lr  # cosine schedule state, as JSON
    resumed = train(pairs[:2], pairs[2:], cfg, s, val_every=4, state_path=tmp_path / "b.safetensors",
                    save_every=3, resume=True)
    assert resumed.resumed_from == 3
    for (k, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k
    assert resumed.losses == straight.losses and resumed.history == straight.history
    # the state file is plain safetensors + JSON: no pickle anywhere
    raw = (tmp_path / "b.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    json.loads(raw[8 : 8 + header_len])
    with pytest.raises(ValueError, match="other settings"):
        train(pairs[:2], pairs[2:], cfg, TrainSettings(steps=9, patch=(3, 32, 32), batch=2),
              state_path=tmp_path / "b.safetensors", resume=True)
    with pytest.raises(ValueError, match="other data"):
        train([pairs[1], pairs[0]], pairs[2:], cfg, s, state_path=tmp_path / "b.safetensors", resume=True)
    with pytest.raises(ValueError, match="no training state"):
        train(pairs[:2], [], cfg, s, state_path=tmp_path / "none.safetensors", resume=True)


# ------------------------------------------------------------------ commands


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livestain")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    return parser


def _run(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        a = _parser().parse_args(argv)
        code = a.func(a)
    return code, buf.getvalue()


def write_planar_dataset(out: Path, size: int = 48, fields: int = 3) -> Path:
    """A dataset folder of `defocus_field` s (5-plane stacks, single-plane DNA truth)."""

    class P:
        structures = ("dna",)
        voxel_size_um = (1.0, 0.5, 0.5)

    pairs = []
    for seed in range(fields):
        p = P()
        p.brightfield, p.targets = defocus_field(seed, size=size)
        pairs.append(p)
    write_pairs(pairs, out)
    return out


@pytest.fixture(scope="module")
def planar_dataset(tmp_path_factory) -> Path:
    return write_planar_dataset(tmp_path_factory.mktemp("planar") / "data")


def test_train_options_parse_with_their_defaults() -> None:
    a = _parser().parse_args(["train", "D", "--structures", "dna", "--out", "m"])
    assert (a.mode, a.z_window, a.target_2d, a.precision, a.resume) == ("3d", None, "plane", "auto", False)
    assert (a.intensity, a.gamma, a.noise, a.z_shift, a.val_every, a.save_every) == (0.1, 0.2, 0.03, 0, None, 100)
    a = _parser().parse_args(["train", "D", "--structures", "dna", "--out", "m", "--mode", "2.5d", "--z-window",
                              "3", "--val-every", "5", "--resume", "--precision", "bf16"])
    assert (a.mode, a.z_window, a.val_every, a.resume, a.precision) == ("2.5d", 3, 5, True, "bf16")
    a = _parser().parse_args(["export", "m.safetensors", "--format", "onnx", "--out", "m.onnx"])
    assert a.func is commands.cmd_export and a.format == "onnx"
    a = _parser().parse_args(["predict", "m", "in.tif", "--out", "o.tif", "--slide", "--z-centre", "2"])
    assert a.slide and a.z_centre == 2


def test_train_predict_evaluate_commands_in_2_5d_with_resume(planar_dataset, tmp_path) -> None:
    model = tmp_path / "m"
    argv = ["train", str(planar_dataset), "--structures", "dna", "--out", str(model), "--mode", "2.5d",
            "--z-window", "5", "--steps", "6", "--batch", "2", "--patch", "1,32,32", "--depth", "1",
            "--base-channels", "4", "--val-fraction", "0.34", "--save-every", "3", "--val-every", "3",
            "--precision", "fp32"]
    code, out = _run(argv)
    assert code == 0 and "2.5d U-Net" in out and "5-plane window, 32x32" in out
    loaded = load_checkpoint(model.with_suffix(".safetensors"))
    assert (loaded.meta.config.mode, loaded.meta.config.z_window) == ("2.5d", 5)
    assert [h["step"] for h in loaded.meta.extra["history"]] == [3, 6]
    assert loaded.meta.extra["settings"]["intensity"] == 0.1 and loaded.meta.extra["settings"]["precision"] == "fp32"
    state = commands.training_state_path(model)
    assert state.name == "m.state.safetensors" and load_training_state(state)[0]["step"] == 6
    first = loaded.net.state_dict()
    code, out = _run([*argv, "--resume"])  # already finished: nothing left to train, same weights
    assert code == 0 and "resumed from step 6 of 6" in out
    again = load_checkpoint(model.with_suffix(".safetensors")).net.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(ValueError, match="other settings"):
        _run([*argv[:-2], "--precision", "bf16", "--resume"])
    with pytest.raises(ValueError, match="single planes.*--mode 2.5d"):
        _run(["train", str(planar_dataset), "--structures", "dna", "--out", str(tmp_path / "x"), "--steps", "1"])
    # predict: one plane by default, every plane with --slide
    src = planar_dataset / "field002" / "brightfield.ome.tif"
    from livestain.stackio import read_stack

    def read_czyx(path: Path) -> tuple[np.ndarray, dict]:
        """read_stack squeezes size-1 axes; the OME pixels say what C and Z are."""
        import tifffile

        array, info = read_stack(path)
        with tifffile.TiffFile(path) as tif:
            px = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        return array.reshape(px["SizeC"], px["SizeZ"], px["SizeY"], px["SizeX"]), info

    code, _ = _run(["predict", str(model.with_suffix(".safetensors")), str(src), "--out", str(tmp_path / "p.ome.tif")])
    pred, info = read_czyx(tmp_path / "p.ome.tif")
    assert code == 0 and pred.shape == (1, 1, 48, 48) and info["mode"] == "2.5d" and not info["slide"]
    _run(["predict", str(model.with_suffix(".safetensors")), str(src), "--out", str(tmp_path / "s.ome.tif"), "--slide"])
    slid, _ = read_czyx(tmp_path / "s.ome.tif")
    assert slid.shape == (1, 5, 48, 48)
    np.testing.assert_allclose(slid[:, 2], pred[:, 0], atol=1e-5)  # the middle window is the default one
    # evaluate: single-plane truth against the centre-window prediction
    code, out = _run(["evaluate", str(model.with_suffix(".safetensors")), str(planar_dataset), "--json"])
    report = json.loads(out)
    direct = evaluate_model(str(model.with_suffix(".safetensors")), load_fields(planar_dataset))
    assert report["mean"]["dna"] == pytest.approx(direct["mean"]["dna"])
    stack, _ = read_stack(src)
    truth = load_fields(planar_dataset)[2].targets[0]
    assert direct["fields"]["field002"]["dna"]["pearson"] == pytest.approx(pearson(pred[0, 0], zscore(truth)))


def test_evaluate_refuses_single_plane_truth_for_3d_models(planar_dataset, tmp_path) -> None:
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(structures=("dna",), depth=1, base_channels=2)).eval()
    model = load_checkpoint(save_checkpoint(tmp_path / "m3", net, ModelMeta(net.config)))
    with pytest.raises(ValueError, match="single-plane truth.*3D model"):
        evaluate_model(model, load_fields(planar_dataset))


# ------------------------------------------------------------------ export


def _need(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not installed (pip install onnx onnxruntime bioimageio.spec)")


def _model_3d(tmp_path: Path):
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(structures=("dna", "membrane"), depth=2, base_channels=4))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, 8, 32, 32) * 2 + 0.5)
    net.eval()
    return load_checkpoint(save_checkpoint(tmp_path / "m3d", net, ModelMeta(net.config, voxel_size_um=(1, 0.3, 0.3))))


def test_onnx_export_matches_torch_on_several_shapes(tmp_path) -> None:
    _need("onnx", "onnxruntime")
    import onnxruntime as ort

    from livestain.inference.export import check_onnx, export_onnx

    model = _model_3d(tmp_path)
    path = export_onnx(model, tmp_path / "m.onnx")
    check = check_onnx(model, path)
    assert len(check.shapes) == 2 and "1x1x16x64x64" in check.shapes  # the export shape and an odd one
    assert check.output_std > 0.1 and check.max_abs_diff < 1e-4, check  # measured ~5e-6
    # a third shape, a raw uint16-range stack, compared with what livestain's Predictor writes
    stack = np.random.default_rng(5).normal(3000, 100, (9, 37, 50)).astype(np.float32)
    got = ort.InferenceSession(str(path)).run(None, {"brightfield": stack[None, None]})[0][0]
    want = Predictor(model, "cpu").predict(stack)
    assert got.shape == want.shape == (2, 9, 37, 50)
    assert np.abs(got - want).max() < 1e-4
    # the graph really normalises: a 10x brighter stack (same contrast) predicts the same
    brighter = ort.InferenceSession(str(path)).run(None, {"brightfield": 10 * stack[None, None]})[0][0]
    assert np.abs(brighter - got).max() < 1e-3


def test_onnx_export_of_a_2_5d_model(tmp_path) -> None:
    _need("onnx", "onnxruntime")
    import onnxruntime as ort

    from livestain.inference.export import check_onnx, export_onnx

    net = net_2_5d(z_window=3)
    model = load_checkpoint(save_checkpoint(tmp_path / "m25", net, ModelMeta(net.config)))
    path = export_onnx(model, tmp_path / "m25.onnx")
    check = check_onnx(model, path)
    assert check.output_std > 0.01 and check.max_abs_diff < 1e-3 * check.output_std, check  # measured 6e-8
    window = np.random.default_rng(2).normal(500, 30, (3, 45, 31)).astype(np.float32)
    got = ort.InferenceSession(str(path)).run(None, {"brightfield": window[None]})[0]
    assert got.shape == (1, 2, 45, 31)
    # a 3-plane stack: the Predictor's centre window is the whole stack, normalised alike
    np.testing.assert_allclose(got[0], Predictor(model, "cpu").predict(window)[:, 0], atol=1e-4)


def test_export_without_onnx_says_what_to_install(tmp_path, monkeypatch) -> None:
    from livestain.inference import export

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(export.ExportError, match="pip install onnx onnxruntime"):
        export.export_onnx(_model_3d(tmp_path), tmp_path / "x.onnx")


def test_bioimageio_package_is_complete_and_validates(tmp_path) -> None:
    _need("onnx", "onnxruntime", "bioimageio.spec")
    import yaml

    from livestain.inference.export import build_bioimageio, validate_bioimageio

    model = _model_3d(tmp_path)
    report = build_bioimageio(model, tmp_path / "pkg.zip", authors=["Test Author"])
    folder = Path(report["folder"])
    names = {p.name for p in folder.iterdir()}
    assert {"rdf.yaml", "weights.onnx", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5")
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["dna", "membrane"]
    assert [a["id"] for a in rdf["inputs"][0]["axes"][2:]] == ["z", "y", "x"]
    assert rdf["inputs"][0]["axes"][3]["scale"] == pytest.approx(0.3)
    x, y = np.load(folder / "test_input.npy"), np.load(folder / "test_output.npy")
    assert x.shape == (1, 1, 16, 64, 64) and y.shape == (1, 2, 16, 64, 64)
    import zipfile

    assert "rdf.yaml" in zipfile.ZipFile(report["zip"]).namelist()
    assert report["onnx"]["max_abs_diff"] < 1e-4
    v = report["validation"]
    assert v["status"] in ("passed", "valid-format"), v  # passed: bioimageio.core ran the model too
    assert not v["errors"]
    assert validate_bioimageio(folder / "rdf.yaml", run_model=False)["status"] == "valid-format"  # spec only
    np.save(folder / "test_output.npy", y + 1)  # a package whose test output does not match its hash
    bad = validate_bioimageio(folder / "rdf.yaml", run_model=False)
    assert bad["status"] == "failed" and any("sha256" in e.lower() for e in bad["errors"]), bad


def test_export_command_reports_the_onnx_difference(tmp_path) -> None:
    _need("onnx", "onnxruntime")
    model = _model_3d(tmp_path)
    code, out = _run(["export", str(model.path), "--format", "onnx", "--out", str(tmp_path / "c.onnx"), "--json"])
    report = json.loads(out)
    assert code == 0 and report["check"]["max_abs_diff"] < 1e-4 and (tmp_path / "c.onnx").stat().st_size > 10_000
    with pytest.raises(ValueError, match="should end in .onnx"):
        _run(["export", str(model.path), "--format", "onnx", "--out", str(tmp_path / "c.bin")])


def test_new_inference_modules_import_neither_pymmcore_nor_devices() -> None:
    code = (
        "import sys\n"
        "import livestain.inference.export, livestain.inference.train\n"
        "bad = [m for m in sys.modules if m.startswith(('pymmcore', 'livestain.devices', 'matplotlib', 'onnx'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ real data


def _real_experiments():
    """bench/real_experiments.py: benchmark code, not shipped in the package."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import real_experiments

    return real_experiments


def test_real_sephace_pipeline_runs_on_crops(shared_data, tmp_path) -> None:
    ex = _real_experiments()

    if not ex.sephace_available(shared_data / "sephace_bf_dapi"):
        pytest.skip("sephace_bf_dapi is not in ../shared/data")
    (set1, set2) = ex.load_sephace(shared_data / "sephace_bf_dapi")
    assert set1.brightfield.shape == (6, 1024, 1344) and set1.targets.shape == (1, 1024, 1344)
    exp, trn, tst = ex.sephace_experiment(steps=3, crop=128, depth=1, base_channels=4, patch=32, batch=2,
                                          precision="fp32")
    assert exp.config.z_window == 6 and exp.binning == 2
    r = ex.run_experiment(exp, trn, tst, tmp_path, log=lambda s: None)
    model = load_checkpoint(r["model"])
    assert model.meta.voxel_size_um[1] == pytest.approx(2 * ex.SEPHACE_PIXEL_UM)  # trained on binned data
    assert np.isfinite(r["mean"]["dna"]["pearson"]) and -1 <= r["mean"]["dna"]["pearson"] <= 1
    assert len(r["baseline_best_plane"]["per_plane_r"]) == 6
    fig = ex.save_real_figure(tmp_path / "f.png", r["model"], tst, "test", bf_plane=0, zoom=64)
    assert fig.stat().st_size > 5000


def test_real_ndev_pipeline_runs_on_crops(tmp_path) -> None:
    ex = _real_experiments()

    if ex.ndev_path() is None:
        pytest.skip("ndev-sampledata is not installed (pip install --no-deps ndev-sampledata)")
    fields = ex.load_ndev()
    assert len(fields) == 10 and fields[0].brightfield.shape == (1, 210, 576)
    bf, hoechst = fields[0].brightfield, fields[0].targets[0]
    assert bf.mean() > 5 * hoechst.mean()  # channel 1 (oblique light, ~8000) in, channel 0 (Hoechst) out
    assert 0.002 < (hoechst > 1500).mean() < 0.05  # sparse bright nuclei on a dark background
    exp, trn, tst = ex.ndev_experiment(steps=3, crop=64, depth=1, base_channels=4, patch=32, batch=2,
                                       precision="fp32")
    assert exp.train_names == [f"t{i}" for i in range(7)] and exp.test_names == ["t7", "t8", "t9"]
    r = ex.run_experiment(exp, trn, tst, tmp_path, log=lambda s: None)
    assert set(r["test"]) == {"t7", "t8", "t9"} and np.isfinite(r["mean"]["dna"]["pearson"])


def test_non_square_patches_keep_their_shape_and_stay_paired() -> None:
    """A thin field gives a patch taller than wide: rotations are then half turns only
    (a quarter turn would swap its sides and a batch would not stack), still paired."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 26, 32)).astype(np.float32)
    y = (x[1] * 2.0)[None]  # planar truth: the middle plane, doubled
    cfg = UNetConfig(structures=("dna",), mode="2.5d", z_window=3)
    s = TrainSettings(patch=(3, 26, 32), foreground_fraction=0.0, intensity=0, gamma=0, noise=0)
    gen = np.random.default_rng(1)
    turned = 0
    for _ in range(24):
        xp, yp = _sample(gen, [(x, y)], [np.zeros((0, 2), int)], s, cfg)
        assert xp.shape == (3, 26, 32) and yp.shape == (1, 26, 32)
        np.testing.assert_allclose(yp[0], xp[1] * 2.0)
        turned += not np.array_equal(xp[1], x[1])
    assert turned > 0  # flips and half turns still augment


def test_a_model_trained_on_real_defocus_series_is_not_told_its_own_kind_is_out_of_focus(shared_data, tmp_path) -> None:
    """Real sephace: 6 brightfield planes 10-25 um apart show no contrast minimum at
    focus, so before the checkpoint recorded its training stacks' dip, a user's model of
    that data had every held-out field flagged `out_of_focus` (confidence 0.17-0.19 at
    DNA r 0.81). Trained through ``livestain train``, the record now says the model
    expects no dip, and ``livestain predict`` on the other field raises no such flag."""
    from _helpers import run_cli_in_process

    from livestain.inference import ood
    from livestain.inference.dataset import write_pairs
    from livestain.stackio import read_stack, write_stack

    ex = _real_experiments()
    if not ex.sephace_available(shared_data / "sephace_bf_dapi"):
        pytest.skip("sephace_bf_dapi is not in ../shared/data")
    set1, set2 = ex.load_sephace(shared_data / "sephace_bf_dapi")
    write_pairs([set1.crop(0, 0, 512, 672).binned(2)], tmp_path / "data")  # a quadrant, as bench/transfer
    run_cli_in_process(["train", str(tmp_path / "data"), "--structures", "dna", "--out", str(tmp_path / "m"),
                        "--mode", "2.5d", "--z-window", "6", "--steps", "4", "--depth", "1", "--base-channels", "4",
                        "--precision", "fp32"])
    model = load_checkpoint(tmp_path / "m.safetensors")
    assert model.meta.extra["train_focus_dip"] >= ood.CLEAR_DIP_RATIO
    test = set2.crop(384, 384, 256, 256)
    src, out = tmp_path / "set2.ome.tif", tmp_path / "pred.ome.tif"
    write_stack(src, test.brightfield, voxel_size_um=test.voxel_size_um, info={"kind": "stack"})
    text = run_cli_in_process(["predict", str(tmp_path / "m.safetensors"), str(src), "--out", str(out),
                               "--device", "cpu"])
    _, info = read_stack(out)
    assert "out_of_focus" not in info["flags"] and "no minimum inside the stack" not in text
    assert info["checks"]["focus_dip"] >= ood.FOCUS_DIP_RATIO  # the stack has none, as the model expects
    # the same stack against a model that did not record its stacks' dip: flagged, as before
    assert "out_of_focus" in ood.check_stack(test.brightfield, test.voxel_size_um, model.meta.voxel_size_um).codes

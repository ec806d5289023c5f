"""`unlike_training`: a user's 2.5D model says when a stack is unlike its training fields
(inference/signature.py), in `livestain predict` and from the worker to the run's status."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from calibration import render_field  # noqa: E402

from _helpers import QuickPredictor  # noqa: E402

from livestain.inference import ood, signature  # noqa: E402
from livestain.inference.checkpoint import LoadedModel, ModelMeta  # noqa: E402
from livestain.inference.model import UNet3D, UNetConfig  # noqa: E402
from livestain.inference.normalize import PercentileNorm  # noqa: E402

VOXEL = (1.0, 0.325, 0.325)
CONFIG = UNetConfig(structures=("dna",), depth=1, base_channels=8, mode="2.5d", z_window=3)


def _net() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(CONFIG).eval()


def _window(stack: np.ndarray, voxel=None) -> np.ndarray:  # noqa: ANN001
    return signature.model_window(stack, CONFIG, PercentileNorm(), VOXEL, voxel)


def _model(net: UNet3D, sig: dict | None) -> LoadedModel:
    extra = {signature.KEY: sig} if sig else {}
    return LoadedModel(net, ModelMeta(CONFIG, PercentileNorm(), VOXEL, extra), Path("m.safetensors"), "test")


@pytest.fixture(scope="module")
def fitted() -> tuple[UNet3D, dict]:
    """A network's signature from 3 simulated brightfield fields centred on the cells."""
    net = _net()
    windows = [_window(render_field(seed, 128)["brightfield"]) for seed in (101, 102, 103)]
    return net, signature.fit_signature(net, windows)


def test_the_window_is_the_models_planes_at_its_voxel_size() -> None:
    stack = np.arange(7 * 64 * 96, dtype=np.float32).reshape(7, 64, 96)
    w = _window(stack)
    assert w.shape == (3, 64, 96)
    assert np.allclose(w, PercentileNorm()(stack)[2:5])  # the middle 3 planes, normalised like training
    assert _window(stack, (1.0, 0.65, 0.65)).shape == (3, 128, 192)  # coarser pixels: upsampled, as predicted
    assert _window(stack[:1]).shape == (3, 64, 96)  # one plane fills the window (repeated)
    big = np.zeros((3, 1500, 1100), np.float32)  # a camera-sized window: its centre 1024 x 1024 only
    assert len(signature.tile_statistics(_net().enc[0], big)) == (1024 // 32) * (1024 // 32)


def test_fields_like_the_training_ones_pass_and_unlike_ones_are_flagged(fitted) -> None:
    net, sig = fitted
    assert sig["tiles"] == 3 * 16 and len(sig["mean"]) == len(sig["spread"]) == 2 * CONFIG.base_channels
    block = net.enc[0]
    # new fields of the kind: below the limit, which the held-out training fields set
    assert sig["limit"] == pytest.approx(max(signature.RATIO_LIMIT, *sig["held_out_ratios"]), abs=1e-3)
    assert len(sig["held_out_ratios"]) == 3
    home = [signature.distance_ratio(block, _window(render_field(s, 128)["brightfield"]), sig)
            for s in (201, 202, 203, 204)]
    assert max(home) < sig["limit"], (home, sig["limit"])
    rng = np.random.default_rng(0)
    speckle = rng.normal(1000.0, 300.0, (16, 128, 128))  # no cells, only pixel noise
    stripes = 1000.0 + 400.0 * np.sin(np.arange(128) / 2.0)[None, None, :] * np.ones((16, 128, 1))
    for unlike in (speckle, stripes):
        assert signature.distance_ratio(block, _window(unlike), sig) > sig["limit"]


def test_one_training_field_is_split_to_set_its_own_limit() -> None:
    net = _net()
    sig = signature.fit_signature(net, [_window(render_field(101, 128)["brightfield"])])
    assert len(sig["held_out_ratios"]) == 2 and sig["limit"] >= signature.RATIO_LIMIT


def test_check_likeness_adds_the_flag_with_its_fix_and_defers_to_content_flags(fitted) -> None:
    net, sig = fitted
    likeness = signature.Likeness.of(_model(net, sig))
    assert likeness is not None and likeness.block is not net.enc[0]  # a copy: never shared across threads
    assert signature.Likeness.of(_model(net, None)) is None  # no record: no check
    home = render_field(201, 128)["brightfield"]
    report = ood.check_stack(home, VOXEL)
    signature.check_likeness(report, likeness, home, VOXEL)
    assert report.codes == [] and report.stats["unlike_training_ratio"] < sig["limit"]
    noise = np.random.default_rng(1).normal(1000.0, 300.0, (16, 128, 128)).astype(np.float32)
    report = ood.check_stack(noise, VOXEL)
    report.flags.clear()  # whatever the content checks say, the likeness check speaks for itself
    signature.check_likeness(report, likeness, noise, VOXEL)
    assert report.codes == ["unlike_training"]
    assert report.factor == pytest.approx(ood.FLAG_FACTORS["unlike_training"])
    assert "livestain train --init MODEL" in report.flags[0].reason
    blank = np.full((16, 64, 64), 100, np.uint16)
    report = ood.check_stack(blank, VOXEL)
    signature.check_likeness(report, likeness, blank, VOXEL)
    assert report.codes == ["blank"] and "unlike_training_ratio" not in report.stats


class UnlikeModel(QuickPredictor):
    """Stands in for a user's 2.5D model whose signature came from speckle noise: the
    simulated scope's stacks are unlike its training fields."""

    def __init__(self) -> None:
        net = _net()
        rng = np.random.default_rng(2)
        windows = [_window(rng.normal(1000.0, 300.0, (3, 128, 128))) for _ in range(3)]
        self.model = _model(net, signature.fit_signature(net, windows))


def test_the_worker_flags_stacks_unlike_the_models_training_fields(tmp_path, base_port) -> None:
    from test_trust import _run

    from livestain.run_reader import RunReader

    daemon, status = _run(tmp_path, base_port, stage_z=4.0, predictor=UnlikeModel())
    assert daemon.summary.predicted == 2
    last = status["last_confidence"]
    assert last["flags"] == ["unlike_training"] and last["confidence"] < 0.5
    assert any("unlike the fields the model learnt from" in r for r in last["reasons"])
    _, info = RunReader(tmp_path / "run").prediction(0)
    assert "unlike_training" in info["flags"]


def test_train_records_the_signature_and_predict_flags_a_stack_unlike_it(tmp_path) -> None:
    """Through the commands: ``livestain train`` (2.5D) writes the signature with its
    limit; ``livestain predict`` flags speckle noise, with the fix, and not a new field
    of the training kind."""
    from _helpers import run_cli_in_process

    from livestain.inference.checkpoint import load_checkpoint
    from livestain.inference.dataset import write_pairs
    from livestain.stackio import read_stack, write_stack

    class Pair:
        def __init__(self, seed: int) -> None:
            f = render_field(seed, 96, fluorescence=False)
            self.brightfield, self.targets, self.structures = f["brightfield"], f["truth"][:1], ("dna",)
            self.voxel_size_um = f["voxel"]

    write_pairs([Pair(s) for s in (101, 102, 103)], tmp_path / "data")
    text = run_cli_in_process(["train", str(tmp_path / "data"), "--structures", "dna", "--out", str(tmp_path / "m"),
                               "--mode", "2.5d", "--z-window", "3", "--steps", "3", "--depth", "1",
                               "--base-channels", "4", "--precision", "fp32"])
    assert "input signature recorded" in text
    sig = load_checkpoint(tmp_path / "m.safetensors").meta.extra[signature.KEY]
    assert sig["limit"] >= signature.RATIO_LIMIT and sig["tiles"] > 0
    noise = np.random.default_rng(3).normal(1000.0, 300.0, (16, 96, 96)).astype(np.uint16)
    for name, stack, flagged in (("noise", noise, True), ("home", render_field(201, 96)["brightfield"], False)):
        src, out = tmp_path / f"{name}.ome.tif", tmp_path / f"{name}-pred.ome.tif"
        write_stack(src, stack, voxel_size_um=VOXEL, info={"kind": "stack"})
        text = run_cli_in_process(["predict", str(tmp_path / "m.safetensors"), str(src), "--out", str(out),
                                   "--device", "cpu"])
        _, info = read_stack(out)
        assert ("unlike_training" in info["flags"]) is flagged, (name, info["checks"])
        assert ("looks unlike the fields the model learnt from" in text) is flagged
        assert info["checks"]["unlike_training_ratio"] > 0

"""The U-Net, its checkpoints and the predictor, including the bundled model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestain.inference.checkpoint import (
    CheckpointError,
    ModelMeta,
    bundled_model_path,
    load_checkpoint,
    save_checkpoint,
)
from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.normalize import PercentileNorm
from livestain.inference.predict import Predictor
from livestain.inference.train import TrainSettings, evaluate, pearson, train


@pytest.mark.parametrize("shape", [(16, 64, 64), (7, 33, 50), (1, 9, 17), (3, 3, 3)])
def test_any_input_shape_comes_back_the_same_shape(shape) -> None:
    net = UNet3D(UNetConfig(depth=2, base_channels=4)).eval()
    with torch.inference_mode():
        out = net(torch.randn(1, 1, *shape))
    assert out.shape == (1, 3, *shape)


def test_checkpoint_round_trip_is_bit_exact(tmp_path) -> None:
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(structures=("dna", "membrane"), depth=2, base_channels=4))
    net.train()
    net(torch.randn(2, 1, 8, 16, 16))  # move BatchNorm running stats off their defaults
    net.eval()
    meta = ModelMeta(net.config, PercentileNorm(1.0, 99.0), (0.5, 0.2, 0.2), {"note": "x"})
    path = save_checkpoint(tmp_path / "m.safetensors", net, meta)
    loaded = load_checkpoint(path)
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.meta.config == net.config
    assert loaded.meta.norm == PercentileNorm(1.0, 99.0)
    assert loaded.meta.voxel_size_um == (0.5, 0.2, 0.2)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.inference_mode():
        assert torch.equal(net(x), loaded.net(x))


def test_damaged_or_missing_checkpoints_give_a_clear_error(tmp_path) -> None:
    good = save_checkpoint(tmp_path / "good", UNet3D(UNetConfig(depth=1, base_channels=2)),
                           ModelMeta(UNetConfig(depth=1, base_channels=2)))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a usable livestain checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    pickle_file = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(1)}, pickle_file)  # a pickle: must be refused, never loaded
    with pytest.raises(CheckpointError):
        load_checkpoint(pickle_file)


def test_percentile_norm_survives_blank_and_saturated_stacks() -> None:
    norm = PercentileNorm()
    blank = norm(np.full((4, 32, 32), 100, np.uint16))
    assert np.all(np.isfinite(blank)) and np.abs(blank).max() < 1e-3
    rng = np.random.default_rng(0)
    stack = rng.normal(3000, 50, (4, 32, 32))
    hot = stack.copy()
    hot[0, :2, :2] = 65535  # a few saturated pixels barely move the result
    np.testing.assert_allclose(norm(hot)[1:], norm(stack)[1:], atol=0.05)


def test_short_training_beats_an_untrained_network() -> None:
    from livestain.devices.pairs import simulate_pairs

    def around_a_nucleus(p):  # a 96x96 crop centred on DNA, so every crop has cells
        cy, cx = np.unravel_index(np.argmax(p.targets[0].max(axis=0)), p.targets.shape[-2:])
        y0, x0 = (int(np.clip(c - 48, 0, n - 96)) for c, n in ((cy, 256), (cx, 256)))
        return p.brightfield[:, y0:y0 + 96, x0:x0 + 96], p.targets[:1, :, y0:y0 + 96, x0:x0 + 96]

    pairs = [around_a_nucleus(p) for p in simulate_pairs([(0, 0), (0, 1), (1, 0)], seed=4)]
    cfg = UNetConfig(structures=("dna",), depth=2, base_channels=4)
    torch.manual_seed(0)
    before = evaluate(UNet3D(cfg), pairs[2:], PercentileNorm())[0]
    result = train(pairs[:2], pairs[2:], cfg, TrainSettings(steps=60, patch=(16, 48, 48), batch=2),
                   val_every=60)
    after = result.history[-1]["val_pearson"]["dna"]
    assert after > before + 0.3 and after > 0.5


def test_bundled_model_predicts_unseen_simulated_cells() -> None:
    from livestain.devices.pairs import simulate_pairs

    model = load_checkpoint(bundled_model_path())
    assert bundled_model_path().stat().st_size < 10e6
    predictor = Predictor(model, "cpu")
    (pair,) = simulate_pairs([(77, 3)], seed=555)  # tile and seed never used in training
    pred = predictor.predict(pair.brightfield, pair.voxel_size_um)
    assert pred.shape == (3, *pair.brightfield.shape)
    r = {s: pearson(pred[i], pair.targets[i]) for i, s in enumerate(predictor.structures)}
    assert r["dna"] > 0.8 and r["membrane"] > 0.8 and r["mitochondria"] > 0.3, r


def test_predictor_resamples_other_voxel_sizes_back_to_the_input_grid() -> None:
    predictor = Predictor(load_checkpoint(bundled_model_path()), "cpu")
    stack = np.random.default_rng(0).integers(2900, 3300, (8, 40, 40)).astype(np.uint16)
    pred = predictor.predict(stack, voxel_size_um=(2.0, 0.65, 0.65))
    assert pred.shape == (3, 8, 40, 40)
    with pytest.raises(ValueError, match="z, y, x"):
        predictor.predict(stack[0])

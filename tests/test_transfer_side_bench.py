"""bench/transfer_side.py: its pieces on known inputs, and its smoke path (``--quick``)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("transfer_side_bench", ROOT / "bench" / "transfer_side.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_base():
    from livestain.inference.model import UNet3D, UNetConfig

    torch.manual_seed(0)
    return UNet3D(UNetConfig(structures=("dna", "membrane"), depth=1, base_channels=4, mode="2.5d", z_window=2))


def test_side_network_reads_the_frozen_features_and_the_control_ignores_them(bench) -> None:
    from livestain.inference.model import UNetConfig

    base = _tiny_base()
    features = bench.BundledFeatures(base)
    assert features.channels == 4 + 2
    cfg = UNetConfig(structures=("dna",), depth=1, base_channels=4, mode="2.5d", z_window=2)
    side_cfg = UNetConfig(structures=("dna",), depth=1, base_channels=4, mode="2.5d", z_window=1,
                          in_channels=2 + features.channels)
    x = torch.randn(1, 2, 16, 16)
    outputs = {}
    for use in (True, False):
        torch.manual_seed(1)
        net = bench.SideTuned(cfg, features, side_cfg, use_features=use).train()
        assert not features.training and not features.net.training  # BatchNorm keeps the bundled statistics
        net.eval()
        before = net(x).detach()
        with torch.no_grad():  # another bundled network: the side-tuned output moves, the control's not
            for p in features.net.parameters():
                p.add_(0.5)
        after = net(x).detach()
        with torch.no_grad():
            for p in features.net.parameters():
                p.sub_(0.5)
        outputs[use] = (before, after)
        assert not any(p.requires_grad for p in features.parameters())
    assert not torch.allclose(*outputs[True], atol=1e-4)
    assert torch.allclose(*outputs[False])
    # same initialisation for both: with zero features they differ only in what the bundled channels add
    assert outputs[True][0].shape == outputs[False][0].shape == (1, 1, 16, 16)


def test_features_are_the_bundled_networks_own_prediction(bench) -> None:
    base = _tiny_base().eval()
    x = torch.randn(1, 2, 12, 20)
    f = bench.BundledFeatures(base)(x)
    assert f.shape == (1, 4 + 2, 12, 20)
    assert torch.allclose(f[:, 4:], base(x), atol=1e-5)


def test_nucleus_diameter_and_zoom(bench) -> None:
    yy, xx = np.mgrid[:200, :200]
    img = np.zeros((200, 200), np.float32)
    for cy, cx in ((40, 40), (40, 140), (140, 60), (150, 150)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 6**2] = 1000.0  # disks 12-13 px across
    assert 11.0 <= bench.nucleus_diameter_px(img) <= 14.5
    assert math.isnan(bench.nucleus_diameter_px(np.zeros((50, 50), np.float32)))
    sys.path.insert(0, str(ROOT / "bench"))
    import real_experiments as ex

    f = ex.RealField("f", img[None], img[None, None].copy(), ("dna",), (1.0, 1.0, 1.0))
    z = bench.zoomed(f, 2.0)
    assert z.brightfield.shape == (1, 400, 400) and z.targets.shape == (1, 1, 400, 400)
    assert z.voxel_size_um == (1.0, 0.5, 0.5)
    assert 22.0 <= bench.nucleus_diameter_px(z.targets[0]) <= 29.0


def test_transfer_side_bench_quick(bench, tmp_path) -> None:
    import real_experiments as ex

    present = {"sephace": ex.sephace_available(), "ndev": ex.ndev_path() is not None}
    if not any(present.values()):
        pytest.skip(f"no real paired data: {ex.SEPHACE_DIR} is absent and ndev-sampledata is not installed")
    out = tmp_path / "side.json"
    results = bench.run(["--quick", "--json", str(out)], log=lambda s: None)
    assert json.loads(out.read_text())["table"] == results["table"]
    assert set(results["datasets"]) == {k for k, v in present.items() if v}
    for ds in results["datasets"].values():
        arms = [r["arm"] for r in ds["rows"]]
        n_train = len(ds["train_fields"])
        for arm in bench.ARMS[:2]:  # side-tuned and its control, at 1, 2 and all fields
            assert [r["n_fields"] for r in ds["rows"] if r["arm"] == arm] == [1, 2, n_train]
        if "zoom" in ds["nucleus_scale"]:
            assert set(bench.ARMS) == set(arms)
        for r in ds["rows"]:
            assert set(r["r_per_crop"]) == set(ds["test_crops"])
            assert all(math.isfinite(v) and -1 <= v <= 1 for v in r["r_per_crop"].values())
            assert len(r["r_mean_per_seed"]) == 2  # the quick plan's two seeds

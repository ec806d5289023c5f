"""bench/transfer.py's smoke path (``--quick``: tiny crops, a tiny network, a few steps)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("transfer_bench", ROOT / "bench" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_transfer_bench_quick(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import real_experiments as ex

    present = {"sephace": ex.sephace_available(), "ndev": ex.ndev_path() is not None}
    if not any(present.values()):
        pytest.skip(f"no real paired data: {ex.SEPHACE_DIR} is absent and ndev-sampledata is not installed")
    bench = _bench()
    out = tmp_path / "transfer.json"
    results = bench.run(["--quick", "--json", str(out)], log=lambda s: None)
    assert json.loads(out.read_text())["table"] == results["table"]
    assert set(results["datasets"]) == {k for k, v in present.items() if v}
    for name, ds in results["datasets"].items():
        n_train = len(ds["train_fields"])
        assert set(ds["train_fields"]).isdisjoint(ds["test_crops"])
        rows = ds["rows"]
        counts = [r["n_fields"] for r in rows if r["arm"] == "scratch (2.5D)"]
        assert counts == [1, 2, n_train]
        assert {r["arm"] for r in rows} == set(bench.ARMS)
        for r in rows:
            values = [r["r_mean"], r["r_worst"], *r["r_per_crop"].values()]
            assert all(math.isfinite(v) and -1 <= v <= 1 for v in values), (name, r)
            assert set(r["r_per_crop"]) == set(ds["test_crops"])
            # the worst crop of any seed: at most the seed-averaged crops' minimum
            assert r["r_worst"] <= min(r["r_per_crop"].values()) + 1e-4 and r["r_worst"] <= r["r_mean"]
            assert r["train_seconds"] is not None and r["train_seconds"] >= 0
            if r["arm"] in bench.TRAINED:  # once per training seed, and the mean is theirs
                assert len(r["r_mean_per_seed"]) == 2
                assert abs(r["r_mean"] - sum(r["r_mean_per_seed"]) / 2) < 1e-3
        # the bundled model's fine-tune is a 2.5D network of the bundled model's depth and width
        flat = [r for r in rows if r["arm"] == "fine-tuned from bundled (flattened)"]
        assert [r["n_fields"] for r in flat] == [1, 2, n_train]
        assert f"| {name} | zero-shot (bundled 3D) | 0 |" in results["table"]

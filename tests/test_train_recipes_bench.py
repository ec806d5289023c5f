"""bench/train_recipes.py's smoke path: every `livestain train` recipe runs through the
command on real data and is scored by `livestain evaluate` (tiny networks, a few steps)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_recipes_quick(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import real_experiments as ex

    only = "ndev" if ex.ndev_path() is not None else "sephace" if ex.sephace_available() else None
    if only is None:
        pytest.skip(f"no real paired data: {ex.SEPHACE_DIR} is absent and ndev-sampledata is not installed")
    import train_recipes

    results = train_recipes.main(["--quick", "--only", only, "--counts", "1", "--seeds", "1",
                                  "--json", str(tmp_path / "r.json")])
    split = train_recipes.T.ndev_split(True) if only == "ndev" else train_recipes.T.sephace_split(True)
    rows = results["rows"]
    assert [r["recipe"] for r in rows] == [name for name, _ in train_recipes.recipes(split)]
    crops = {f.name for f in split.test}
    for r in rows:
        assert r["fields"] == "1" and len(r["per_seed"]) == 1
        assert math.isfinite(r["mean_r"]) and -1 <= r["worst_r"] <= r["mean_r"] <= 1
        assert r["worst_crop"] in crops  # named as the bench's test crops, not write_pairs' folders
    assert (tmp_path / "r.json").exists()

"""bench/likeness.py's smoke path (``--quick``: tiny crops and networks, a few steps)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_likeness_bench_quick(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import real_experiments as ex

    if not (ex.sephace_available() and ex.ndev_path() is not None):
        pytest.skip("needs ../shared/data/sephace_bf_dapi and ndev-sampledata (each is the other's foreign data)")
    spec = importlib.util.spec_from_file_location("likeness_bench", ROOT / "bench" / "likeness.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "likeness.json"
    results = bench.run(["--quick", "--json", str(out)], log=lambda s: None)
    assert json.loads(out.read_text())["table"] == results["table"]
    rows = results["rows"]
    assert [r["kind"] for r in rows] == ["home", "home", "foreign", "foreign", "foreign", "foreign"]
    for r in rows:
        assert r["r_worst"] <= r["r_mean"] and 0 <= r["confidence"][0] <= r["confidence"][1] <= 1
        assert r["likeness_limit"] >= 1.3 and r["likeness_ratio"][0] > 0  # every model is 2.5D: all checked
        # the flag and the ratio agree: flagged exactly when some stack passed the limit
        assert ("unlike_training" in r["flags"]) == (r["likeness_ratio"][1] > r["likeness_limit"])
    for key in ("now", "before"):
        assert set(results["verdicts"][key]) == {"trusted_but_wrong", "flagged_but_right"}

"""bench/trust.py --quick: the confidence beside r, with the checks as they are and as they were."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import trust  # noqa: E402


def test_quick_trust_bench_catches_the_single_plane_only_with_the_new_checks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "trust.json"
    assert trust.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"default", "1 plane", "focus +12 um"}
    assert rows["default"]["flags"] == [] and rows["default"]["dna_worst"] > 0.9
    assert rows["1 plane"]["flags"] == ["thin_stack"] and rows["1 plane"]["dna_worst"] < trust.WRONG
    assert rows["1 plane"]["confidence"] < trust.TRUSTED <= rows["1 plane"]["confidence_before"]
    assert rows["focus +12 um"]["flags"] == ["out_of_focus"]
    summary = result["summary"]
    assert summary["confidence"]["trusted_but_wrong"] == []
    assert summary["confidence_before"]["trusted_but_wrong"] == ["1 plane"]
    assert "| 1 plane |" in capsys.readouterr().out

"""`livestain train` reads what the daemon writes in paired mode, not only simulate's layout."""

from __future__ import annotations

import numpy as np
import pytest

from livestain.inference.dataset import fingerprint, load_fields
from livestain.stackio import write_stack


def _write(path, array):
    write_stack(path, array, voxel_size_um=(1.0, 0.325, 0.325), info={})


def test_a_paired_mode_run_folder_is_a_training_dataset(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for p in range(2):
        for t in range(2):
            stem = tmp_path / f"p{p:03d}" / f"t{t:04d}"
            _write(f"{stem}_brightfield.ome.tif", rng.integers(0, 4000, (4, 8, 8), dtype=np.uint16))
            _write(f"{stem}_dna.ome.tif", np.full((4, 8, 8), 10 * p + t, np.uint16))
            _write(f"{stem}_prediction.ome.tif", np.zeros((1, 4, 8, 8), np.float32))  # not data
    fields = load_fields(tmp_path)
    assert [f.name for f in fields] == ["p000/t0000", "p000/t0001", "p001/t0000", "p001/t0001"]
    assert all(f.structures == ("dna",) for f in fields)
    assert [int(f.targets[0, 0, 0, 0]) for f in fields] == [0, 1, 10, 11]
    assert fields[0].voxel_size_um == pytest.approx((1.0, 0.325, 0.325))
    before = fingerprint(tmp_path)
    _write(tmp_path / "p001" / "t0002_brightfield.ome.tif", np.zeros((4, 8, 8), np.uint16))
    assert fingerprint(tmp_path) != before


def test_noisy_copies_are_not_mistaken_for_structures(tmp_path) -> None:
    d = tmp_path / "field000"
    _write(d / "brightfield.ome.tif", np.zeros((2, 4, 4), np.uint16))
    _write(d / "dna.ome.tif", np.ones((2, 4, 4), np.float32))
    _write(d / "dna_noisy.ome.tif", np.ones((2, 4, 4), np.uint16))
    (field,) = load_fields(tmp_path)
    assert field.structures == ("dna",)

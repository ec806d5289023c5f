"""`livestain train --sim-pretrain`: simulated fields shaped like the user's, trained on
before the user's own."""

from __future__ import annotations

import numpy as np
import pytest

from livestain.cli import build_parser
from livestain.inference.checkpoint import load_checkpoint
from livestain.inference.dataset import write_pairs
from livestain.simpretrain import simulated_like

from _helpers import NoiseField, run_cli_in_process

VOXEL = (2.0, 0.5, 0.5)  # 4 planes 2 um apart: offsets -3, -1, +1, +3 um


def test_simulated_fields_have_the_users_planes_pixels_and_structures() -> None:
    pairs = simulated_like((-4.0, 0.0, 4.0), 0.65, ["DAPI", "membrane"], n_fields=2, size=64)
    assert len(pairs) == 2
    bf, truth = pairs[0]
    assert bf.shape == (3, 64, 64) and truth.shape == (2, 64, 64)
    # 0.65 um is rendered at 0.325 and averaged, not summed: the background stays one exposure's
    assert 2500 < float(np.median(bf)) < 3600
    assert truth[0].max() > 0.3 and (truth[0] > 0.1).mean() < 0.5  # nuclei, not a flat field
    # the planes sit around the cells: brightfield's halos reverse between -4 and +4 um
    below, above = bf[0] - bf[0].mean(), bf[2] - bf[2].mean()
    assert np.corrcoef(below.ravel(), above.ravel())[0, 1] < -0.3


def test_unknown_structures_and_impossible_pixels_are_refused_in_words() -> None:
    with pytest.raises(ValueError, match="the simulator renders dna, membrane, mitochondria"):
        simulated_like([0.0], 0.325, ["actin"], n_fields=1, size=32)
    with pytest.raises(ValueError, match="check the data's voxel size"):
        simulated_like([0.0], 50.0, ["dna"], n_fields=1, size=32)


TINY = ["--steps", "2", "--batch", "2", "--patch", "4,32,32", "--precision", "fp32", "--val-fraction", "0.34",
        "--sim-steps", "2"]


def test_train_sim_pretrain_from_bundled_records_the_simulated_step_and_fine_tunes(tmp_path) -> None:
    data = tmp_path / "data"
    write_pairs([NoiseField(s, planes=4, voxel_size_um=VOXEL) for s in range(3)], data)
    out = tmp_path / "m"
    printed = run_cli_in_process(["train", str(data), "--structures", "hoechst", "--out", str(out), "--init", "bundled",
                    "--sim-pretrain", "2", "--sim-modality", "dic", *TINY])
    assert "pretraining on 2 simulated dic fields" in printed
    assert "-3.0, -1.0, +1.0, +3.0 um from focus" in printed  # 4 planes 2 um apart, centred
    model = load_checkpoint(out.with_suffix(".safetensors"))
    record = model.meta.extra["sim_pretrain"]
    assert record["fields"] == 2 and record["steps"] == 2 and record["modality"] == "dic"
    assert record["offsets_um"] == [-3.0, -1.0, 1.0, 3.0] and record["pixel_um"] == 0.5
    assert model.meta.extra["init"]["flattened_from_3d"] is True
    # after the simulated step the user's fields are a fine-tune: a quarter of the rate, early stopping
    assert model.meta.extra["settings"]["lr"] == pytest.approx(5e-4)
    assert model.meta.extra["patience"] == 5


def test_train_sim_pretrain_from_scratch_and_its_refusals(tmp_path) -> None:
    data = tmp_path / "data"
    write_pairs([NoiseField(s, planes=4, voxel_size_um=VOXEL) for s in range(3)], data)
    out = tmp_path / "scratch"
    run_cli_in_process(["train", str(data), "--structures", "dna", "--out", str(out), "--mode", "2.5d", "--z-window", "4",
          "--depth", "1", "--base-channels", "4", "--sim-pretrain", "1", *TINY])
    model = load_checkpoint(out.with_suffix(".safetensors"))
    assert model.meta.extra["sim_pretrain"]["modality"] == "brightfield" and "init" not in model.meta.extra

    stacks = tmp_path / "stacks"
    write_pairs([NoiseField(s, planes=4, voxel_size_um=VOXEL, planar=False) for s in range(2)], stacks)
    a = build_parser().parse_args(["train", str(stacks), "--structures", "dna", "--out", str(tmp_path / "x"),
                                   "--sim-pretrain", "1", *TINY])
    with pytest.raises(ValueError, match="renders single-plane truth"):
        a.func(a)
    a.simulate_like = None  # the inference package alone, without the application's simulator
    a.data, a.mode, a.z_window = data, "2.5d", 4
    with pytest.raises(ValueError, match="needs the simulator"):
        a.func(a)

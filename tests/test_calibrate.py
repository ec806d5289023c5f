"""`livestain train` fits the model's own uncertainty scale on its validation fields
(inference/calibrate.py), and prediction and confidence use it instead of the bundled
model's constants."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_inference_more import write_planar_dataset  # noqa: E402

from _helpers import run_cli_in_process  # noqa: E402
from livestain.inference import ood, uncertainty  # noqa: E402
from livestain.inference.calibrate import U_HALF_PER_MEAN, calibrate  # noqa: E402
from livestain.inference.checkpoint import load_checkpoint  # noqa: E402
from livestain.inference.dataset import load_fields  # noqa: E402
from livestain.inference.normalize import zscore  # noqa: E402
from livestain.inference.predict import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A small 2.5D DNA model trained with field002 as its validation field."""
    root = tmp_path_factory.mktemp("cal")
    write_planar_dataset(root / "data", size=64)
    out = root / "m"
    printed = run_cli_in_process([
        "train", str(root / "data"), "--structures", "dna", "--out", str(out), "--mode", "2.5d", "--z-window", "5",
        "--steps", "60", "--batch", "2", "--patch", "1,32,32", "--depth", "1", "--base-channels", "4",
        "--val-fields", "field002", "--precision", "fp32", "--device", "cpu"])
    assert "uncertainty calibrated on 1 validation field(s)" in printed and "(bundled 8.9)" in printed
    return out.with_suffix(".safetensors"), root / "data"


def _ratio(mean: np.ndarray, u: np.ndarray, truth: np.ndarray) -> float:
    """Median absolute error over median uncertainty of one field's (only) structure."""
    err = np.abs(mean[0, 0] - zscore(truth[0]))
    return float(np.median(err) / np.median(u[0, 0]))


def test_the_checkpoint_carries_its_own_scale_and_prediction_uses_it(trained) -> None:
    path, data = trained
    model = load_checkpoint(path)
    cal = uncertainty.own_calibration(model.meta)
    assert cal is not None and cal["fields"] == 1 and cal["passes"] == uncertainty.DEFAULT_PASSES
    k = cal["error_per_std"]["dna"]
    assert k > 0 and cal["u_half"]["dna"] > 0
    field = next(f for f in load_fields(data, ("dna",)) if f.name == "field002")
    predictor = Predictor(model, "cpu")
    mean, u = uncertainty.predict_with_uncertainty(predictor, field.brightfield, field.voxel_size_um)
    # on the field it was fitted on, its median voxel reads its median error
    assert _ratio(mean, u, field.targets) == pytest.approx(1.0, rel=0.02)
    # the raw spread times the stored scale is what prediction gives: no bundled curve on top
    _, raw = uncertainty.predict_with_uncertainty(predictor, field.brightfield, field.voxel_size_um, calibration={})
    np.testing.assert_allclose(u, raw * np.float32(k), rtol=1e-5, atol=1e-7)
    # the bundled model's dna constants would say something else
    _, bundled = uncertainty.predict_with_uncertainty(predictor, field.brightfield, field.voxel_size_um,
                                                      calibration=uncertainty.ERROR_PER_STD["tta"])
    assert abs(_ratio(mean, bundled, field.targets) - 1.0) > 0.05


def test_a_stack_like_the_validation_ones_gets_the_usual_confidence(trained) -> None:
    """u_half is 2.35x the validation stacks' mean uncertainty: a stack at that mean
    scores 2 ** -(1 / 2.35) ** 2 = 0.88, whatever the model's own spread."""
    path, data = trained
    model = load_checkpoint(path)
    field = next(f for f in load_fields(data, ("dna",)) if f.name == "field002")
    _, u = uncertainty.predict_with_uncertainty(Predictor(model, "cpu"), field.brightfield, field.voxel_size_um)
    own = uncertainty.own_calibration(model.meta)["u_half"]
    conf = ood.stack_confidence(u, ("dna",), u_half=own).overall
    assert conf == pytest.approx(2.0 ** -((1 / U_HALF_PER_MEAN) ** 2), abs=0.01)


def test_predict_uses_the_models_own_scale_for_its_confidence(trained, tmp_path) -> None:
    from livestain.stackio import read_stack

    path, data = trained
    src = data / "field002" / "brightfield.ome.tif"
    out = tmp_path / "p.ome.tif"
    run_cli_in_process(["predict", str(path), str(src), "--out", str(out), "--uncertainty", "--device", "cpu"])
    _, info = read_stack(out)
    assert info["confidence"] == pytest.approx(2.0 ** -((1 / U_HALF_PER_MEAN) ** 2), abs=0.01)


def test_calibrate_refuses_fields_without_the_models_structures(trained) -> None:
    path, data = trained

    class Other:
        structures = ("membrane",)
        brightfield = np.zeros((5, 32, 32), np.float32)
        targets = np.zeros((1, 32, 32), np.float32)
        voxel_size_um = (1.0, 0.5, 0.5)

    with pytest.raises(ValueError, match="no validation field has any of the model's structures"):
        calibrate(Predictor(load_checkpoint(path), "cpu"), [Other()])

"""The simulator's DIC / oblique-light modality: relief in focus, odd along the shear,
brightfield again when the shear vanishes, never a negative intensity."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from livestain.devices.optics import FieldRenderer, OpticsConfig
from livestain.devices.sample import CellPopulation, SampleGeometry, make_field

FOCUS_UM = 4.0  # the middle of the cells (`devices.pairs`)


@pytest.fixture(scope="module")
def field():
    return make_field(11, (0, 7), SampleGeometry(shape=(40, 96, 96)), CellPopulation())


def _plane(field, z: float = FOCUS_UM, **optics) -> np.ndarray:
    return FieldRenderer(field, OpticsConfig(**optics)).brightfield(z)


def test_dic_shows_cells_in_focus_where_brightfield_hardly_does(field) -> None:
    bf = _plane(field)
    dic = _plane(field, modality="dic")
    assert abs(float(np.median(dic)) - 1.0) < 0.02  # the background stays at 1
    assert dic.std() > 5 * bf.std()


def test_the_relief_reverses_with_the_shear_direction(field) -> None:
    """Bright edges become dark ones when the shear turns by 180 degrees: the phase
    part of the transfer is odd in the shear."""
    a = _plane(field, modality="dic", dic_angle_deg=30.0, dic_bias_rad=1.2) - 1.0
    b = _plane(field, modality="dic", dic_angle_deg=210.0, dic_bias_rad=1.2) - 1.0
    c = _plane(field, modality="dic", dic_angle_deg=120.0, dic_bias_rad=1.2) - 1.0
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < -0.8
    assert abs(np.corrcoef(a.ravel(), c.ravel())[0, 1]) < 0.5  # across the shear: other edges


def test_without_shear_dic_is_brightfield(field) -> None:
    """Its amplitude part keeps brightfield's transfer (to first order in the contrast)."""
    z = FOCUS_UM + 3.0  # defocused: brightfield's halos
    bf = _plane(field, z)
    dic = _plane(field, z, modality="dic", dic_shear_um=1e-6, dic_bias_rad=np.pi / 2)  # the most linear bias
    assert bf.std() > 0.005
    np.testing.assert_allclose(dic, bf, atol=0.1 * bf.std())


def test_strong_relief_stays_positive(field) -> None:
    strong = replace(OpticsConfig(modality="dic"), dic_bias_rad=0.1, dic_shear_um=0.6)
    img = FieldRenderer(field, strong).brightfield(FOCUS_UM)
    assert img.min() >= 0.0 and img.max() > 2.0


def test_a_bad_modality_or_bias_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="brightfield, phase, dic"):
        OpticsConfig(modality="hoffman")
    with pytest.raises(ValueError, match="dic_bias_rad"):
        OpticsConfig(modality="dic", dic_bias_rad=0.0)


def test_simulate_writes_dic_pairs_with_their_optics(tmp_path, capsys) -> None:
    import json

    from livestain.cli import main
    from livestain.stackio import read_stack

    common = ["--fields", "1", "--size", "64", "--z", "3", "--z-step", "1", "--seed", "5"]
    assert main(["simulate", "--out", str(tmp_path / "dic"), "--modality", "dic", *common]) == 0
    assert main(["simulate", "--out", str(tmp_path / "bf"), *common]) == 0
    manifest = json.loads((tmp_path / "dic" / "simulate.json").read_text())
    assert manifest["optics"]["modality"] == "dic"
    dic, _ = read_stack(tmp_path / "dic" / "field000" / "brightfield.ome.tif")
    bf, _ = read_stack(tmp_path / "bf" / "field000" / "brightfield.ome.tif")
    relief = lambda a: float(a[1].std() / a[1].mean())  # noqa: E731 - the middle plane, near the cells
    assert relief(dic) > 3 * relief(bf)
    assert main(["simulate", "--out", str(tmp_path / "r"), "--randomize", "--modality", "dic", "--fields", "1"]) != 0
    assert "drop --modality" in capsys.readouterr().err

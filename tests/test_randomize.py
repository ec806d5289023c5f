"""Randomised simulation (`devices.randomize`, ``livestain simulate --randomize``) and the
robustness bench that measures a model over it (``bench/robustness.py``).

Why these tests: a robustness number is only as good as the conditions behind it, so
the drawn parameters must be recorded, reproducible and inside their ranges, a stated
focus offset must be where the images say focus is, and the bench must run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from livestain.devices import randomize as R
from livestain.devices.optics import FieldRenderer, OpticsConfig
from livestain.devices.pairs import simulate_pairs
from livestain.devices.sample import CellPopulation, SampleGeometry, make_field
from livestain.stackio import read_stack

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("robustness", ROOT / "bench" / "robustness.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_draw_is_reproducible_from_the_seed_and_json_able():
    a = R.draw(np.random.default_rng(42))
    b = R.draw(np.random.default_rng(42))
    c = R.draw(np.random.default_rng(43))
    assert a == b
    assert a != c
    assert json.loads(json.dumps(a)) == a


def test_every_range_is_respected_over_many_draws():
    r = R.Ranges()
    draws = [R.draw(np.random.default_rng(i), r) for i in range(600)]

    def within(key, lo_hi, tol=1e-3):
        vals = [d[key] for d in draws]
        assert min(vals) >= lo_hi[0] - tol and max(vals) <= lo_hi[1] + tol, key
        return vals

    within("focus_offset_um", r.focus_offset_um)
    within("z_step_um", r.z_step_um)
    within("pixel_um", r.pixel_um)
    within("na_objective", r.na_objective)
    within("read_noise_e", r.read_noise_e)
    within("exposure_ms", r.exposure_ms)
    within("fl_exposure_ms", r.fl_exposure_ms)
    for d in draws:
        assert 2 <= d["n_planes"] <= r.max_planes
        assert d["z_range_um"] <= r.z_range_um[1] + 2 * d["z_step_um"]
        assert d["z_range_um"] == pytest.approx((d["n_planes"] - 1) * d["z_step_um"], abs=1e-3)
        frac = d["na_condenser"] / d["na_objective"]
        assert r.condenser_fraction[0] - 1e-3 <= frac <= r.condenser_fraction[1] + 1e-3
        assert d["bit_depth"] in r.bit_depths
        assert 0 <= d["offset_adu"] <= r.offset_fraction[1] * (2 ** d["bit_depth"] - 1) + 1e-6
        assert r.dust_spots[0] <= len(d["dust"]) <= r.dust_spots[1]
        pop = d["population"]
        assert r.ri_scale[0] - 1e-3 <= pop["ri_scale"] <= r.ri_scale[1] + 1e-3
    # the bounded ones reach most of their range (log-uniform: check both ends are visited)
    steps = [d["z_step_um"] for d in draws]
    assert min(steps) < 0.3 and max(steps) > 1.5
    pixels = [d["pixel_um"] for d in draws]
    assert min(pixels) < 0.15 and max(pixels) > 0.6
    kinds = {d["population"]["kind"] for d in draws}
    assert kinds == {"typical", "dense", "rounded", "empty"}
    assert {d["modality"] for d in draws} == {"brightfield", "phase"}
    # long ranges at fine steps hit the plane cap rather than growing the field
    assert max(d["n_planes"] for d in draws) == r.max_planes


def test_training_default_renders_exactly_what_simulate_pairs_renders():
    pair, record = R.render(R.training_default(), 5, (0, 1), 64)
    ref = next(simulate_pairs([(0, 1)], seed=5, geometry=SampleGeometry(shape=(40, 64, 64))))
    assert np.array_equal(pair.brightfield, ref.brightfield)
    assert np.array_equal(pair.targets, ref.targets)
    assert record["z_center_um"] == R.NOMINAL_CENTER_UM


def test_render_is_reproducible_and_bounded_in_size():
    params = R.draw(np.random.default_rng(3))
    p1, rec1 = R.render(params, 9, (0, 0), 48)
    p2, rec2 = R.render(json.loads(json.dumps(rec1)), 9, (0, 0), 48)  # from the record alone
    assert np.array_equal(p1.brightfield, p2.brightfield)
    assert rec1 == rec2
    assert p1.brightfield.shape == (params["n_planes"], 48, 48)
    assert p1.voxel_size_um == (params["z_step_um"], params["pixel_um"], params["pixel_um"])


@pytest.mark.parametrize("offset", [-6.0, 0.0, 3.5])
def test_contrast_minimum_is_where_the_focus_offset_says(offset):
    """Brightfield contrast vanishes in focus between reversed halos: the plane of least
    contrast in a randomised stack is its centre minus the recorded offset."""
    params = {**R.training_default(), "focus_reference": "cells", "focus_offset_um": offset,
              "n_planes": 41, "z_step_um": 0.5, "exposure_ms": 200.0}
    pair, rec = R.render(params, 11, (0, 0), 96)
    contrast = pair.brightfield.astype(np.float64).std(axis=(1, 2))
    focus = float(pair.z_um[int(np.argmin(contrast))])  # type: ignore[index]
    assert rec["cells_mid_um"] is not None
    assert rec["z_center_um"] == pytest.approx(rec["cells_mid_um"] + offset, abs=1e-3)
    assert focus == pytest.approx(rec["z_center_um"] - offset, abs=0.55)


def test_phase_contrast_differs_from_brightfield_and_stays_physical():
    field = make_field(5, (0, 0), SampleGeometry(shape=(40, 96, 96)))
    bf = FieldRenderer(field, OpticsConfig()).brightfield(3.5)
    pc = FieldRenderer(field, OpticsConfig(modality="phase")).brightfield(3.5)
    assert not np.allclose(bf, pc, atol=0.05)
    assert pc.min() >= 0.0
    assert pc.std() > 3 * bf.std()  # phase contrast is strongest in focus, brightfield weakest
    with pytest.raises(ValueError, match="modality"):
        OpticsConfig(modality="darkfield")  # not simulated


def test_populations_dense_rounded_empty():
    geo = SampleGeometry(shape=(60, 128, 128), z0_um=-5.0)
    dense = make_field(1, (0, 0), geo, CellPopulation(n_cells=(12, 13), max_overlap=0.35,
                                                       attempts_per_cell=10, body_xy_um=(6, 10)))
    typical = make_field(1, (0, 0), geo)
    assert dense.n_cells > typical.n_cells
    rounded = make_field(1, (0, 0), geo, CellPopulation(body_z_um=(6.0, 7.5), body_xy_um=(5, 8)))
    assert R.cells_mid_um(rounded) > R.cells_mid_um(typical) + 1.5  # taller cells
    empty = make_field(1, (0, 0), geo, CellPopulation(n_cells=(0, 1)))
    assert empty.n_cells == 0 and R.cells_mid_um(empty) is None
    img = FieldRenderer(empty).brightfield(3.0)
    assert np.allclose(img, 1.0)
    half = make_field(1, (0, 0), geo, CellPopulation(empty_fraction=0.5))
    x_um = 128 * 0.325
    cols = np.flatnonzero(np.abs(half.delta_n).sum(axis=(0, 1)) > 0) * 0.325
    assert cols.size and np.median(cols) < 0.55 * x_um
    weak = make_field(1, (0, 0), geo, CellPopulation(ri_scale=0.5))
    assert np.allclose(weak.delta_n, 0.5 * typical.delta_n, atol=1e-6)


def test_fluorescence_past_the_grid_shows_the_psf_tail():
    field = make_field(5, (0, 0), SampleGeometry(shape=(40, 64, 64)))
    o = OpticsConfig(na_objective=0.3)
    top = float(field.geometry.plane_z_um()[-1])
    assert not FieldRenderer(field, o).fluorescence("dna", top + 2.0).any()
    tail = FieldRenderer(field, o, z_margin_um=10.0).fluorescence("dna", top + 2.0)
    assert tail.max() > 0
    inside = FieldRenderer(field, o, z_margin_um=10.0).fluorescence("dna", 3.0)
    assert tail.max() < inside.max()


def test_simulate_randomize_records_parameters(tmp_path):
    from livestain.cli import main

    out = tmp_path / "rand"
    assert main(["simulate", "--out", str(out), "--fields", "2", "--size", "48", "--seed", "4",
                 "--randomize", "--max-planes", "12"]) == 0
    fields = json.loads((out / "fields.json").read_text())["fields"]
    assert [f["field"] for f in fields] == ["field000", "field001"]
    for i, f in enumerate(fields):
        folder = out / f["field"]
        rec = json.loads((folder / "params.json").read_text())
        assert rec == f["params"]
        bf, info = read_stack(folder / "brightfield.ome.tif")
        assert info["randomized"] == rec
        assert bf.shape[-2:] == (48, 48) and bf.shape[0] == rec["n_planes"] <= 12
        from livestain.devices.simulate_cli import draw_field_params

        drawn = draw_field_params(4, i, 12)
        assert {k: rec[k] for k in drawn if k != "gain_e_per_adu"} == {
            k: v for k, v in drawn.items() if k != "gain_e_per_adu"}
        again, _ = R.render(rec, 4, (0, i), 48)
        assert np.array_equal(np.asarray(bf).reshape(again.brightfield.shape), again.brightfield)
    assert json.loads((out / "simulate.json").read_text())["ranges"]["max_planes"] == 12


def test_robustness_conditions_cover_the_issue_grid():
    bench = _bench()
    names = [n for n, _ in bench.conditions()]
    for want in ("default", "focus -8 um", "focus +8 um", "z range 8 um (8 planes)",
                 "z range 40 um (40 planes)", "z step 0.3 um (16 planes)", "pixel 0.65 um",
                 "exposure 0.25x", "exposure 4x", "dense colony", "phase contrast"):
        assert want in names
    assert not set(bench.HELD_OUT_SEEDS) & set(bench.TRAINING_SEEDS)
    # the issue's grid first, then optics and samples it holds fixed
    assert names[bench.ISSUE_GRID_ROWS - 1] == "phase contrast"
    assert {"NA 0.3 (condenser 0.2)", "dust (2 shadows)", "rounded cells"} <= set(names[bench.ISSUE_GRID_ROWS:])
    edits = dict(bench.conditions())
    assert edits["NA 1.2 (condenser 0.55)"](R.training_default())["na_objective"] == 1.2
    p = edits["z step 2.0 um (16 planes)"](R.training_default())
    assert p["n_planes"] == 16 and p["z_range_um"] == 30.0
    assert R.training_default()["z_step_um"] == 1.0  # edits copy


def test_robustness_runs_on_a_tiny_grid(tmp_path):
    bench = _bench()
    with pytest.raises(ValueError, match="trained"):
        bench.run(None, [101], 48, only=["default"], device="cpu")
    json_out = tmp_path / "r.json"
    assert bench.main(["--seeds", "7331", "--size", "48", "--only", "default", "focus +4 um",
                       "dust (2 shadows)", "DIC (no model trained on it)", "--device", "cpu",
                       "--json", str(json_out)]) == 0
    result = json.loads(json_out.read_text())
    assert set(result["rows"]) == {"default", "focus +4 um", "dust (2 shadows)", "DIC (no model trained on it)"}
    assert set(result["worst"]) == {"dna", "membrane", "mitochondria"}
    for s, w in result["worst_issue_grid"].items():  # the dust and DIC rows are not the issue's
        assert w["condition"] in {"default", "focus +4 um"}
        assert w["pearson"] == min(result["rows"][n][s] for n in ("default", "focus +4 um"))
    for w in result["worst"].values():
        assert w["meets"] == (w["pearson"] >= w["target"])
    text = bench.table(result)
    assert "| default |" in text and "| DIC (no model trained on it) |" in text and "worst dna" in text


def test_ranges_dataclass_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        R.Ranges().max_planes = 3  # type: ignore[misc]

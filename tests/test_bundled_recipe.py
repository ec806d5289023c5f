"""The bundled model's recipe: its training copies (`livestain.bundled`): uneven illumination and
shorter exposures made from rendered fields, so the model learns them without a new
rendering. Each must be the physics it stands for, or the model learns the wrong thing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestain.bundled import DIM_RANGE, SHADING_TILT, dimmed, shaded


def test_a_dimmed_copy_has_the_shot_noise_of_the_shorter_exposure_at_the_same_brightness() -> None:
    rng = np.random.default_rng(0)
    offset, mean_electrons = 100.0, 400.0
    stack = offset + rng.poisson(mean_electrons, size=(2, 256, 256)).astype(np.float32)
    for keep in (0.25, 0.5):
        out = dimmed(stack, np.random.default_rng(1), offset, keep)
        assert abs(out.mean() - stack.mean()) < 1.0  # brightness kept
        # a Poisson count thinned to `keep` and scaled back: variance mean / keep
        np.testing.assert_allclose(out.var(), mean_electrons / keep, rtol=0.03)
    assert 0 < DIM_RANGE[0] < DIM_RANGE[1] <= 1.0


def test_a_shaded_copy_scales_the_light_above_the_offset_by_a_smooth_field() -> None:
    offset = 100.0
    stack = np.full((3, 96, 96), offset + 1000.0, np.float32)
    stack[:, 40:50, 40:50] += 200.0  # a cell: its contrast is shaded with the light
    out = shaded(stack, np.random.default_rng(5), offset)
    field = (out - offset) / (stack - offset)
    np.testing.assert_allclose(field[0], field[2], rtol=1e-5)  # the same at every focus
    assert field.max() <= 1.0 + SHADING_TILT[1] / 2 + 1e-5 and field.min() > 0.3
    assert field.std() > 1e-3  # uneven: not the identity
    # a dark frame at the offset stays at the offset: no light, nothing to shade
    dark = shaded(np.full((1, 32, 32), offset, np.float32), np.random.default_rng(5), offset)
    np.testing.assert_allclose(dark, offset)


def test_other_na_fields_are_the_bundled_acquisition_through_other_objectives(monkeypatch) -> None:
    from livestain import bundled
    from livestain.devices import randomize

    drawn = []
    real_render = randomize.render

    def render(params, seed, tile=(0, 0), size=256, **kw):
        drawn.append(dict(params))
        return real_render(params, seed, tile, size, **kw)

    monkeypatch.setattr(randomize, "render", render)
    pairs = bundled.other_na(6, 7100, np.random.default_rng(2), size=32)
    assert len(pairs) == 6 and pairs[0][0].shape == (16, 32, 32)
    base = randomize.training_default()
    nas = [p["na_objective"] for p in drawn]
    assert all(bundled.NA_RANGE[0] <= na <= bundled.NA_RANGE[1] for na in nas) and max(nas) - min(nas) > 0.2
    for p in drawn:
        assert p["na_condenser"] <= min(0.9, p["na_objective"] * bundled.CONDENSER_FRACTION[1]) + 1e-3
        # only the optics change: the geometry is the bundled acquisition's
        assert {k: p[k] for k in ("n_planes", "z_step_um", "pixel_um", "modality")} == \
            {k: base[k] for k in ("n_planes", "z_step_um", "pixel_um", "modality")}


def test_a_recipe_modifier_without_its_recipe_is_refused_with_the_fix(capsys, tmp_path) -> None:
    """``--shading`` alone would train plain `train_bundled` and drop the shading: a user
    waits minutes for a model they did not ask for."""
    from livestain.cli import main

    out = tmp_path / "m.safetensors"
    for flag, base in (("--shading", "--dense"), ("--edge", "--dense"), ("--other-na", "--dense"),
                       ("--canonical", "--phase")):
        assert main(["train-bundled", flag, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} changes the {base} recipe; add {base}" in err
    assert not out.exists()


def test_widen_and_weight_need_a_fine_tune_and_bad_weights_are_named(capsys, tmp_path) -> None:
    from livestain.cli import main
    from livestain.run_commands import structure_weights

    out = tmp_path / "m.safetensors"
    assert main(["train-bundled", "--widen", "12", "--out", str(out)]) == 2
    assert "add --dense" in capsys.readouterr().err
    assert main(["train-bundled", "--phase", "--weight", "mito=3", "--out", str(out)]) == 2
    assert "(or --phase --canonical)" in capsys.readouterr().err
    assert main(["train-bundled", "--dense", "--weight", "golgi=3", "--out", str(out)]) == 2
    assert "STRUCTURE one of dna, membrane, mitochondria" in capsys.readouterr().err
    assert not out.exists()
    # aliases name the bundled structures; unnamed ones keep weight 1
    assert structure_weights(["mito=3"]) == (1.0, 1.0, 3.0)
    assert structure_weights(["DAPI=0.5", "mitochondria=2"]) == (0.5, 1.0, 2.0)
    assert structure_weights([]) == ()
    for bad, why in ((["dna=x"], "not a number"), (["dna=-1"], "0 or more"),
                     (["dna=0", "membrane=0", "mito=0"], "nothing to learn")):
        with pytest.raises(ValueError, match=why):
            structure_weights(bad)


def test_load_base_widens_the_initial_model_without_changing_its_prediction() -> None:
    from livestain.bundled import load_base
    from livestain.inference.checkpoint import bundled_model_path

    plain = load_base(bundled_model_path())
    channels = plain.meta.config.base_channels
    wide = load_base(bundled_model_path(), widen_to=channels + 2)
    assert wide.meta.config.base_channels == channels + 2 and wide.meta.extra["widened_from"] == channels
    assert wide.meta.config.structures == plain.meta.config.structures
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        a, b = plain.net.eval()(x), wide.net.eval()(x)
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())


def test_a_field_count_without_its_recipe_is_refused_with_the_flag_spelled_as_typed(capsys, tmp_path) -> None:
    from livestain.cli import main

    out = tmp_path / "m.safetensors"
    for flag, base in (("--na-fields", "--other-na"), ("--edge-fields", "--edge")):
        assert main(["train-bundled", "--dense", flag, "24", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} changes the {base} recipe; add {base}" in err
        assert f"`livestain train-bundled --dense {base} {flag} N`" in err
    assert not out.exists()


def test_the_recorded_recipe_spells_the_tuning_options() -> None:
    from livestain.bundled import tuning_flags

    names = ("dna", "membrane", "mitochondria")
    assert tuning_flags(names, (2.0, 1.0, 3.0), 16) == " --widen 16 --weight dna=2 --weight mitochondria=3"
    assert tuning_flags(names, (), None) == ""
    assert tuning_flags(names, (1.0, 0.5, 1.0), None) == " --weight membrane=0.5"

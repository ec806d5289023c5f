"""Fine-tuning (`livestain train --init`), best weights and early stopping, and the
data-derived --patch / --steps of `livestain train`.

Everything runs on tiny networks, a few steps and 8 x 32-64 px simulated fields, so each
test takes seconds on a shared CPU. Validation sequences that must go up and then down
are scripted by replacing `train.evaluate` (the only place `train` scores a network).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from livestain.inference import commands
from livestain.inference import train as train_mod
from livestain.inference.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from livestain.inference.dataset import load_fields, write_pairs
from livestain.inference.model import UNet3D, UNetConfig
from livestain.inference.normalize import PercentileNorm
from livestain.inference.train import (
    FINETUNE_STEP_BOUNDS,
    STEP_BOUNDS,
    TrainSettings,
    data_patch,
    data_steps,
    evaluate,
    load_training_state,
    predict_normalised,
    train,
    transfer_weights,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: tiny convolutions gain nothing from more, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ data and helpers


def _crop(pair, size: tuple[int, int, int]):
    """``pair`` cropped to (z, y, x) around its brightest nucleus, so every crop has cells."""
    nz, ny, nx = pair.brightfield.shape
    cy, cx = np.unravel_index(np.argmax(pair.targets[0].max(axis=0)), (ny, nx))
    z, y, x = size
    y0 = int(np.clip(cy - y // 2, 0, ny - y))
    x0 = int(np.clip(cx - x // 2, 0, nx - x))
    pair.brightfield = pair.brightfield[:z, y0 : y0 + y, x0 : x0 + x].copy()
    pair.targets = pair.targets[:, :z, y0 : y0 + y, x0 : x0 + x].copy()
    return pair


def _pairs(sizes: Sequence[tuple[int, int, int]]) -> list:
    from livestain.devices.pairs import simulate_pairs

    tiles = [(0, 0), (0, 1), (1, 0), (1, 1)][: len(sizes)]
    pairs = simulate_pairs(tiles, seed=4, z_planes_um=np.arange(8) + 0.5, structures=("dna", "membrane"))
    return [_crop(p, s) for p, s in zip(pairs, sizes)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three 8x64x64 fields with dna and membrane."""
    out = tmp_path_factory.mktemp("data")
    write_pairs(_pairs([(8, 64, 64)] * 3), out)
    return out


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Three fields smaller than the default patch, of different odd sizes."""
    out = tmp_path_factory.mktemp("small")
    write_pairs(_pairs([(6, 37, 45), (7, 41, 38), (8, 50, 53)]), out)
    return out


@pytest.fixture(scope="module")
def model_a(dataset, tmp_path_factory) -> Path:
    """A tiny 3D model of dna alone (depth 1, 4 channels), trained a little so that its
    weights are far from any fresh initialisation."""
    fields = load_fields(dataset, ["dna"])
    cfg = UNetConfig(structures=("dna",), depth=1, base_channels=4)
    result = train([f.as_pair() for f in fields], [], cfg,
                   TrainSettings(steps=6, patch=(8, 32, 32), batch=2, lr=1e-2, seed=3))
    return save_checkpoint(tmp_path_factory.mktemp("a") / "a", result.net,
                           ModelMeta(cfg, PercentileNorm(), fields[0].voxel_size_um))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livestain")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser


def run_train(*argv: object) -> str:
    """``livestain train ARGV``; its printed output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        a = _parser().parse_args(["train", *map(str, argv)])
        assert a.func(a) == 0
    return buf.getvalue()


TINY = ("--batch", "1", "--val-fraction", "0.34", "--precision", "fp32", "--seed", "0")


def scripted(monkeypatch, scores: Sequence[float]) -> list[float]:
    """Make `train`'s validations score ``scores`` (mean r, each structure the same), in order."""
    left = iter(scores)
    seen: list[float] = []

    def fake(net: UNet3D, pairs, norm) -> list[float]:  # noqa: ANN001
        seen.append(next(left))
        return [seen[-1]] * len(net.config.structures)

    monkeypatch.setattr(train_mod, "evaluate", fake)
    return seen


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder:
    """An ``on_step`` keeping a copy of the weights after every step: what a validation
    at that step sees (on_step runs after the optimiser step, before the validation).
    `train` builds its network inside, so `UNet3D.__init__` is wrapped to remember it."""

    def __init__(self, monkeypatch) -> None:  # noqa: ANN001
        self.nets: list[UNet3D] = []
        self.kept: dict[int, dict[str, torch.Tensor]] = {}
        original = UNet3D.__init__
        nets = self.nets

        def init(net: UNet3D, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            original(net, *args, **kwargs)
            nets.append(net)

        monkeypatch.setattr(UNet3D, "__init__", init)

    def __call__(self, step: int, loss: float) -> None:
        self.kept[step] = {k: v.detach().clone() for k, v in self.nets[-1].state_dict().items()}


@pytest.fixture(scope="module")
def fields(dataset) -> list:
    return load_fields(dataset, ["dna", "membrane"])


def tiny_cfg(structures: tuple[str, ...] = ("dna", "membrane")) -> UNetConfig:
    return UNetConfig(structures=structures, depth=1, base_channels=2)


def small_settings(steps: int, **kw: object) -> TrainSettings:
    return TrainSettings(steps=steps, patch=(4, 16, 16), batch=1, lr=1e-2, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ (a) --init copies the weights


def test_zero_steps_from_an_init_predict_exactly_what_the_init_predicts(fields) -> None:
    bundled = load_checkpoint(None)
    cfg = UNetConfig(**{**bundled.meta.config.to_dict(), "structures": ("membrane", "dna")})  # a reordered subset
    result = train([f.as_pair() for f in fields[:2]], [], cfg, TrainSettings(steps=0, patch=(8, 32, 32)),
                   init=bundled.net)
    assert result.transfer is not None and result.transfer.new_structures == []
    assert len(result.transfer.kept) == result.transfer.total == len(bundled.net.state_dict())
    x = PercentileNorm()(fields[2].brightfield)
    with torch.inference_mode():
        mine, theirs = predict_normalised(result.net, x), predict_normalised(bundled.net, x)
    assert mine.shape == (2, 8, 64, 64)
    np.testing.assert_allclose(mine, theirs[[1, 0]], rtol=1e-5, atol=1e-5)  # membrane, dna rows of the head


def test_init_bundled_with_lr_0_keeps_every_weight_and_reports_the_start(dataset, fields, tmp_path) -> None:
    out = tmp_path / "ft"
    printed = run_train(dataset, "--structures", "dna,membrane", "--out", out, "--init", "bundled",
                        "--steps", "1", "--lr", "0", "--patch", "8,32,32", *TINY)
    bundled = load_checkpoint(None)
    model = load_checkpoint(out.with_suffix(".safetensors"))
    total = len(bundled.net.state_dict())
    assert f"fine-tuning {bundled.name} (dna, membrane, mitochondria): kept {total} of {total} tensors" in printed
    assert model.meta.config == UNetConfig(**{**bundled.meta.config.to_dict(), "structures": ("dna", "membrane")})
    mine, theirs = dict(model.net.named_parameters()), dict(bundled.net.named_parameters())
    for name, value in mine.items():  # lr 0: the step moved no weight (BatchNorm statistics do move)
        expected = theirs[name][:2] if name.startswith("head.") else theirs[name]
        assert torch.equal(value, expected), name
    init = model.meta.extra["init"]
    assert init["model"] == bundled.name and Path(init["path"]) == bundled.path.resolve()
    assert init["kept_tensors"] == total and init["new_structures"] == []
    # step 0 validates the initial network itself: the same r as the bundled model's own
    # dna and membrane channels on the validation field
    history = model.meta.extra["history"]
    assert [h["step"] for h in history] == [0, 1] and history[0]["loss"] is None
    val = [f for f in fields if f.name in model.meta.extra["data"]["val_fields"]]
    start = train([f.as_pair() for f in val], [], model.meta.config, TrainSettings(steps=0), init=bundled.net)
    expected = evaluate(start.net, [f.as_pair() for f in val], PercentileNorm())
    assert list(history[0]["val_pearson"].values()) == pytest.approx(expected, abs=1e-6)
    assert f"{bundled.name} before fine-tuning: validation Pearson r dna {expected[0]:.3f}" in printed
    assert model.meta.voxel_size_um == pytest.approx(fields[0].voxel_size_um)


def test_init_errors_name_the_file_and_the_fix(dataset, tmp_path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model at all")
    for init, says in ((tmp_path / "nope.safetensors", r"nope.safetensors: no such model file.*--init bundled"),
                       (tmp_path, r"no such model file \(it is a folder\)"),
                       (bad, r"--init .*broken.safetensors: Model file .* is not a usable livestain checkpoint")):
        a = _parser().parse_args(["train", str(dataset), "--structures", "dna", "--out", str(tmp_path / "m"),
                                  "--init", str(init)])
        with pytest.raises(ValueError, match=says):
            a.func(a)
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------ (b) new structures: new head rows


def test_fine_tune_to_a_new_structure_keeps_shared_tensors_and_reinitialises_its_head_row(
    dataset, model_a, tmp_path
) -> None:
    out = tmp_path / "ab"
    printed = run_train(dataset, "--structures", "dna,membrane", "--out", out, "--init", model_a,
                        "--steps", "1", "--lr", "0", "--patch", "8,32,32", "--depth", "3", "--base-channels", "4",
                        *TINY)
    a = load_checkpoint(model_a)
    ab = load_checkpoint(out.with_suffix(".safetensors"))
    # the architecture is model A's; the conflicting --depth is named, the agreeing --base-channels not
    assert (ab.meta.config.depth, ab.meta.config.base_channels, ab.meta.config.structures) == (1, 4, ("dna", "membrane"))
    assert "ignoring --depth 3" in printed and "--base-channels" not in printed.split("ignoring")[1].split("\n")[0]
    total = len(a.net.state_dict())
    assert (f"kept {total - 2} of {total} tensors; output head re-initialised for membrane "
            "(rows kept for: dna)") in printed
    assert ab.meta.extra["init"]["kept_tensors"] == total - 2
    assert ab.meta.extra["init"]["head_rows"] == {"dna": "dna"}
    mine, theirs = dict(ab.net.named_parameters()), dict(a.net.named_parameters())
    shared = [k for k in mine if not k.startswith("head.")]
    assert len(shared) == len(mine) - 2 and all(torch.equal(mine[k], theirs[k]) for k in shared)
    for name in ("head.weight", "head.bias"):
        assert torch.equal(mine[name][0], theirs[name][0])  # dna: model A's row
    torch.manual_seed(0)  # membrane: the fresh row a from-scratch run with --seed 0 starts from
    fresh = dict(UNet3D(ab.meta.config).named_parameters())
    for name in ("head.weight", "head.bias"):
        assert torch.equal(mine[name][1], fresh[name][1]) and not torch.equal(mine[name][1], theirs[name][0])


def test_transfer_weights_maps_head_rows_by_structure_and_refuses_another_architecture() -> None:
    torch.manual_seed(1)
    src = UNet3D(UNetConfig(structures=("dna", "membrane", "mitochondria"), depth=1, base_channels=2))
    # same number of structures but one differs: a shape match alone would copy membrane into actin
    torch.manual_seed(2)
    dst = UNet3D(UNetConfig(structures=("mito", "actin", "dapi"), depth=1, base_channels=2))
    fresh = dst.head.weight.detach().clone()
    plan = transfer_weights(dst, src)
    assert plan.head_rows == {"mito": "mitochondria", "dapi": "dna"} and plan.new_structures == ["actin"]
    assert torch.equal(dst.head.weight[0], src.head.weight[2]) and torch.equal(dst.head.weight[2], src.head.weight[0])
    assert torch.equal(dst.head.weight[1], fresh[1])
    assert torch.equal(dst.enc[0][0].weight, src.enc[0][0].weight)
    with pytest.raises(ValueError, match="keeps the initial network's architecture"):
        transfer_weights(UNet3D(UNetConfig(structures=("dna",), depth=2, base_channels=2)), src)


# ------------------------------------------------------------------ (c) best weights


def test_the_best_validations_weights_are_returned_not_the_last(fields, monkeypatch) -> None:
    pairs = [f.as_pair() for f in fields]
    scripted(monkeypatch, [0.1, 0.5, 0.3, 0.2])  # validations at steps 2, 4, 6, 8
    rec = Recorder(monkeypatch)
    result = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(8), on_step=rec, val_every=2, keep_best=True)
    assert (result.best_step, result.best_score, result.steps_run) == (4, 0.5, 8)
    assert result.restored_best and result.stopped_early_at is None
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]  # the history keeps every validation
    assert result.best_val_pearson == {"dna": 0.5, "membrane": 0.5}
    assert same(result.net.state_dict(), rec.kept[4]) and not same(rec.kept[4], rec.kept[8])
    # without keep_best (the library default) the last step's weights come back
    scripted(monkeypatch, [0.1, 0.5, 0.3, 0.2])
    last = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(8), val_every=2)
    assert last.best_step == 4 and not last.restored_best and same(last.net.state_dict(), rec.kept[8])


def test_an_interrupted_run_resumes_to_the_same_best_weights(fields, monkeypatch, tmp_path) -> None:
    pairs = [f.as_pair() for f in fields]
    scores = [0.1, 0.5, 0.3, 0.2]
    scripted(monkeypatch, scores)
    whole = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(8), val_every=2, keep_best=True)
    state = tmp_path / "run.state.safetensors"

    def stop_at_7(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    scripted(monkeypatch, scores)
    with pytest.raises(KeyboardInterrupt):
        train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(8), on_step=stop_at_7, val_every=2,
              state_path=state, save_every=2, keep_best=True)
    saved, tensors = load_training_state(state)
    assert (saved["step"], saved["best_step"], saved["best_score"]) == (6, 4, 0.5)
    assert any(k.startswith("best/") for k in tensors)
    scripted(monkeypatch, scores[3:])  # the validation at step 8 is the one left
    resumed = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(8), val_every=2, state_path=state,
                    save_every=2, resume=True, keep_best=True)
    assert resumed.resumed_from == 6 and resumed.best_step == 4 and resumed.history == whole.history
    assert same(resumed.net.state_dict(), whole.net.state_dict())


# ------------------------------------------------------------------ (d) early stopping


def test_patience_stops_the_run_and_a_resume_stays_stopped(fields, monkeypatch, tmp_path) -> None:
    pairs = [f.as_pair() for f in fields]
    falling = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4]
    scripted(monkeypatch, falling)
    rec = Recorder(monkeypatch)
    state = tmp_path / "s.state.safetensors"
    result = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(20), on_step=rec, val_every=2,
                   state_path=state, keep_best=True, patience=2)
    assert result.stopped_early_at == 6 and result.steps_run == 6 and len(result.losses) == 6 < 20
    assert result.best_step == 2 and same(result.net.state_dict(), rec.kept[2])
    assert load_training_state(state)[0]["stopped_early_at"] == 6
    # resumed with the same patience: nothing more to run, the same best weights
    seen = scripted(monkeypatch, falling)
    again = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(20), val_every=2, state_path=state,
                  resume=True, keep_best=True, patience=2)
    assert seen == [] and again.steps_run == 6 and again.stopped_early_at == 6
    assert same(again.net.state_dict(), rec.kept[2])
    # more patience: it carries on until that runs out too (validations at 8 and 10)
    scripted(monkeypatch, falling[3:])
    more = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(20), val_every=2, state_path=state,
                 resume=True, keep_best=True, patience=4)
    assert more.stopped_early_at == 10 and len(more.losses) == 10 and more.best_step == 2


def test_patience_running_out_at_the_last_step_is_no_early_stop(fields, monkeypatch) -> None:
    pairs = [f.as_pair() for f in fields]
    scripted(monkeypatch, [0.5, 0.4, 0.3])
    result = train(pairs[:2], pairs[2:], tiny_cfg(), small_settings(6), val_every=2, keep_best=True, patience=2)
    assert result.stopped_early_at is None and result.steps_run == 6 and result.best_step == 2


def test_train_command_patience_saves_the_best_and_says_so(dataset, monkeypatch, tmp_path) -> None:
    scripted(monkeypatch, [0.2, 0.6, 0.5, 0.4, 0.3])
    out = tmp_path / "p"
    printed = run_train(dataset, "--structures", "dna", "--out", out, "--steps", "20", "--val-every", "2",
                        "--patience", "3", "--patch", "4,16,16", "--depth", "1", "--base-channels", "2", *TINY)
    extra = load_checkpoint(out.with_suffix(".safetensors")).meta.extra
    assert (extra["best_step"], extra["steps_run"], extra["stopped_early_at"], extra["patience"]) == (4, 10, 10, 3)
    assert extra["val_pearson"] == {"dna": 0.6} and [h["step"] for h in extra["history"]] == [2, 4, 6, 8, 10]
    assert "stopped early at step 10 of 20" in printed
    assert "best validation Pearson r: dna 0.600 (mean 0.600) at step 4 (of 10 run)" in printed


# ------------------------------------------------------------------ (e) data-derived patch and steps


def test_data_patch_fits_the_smallest_stack_in_multiples_of_2_to_the_depth() -> None:
    assert data_patch((40, 256, 256), 2)[0] == (16, 64, 64)
    assert data_patch((6, 37, 45), 2)[0] == (6, 36, 44)
    assert data_patch((6, 37, 45), 3)[0] == (6, 32, 40)
    assert data_patch((30, 37, 200), 2, "2.5d", z_window=5)[0] == (5, 36, 64)
    rng = np.random.default_rng(0)
    for _ in range(200):
        depth = int(rng.integers(1, 5))
        smallest = (int(rng.integers(1, 40)), *(int(v) for v in rng.integers(2**depth, 300, 2)))
        patch, _ = data_patch(smallest, depth)
        assert all(1 <= p <= s for p, s in zip(patch, smallest)), (smallest, depth, patch)
        assert patch[1] % 2**depth == 0 and patch[2] % 2**depth == 0


def test_data_steps_scale_with_the_training_voxels_within_bounds() -> None:
    # the bundled recipe's data (9 fields of 16x256x256, 4 x 16x64x64 patches) gives its ~600 steps
    steps, why = data_steps(9 * 16 * 256 * 256, 4, (16, 64, 64))
    assert steps == 576 and "16 passes" in why
    assert data_steps(2 * 16 * 256 * 256, 4, (16, 64, 64))[0] == STEP_BOUNDS[0]
    assert data_steps(100 * 40 * 1024 * 1024, 4, (16, 64, 64))[0] == STEP_BOUNDS[1]
    assert data_steps(9 * 16 * 256 * 256, 4, (16, 64, 64), finetune=True)[0] == 144
    assert data_steps(1000, 4, (16, 64, 64), finetune=True)[0] == FINETUNE_STEP_BOUNDS[0]
    assert data_steps(10**10, 4, (16, 64, 64), finetune=True)[0] == FINETUNE_STEP_BOUNDS[1]
    # 2.5D: a patch teaches one plane
    assert data_steps(40 * 256 * 256, 4, (5, 64, 64), "2.5d")[0] == 16 * 40 * 256 * 256 // (4 * 64 * 64)
    sizes = [data_steps(n, 4, (16, 64, 64))[0] for n in np.geomspace(1e5, 1e10, 30).astype(int)]
    assert sizes == sorted(sizes)


def test_train_command_derives_the_patch_from_small_fields_and_keeps_explicit_values(small_dataset, tmp_path) -> None:
    out = tmp_path / "s"
    printed = run_train(small_dataset, "--structures", "dna", "--out", out, "--steps", "2", "--depth", "2",
                        "--base-channels", "2", *TINY)
    model = load_checkpoint(out.with_suffix(".safetensors"))
    fields = {f.name: f for f in load_fields(small_dataset, ["dna"])}
    train_shapes = [fields[n].brightfield.shape for n in model.meta.extra["data"]["train_fields"]]
    patch = tuple(model.meta.extra["settings"]["patch"])
    assert patch == data_patch(np.min(train_shapes, axis=0), 2)[0]
    assert all(p <= s for shape in train_shapes for p, s in zip(patch, shape))
    assert patch[1] % 4 == 0 and patch[2] % 4 == 0 and patch != (16, 64, 64)
    assert f"patch {'x'.join(map(str, patch))}: the default 16x64x64 fitted to the smallest" in printed
    assert model.meta.extra["settings"]["steps"] == 2 and "(--steps to choose)" not in printed
    # explicit values stay as given (this patch fits every field)
    printed = run_train(small_dataset, "--structures", "dna", "--out", out, "--steps", "2", "--patch", "4,8,12",
                        "--depth", "2", "--base-channels", "2", *TINY)
    assert load_checkpoint(out.with_suffix(".safetensors")).meta.extra["settings"]["patch"] == [4, 8, 12]
    assert "(--patch to choose)" not in printed


def test_fine_tune_defaults_lower_lr_derived_steps_and_patience(small_dataset, model_a, tmp_path) -> None:
    out = tmp_path / "f"
    printed = run_train(small_dataset, "--structures", "dna", "--out", out, "--init", model_a, *TINY)
    extra = load_checkpoint(out.with_suffix(".safetensors")).meta.extra
    settings = extra["settings"]
    assert settings["lr"] == pytest.approx(TrainSettings.lr / 4) and "lr 0.0005: a fine-tune" in printed
    fields = {f.name: f for f in load_fields(small_dataset, ["dna"])}
    voxels = sum(fields[n].targets[0].size for n in extra["data"]["train_fields"])
    expected, _ = data_steps(voxels, 1, settings["patch"], finetune=True)
    assert settings["steps"] == expected == FINETUNE_STEP_BOUNDS[0]  # tiny data: the minimum
    assert f"steps {expected}: ~4 passes (a fine-tune)" in printed
    assert extra["patience"] == 5 and extra["steps_run"] <= expected
    assert extra["history"][0]["step"] == 0 and extra["best_step"] is not None


def test_the_robust_recipe_fine_tunes_the_bundled_model_on_random_fields(tmp_path) -> None:
    """`livestain train-bundled --robust` in miniature: random optics, cameras and samples
    at the model's own z geometry and pixel size, the bundled model as the start."""
    from livestain.bundled import robust_ranges, train_robust
    from livestain.devices import randomize
    from livestain.inference.checkpoint import load_checkpoint

    params = randomize.draw(np.random.default_rng(1), robust_ranges())
    assert params["n_planes"] == 16 and params["z_step_um"] == 1.0 and params["pixel_um"] == 0.325
    metrics = train_robust(tmp_path / "robust.safetensors", steps=2, fields=2, val_fields=1, size=48)
    model = load_checkpoint(tmp_path / "robust.safetensors", "cpu")
    assert model.meta.extra["recipe"] == "livestain train-bundled --robust"
    assert model.meta.extra["init"].startswith("bundled@")
    assert model.meta.extra["train_extent_um"] == 16.0  # the z window the worker predicts from
    assert set(metrics) == {"dna", "membrane", "mitochondria"}


# ------------------------------------------------------------------ per-structure loss weights


def test_structure_loss_weights_each_structures_squared_error() -> None:
    out = torch.zeros(2, 3, 2, 4, 4)
    target = torch.zeros_like(out)
    target[:, 0] = 1.0  # squared error 1 in dna, 4 in membrane, 0 in mitochondria
    target[:, 1] = 2.0
    assert float(train_mod.structure_loss(out, target)) == pytest.approx(5 / 3)
    assert float(train_mod.structure_loss(out, target, (1, 1, 1))) == pytest.approx(5 / 3)
    assert float(train_mod.structure_loss(out, target, (0, 1, 0))) == pytest.approx(4.0)
    assert float(train_mod.structure_loss(out, target, (1, 0, 3))) == pytest.approx(1 / 4)
    for bad in [(1, 1), (1, -1, 1), (0, 0, 0)]:
        with pytest.raises(ValueError, match="one per structure"):
            train_mod.structure_loss(out, target, bad)


def test_a_structure_weighted_zero_leaves_its_head_row_untouched(fields) -> None:
    """The weights reach the optimiser: with membrane weighted 0, Adam gets no gradient
    for membrane's row of the output head, so it keeps its initial values while dna's
    row moves; recorded in the settings, and left out of them when equal."""
    pairs = [f.as_pair() for f in fields]
    torch.manual_seed(0)
    init = UNet3D(tiny_cfg())
    before = init.head.weight.detach().clone()
    result = train(pairs[:2], [], tiny_cfg(), small_settings(6, structure_weights=(1.0, 0.0)), init=init)
    after = result.net.head.weight.detach()
    assert torch.equal(after[1], before[1])
    assert not torch.allclose(after[0], before[0])
    assert small_settings(1, structure_weights=(1.0, 0.0)).to_dict()["structure_weights"] == [1.0, 0.0]
    assert "structure_weights" not in small_settings(1).to_dict()

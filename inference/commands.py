"""``livestain train | predict | evaluate | export``: the inference subcommands as plain functions.

Each ``cmd_*`` takes the parsed ``argparse.Namespace`` and returns an exit code;
`register` adds their parsers to the main CLI's subparsers and binds each with
``set_defaults(func=...)``. Problems a user can fix (a missing file, a bad option, data
in the wrong layout) raise ValueError/OSError whose message names the fix; the CLI
prints those as one line. Heavy imports (torch, matplotlib) happen inside the commands
so ``livestain --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def parse_ints(text: str, n: int = 3, what: str = "Z,Y,X") -> tuple[int, ...]:
    """``"16,64,64"`` -> ``(16, 64, 64)``, positive integers only."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected {n} positive integers {what} like 16,64,64, got {text!r}")
    return values


def parse_floats(text: str) -> tuple[float, float, float]:
    """``"1,0.325,0.325"`` -> (z, y, x) in um, positive only."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a voxel size Z,Y,X in um like 1,0.325,0.325, got {text!r}")
    return values  # type: ignore[return-value]


def parse_structures(text: str) -> tuple[str, ...]:
    """``"dna,membrane"`` -> ``("dna", "membrane")``, no blanks or repeats."""
    names = tuple(s.strip() for s in text.split(","))
    if not names or any(not s for s in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated distinct structure names like dna,membrane, got {text!r}"
        )
    return names


def parse_field_names(text: str) -> tuple[str, ...]:
    """``"field003,field007"`` -> ``("field003", "field007")``, no blanks or repeats."""
    names = tuple(s.strip() for s in text.split(","))
    if not names or any(not s for s in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated distinct field names like field003,field007, got {text!r}")
    return names


class Progress:
    """One progress line with ETA: rewritten in place on a terminal, ~20 lines otherwise.

    ``label`` names the unit (``step`` for training, ``tile`` for a tiled prediction);
    a ``loss`` is shown when given.
    """

    def __init__(self, total: int, stream: TextIO | None = None, start: int = 0, label: str = "step") -> None:
        self.total = total
        self.start = start  # steps already done (a resumed run): not part of this run's rate
        self.stream = stream or sys.stdout
        self.label = label
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // 20)

    def __call__(self, step: int, loss: float | None = None) -> None:
        if not (self.tty or step % self.every == 0 or step == self.total):
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, step - self.start) * (self.total - step)
        shown = "" if loss is None else f" loss {loss:.4f}"
        line = f"{self.label} {step}/{self.total}{shown} elapsed {elapsed:.0f}s ETA {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def tile_progress(label: str = "predicting: tile", stream: TextIO | None = None) -> Callable[[int, int], None]:
    """An ``on_tile(done, total)`` callback printing a `Progress` line: a tiled prediction
    of a large stack runs for minutes on a CPU, and silence looks like a hang."""
    progress: Progress | None = None
    t0 = time.perf_counter()  # the prediction starts now: the first tile's time counts

    def on_tile(done: int, total: int) -> None:
        nonlocal progress
        if progress is None or progress.total != total:
            progress = Progress(total, stream=stream, label=label)
            progress.t0 = t0
        progress(done)

    return on_tile


# ---------------------------------------------------------------- train


#: ``--sim-pretrain``'s patch side (pixels) on the simulated fields.
SIM_PATCH_YX = 96


def _pretrain_on_simulated(args: argparse.Namespace, fields: list[Any], cfg: Any, settings: Any,
                           init_net: Any, device: str, n_fields: int) -> tuple[Any, dict[str, Any]]:
    """``--sim-pretrain``: train the network first on simulated fields shaped like the
    user's (their window's planes, evenly spaced at the voxel z size and centred on the
    truth's plane; their pixel size), at the from-scratch rate; (network, record)."""
    import dataclasses
    import time

    from .normalize import PercentileNorm
    from .train import TrainSettings, train

    vz, vy = float(fields[0].voxel_size_um[0]), float(fields[0].voxel_size_um[1])
    offsets = (np.arange(cfg.z_window) - (cfg.z_window - 1) / 2.0) * vz
    jitter = 1.0 if cfg.z_window > 1 else 3.0  # one plane: how well it is focused is unknown
    t0 = time.perf_counter()
    render = Progress(n_fields, label="simulating: field")
    pairs = args.simulate_like(offsets, vy, cfg.structures, n_fields, modality=args.sim_modality,
                               focus_jitter_um=jitter, seed=args.seed + 4242, on_field=lambda done, _: render(done))
    rendered = time.perf_counter() - t0
    # the simulated fields are large and many: the bench's batch of 8 patches of 96 x 96
    size = min(SIM_PATCH_YX, *pairs[0][0].shape[1:])
    pre = dataclasses.replace(settings, steps=args.sim_steps, lr=TrainSettings.lr, batch=max(settings.batch, 8),
                              patch=(settings.patch[0], size, size))
    print(f"pretraining on {n_fields} simulated {args.sim_modality} fields ({rendered:.0f} s to render; planes "
          f"{', '.join(f'{o:+.1f}' for o in offsets)} um from focus, {vy:g} um pixels): {pre.steps} steps at "
          f"lr {pre.lr:g}, then fine-tuning on your fields")
    bar = Progress(pre.steps, label="pretraining: step")
    result = train(pairs, [], cfg, pre, PercentileNorm(), on_step=lambda step, loss: bar(step, loss),
                   device=device, init=init_net)
    record = {"fields": n_fields, "steps": pre.steps, "lr": pre.lr, "modality": args.sim_modality,
              "offsets_um": [round(float(o), 4) for o in offsets], "pixel_um": vy, "focus_jitter_um": jitter,
              "seconds": round(rendered + result.seconds, 1)}
    return result.net, record


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model on a paired dataset folder (from scratch, or fine-tuning ``--init``)
    and save it with its provenance: the weights of its best validation, not its last step's."""
    import torch

    from livestain.stackio import MIN_YX

    from .checkpoint import ModelMeta, save_checkpoint
    from .dataset import fingerprint, load_fields, split_for_validation
    from .model import UNet3D, UNetConfig
    from .normalize import PercentileNorm
    from .predict import pick_device
    from .zwindow import training_geometry
    from .train import (TrainSettings, data_patch, data_steps, describe_architecture, plan_transfer,
                        resolve_precision, train)

    # options the user typed (the parser records them): the data-derived defaults and the
    # --init architecture note must tell a default from a choice; a Namespace built by
    # hand (no record) counts every value as chosen, which is the behaviour before them
    given = getattr(args, "given", None)

    def chose(dest: str) -> bool:
        return given is None or dest in given

    if args.steps < 1 or args.batch < 1 or args.depth < 1 or args.base_channels < 1:
        raise ValueError("--steps, --batch, --depth and --base-channels must be at least 1")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if min(args.intensity, args.gamma, args.noise) < 0 or args.z_shift < 0:
        raise ValueError("--intensity, --gamma, --noise and --z-shift must not be negative")
    if args.val_every is not None and args.val_every < 1 or args.save_every < 0:
        raise ValueError("--val-every must be at least 1 and --save-every at least 0")
    lr, patience = getattr(args, "lr", None), getattr(args, "patience", None)
    if lr is not None and not lr >= 0 or patience is not None and patience < 0:
        raise ValueError("--lr and --patience must not be negative (--patience 0: no early stopping)")
    init = load_init(args.init) if getattr(args, "init", None) else None
    init_net = init.net if init is not None else None
    depth = init.meta.config.depth if init is not None else args.depth
    fields = load_fields(args.data, args.structures, args.voxel_size, min_yx=max(MIN_YX, 2**depth))
    _check_voxel_sizes(fields)
    flattened = False
    if init is not None and init.meta.config.mode == "3d" and (
            any(f.planar for f in fields) or chose("mode") and args.mode == "2.5d"):
        # single-plane truth needs a 2.5D network: start one from the 3D model's kernels
        # summed over z (inference.flatten), with the window the user chose
        from .flatten import flatten_to_2_5d

        window = args.z_window if args.z_window is not None else min(f.brightfield.shape[0] for f in fields)
        init_net = flatten_to_2_5d(init.net, window, args.target_2d)
        flattened = True
        why = "this truth is single planes" if any(f.planar for f in fields) else "--mode 2.5d asks for a 2.5D one"
        source = "--z-window" if args.z_window is not None else "the planes of the smallest stack; --z-window to choose"
        print(f"note: --init {init.name} is a 3D model and {why}: starting a 2.5D network of its depth and "
              f"width, {window}-plane window ({source}), from its 3D kernels summed over z, trained at the "
              "from-scratch rate and length (a starting point for features, not a model to stay close to)")
    sim_fields = getattr(args, "sim_pretrain", 0) or 0
    if sim_fields < 0 or getattr(args, "sim_steps", 1) < 1:
        raise ValueError("--sim-pretrain must not be negative and --sim-steps must be at least 1")
    # a network that has learnt something before the user's fields (a model to fine-tune,
    # or one trained on simulated fields first) gets a fine-tune's rate and patience; after
    # simulated fields it is far from the real data's solution still, so it keeps the
    # from-scratch length (what bench/transfer.py measured: 400 steps at a quarter rate)
    pretrained = init is not None and not flattened or sim_fields > 0
    if patience is None:
        # Early stopping by default only for a fine-tune: it starts near a good solution,
        # and on a few fields its validation r typically peaks early and then slides as it
        # overfits. From scratch the cosine schedule's low-rate second half is where r
        # still climbs (the bundled recipe's rose at every validation to the end), and a
        # plateau in the high-rate first half is no reason to stop; a flattened 3D model
        # starts far from any solution, as from scratch.
        patience = 5 if pretrained else 0
    if init is not None:
        c0 = init_net.config  # a fine-tune keeps the architecture its weights belong to
        mode, depth, base_channels, z_window, target_2d = c0.mode, c0.depth, c0.base_channels, c0.z_window, c0.target_2d
        ignored = [f"--{dest.replace('_', '-')} {mine}" for dest, mine, theirs in (
            ("mode", args.mode, mode), ("depth", args.depth, depth), ("base_channels", args.base_channels, base_channels),
            ("z_window", args.z_window, z_window), ("target_2d", args.target_2d, target_2d),
        ) if chose(dest) and mine is not None and mine != theirs]
        if ignored:
            print(f"note: the architecture comes from --init {init.name} ({describe_architecture(c0)}); "
                  f"ignoring {', '.join(ignored)}")
    else:
        mode, depth, base_channels, target_2d = args.mode, args.depth, args.base_channels, args.target_2d
        z_window = args.z_window if args.z_window is not None else (5 if mode == "2.5d" else 1)
        if mode == "3d" and z_window != 1:
            raise ValueError("--z-window is for --mode 2.5d; a 3D model takes the whole stack")
    if sim_fields and not (mode == "2.5d" and all(f.planar or f.targets.shape[1] == 1 for f in fields)):
        raise ValueError("--sim-pretrain renders single-plane truth for a 2.5D model: the structures in "
                         f"{args.data} are stacks (or pass --mode 2.5d for one-plane fields); drop --sim-pretrain")
    if sim_fields and getattr(args, "simulate_like", None) is None:
        raise ValueError("--sim-pretrain needs the simulator: run it through the livestain command")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    if mode == "3d" and any(f.planar for f in fields):
        raise ValueError(
            f"the structures in {args.data} are single planes (YX) beside brightfield stacks: "
            "train a 2.5D model on them (--mode 2.5d --z-window N)"
        )
    trn, val, note = split_for_validation(fields, args.val_fields, args.val_fraction, args.seed,
                                          min_yx=max(MIN_YX, 2**depth))
    if note:
        print(note)
    smallest = np.min([f.brightfield.shape for f in trn], axis=0)  # patches come from these only
    if chose("patch"):
        patch = tuple(int(min(p, s)) for p, s in zip(args.patch, smallest))
        if mode == "2.5d":
            patch = (z_window, *patch[1:])  # the z of a 2.5D patch is its window
        if patch[1:] != tuple(args.patch)[1:] or (mode == "3d" and patch != tuple(args.patch)):
            print(f"note: patch {tuple(args.patch)} larger than the smallest field {tuple(smallest)}; using {patch}")
    else:
        patch, why = data_patch(smallest, depth, mode, z_window)
        print(f"patch {'x'.join(map(str, patch))}: {why} (--patch to choose)")
    if chose("steps"):
        steps = args.steps
    else:
        max_projection = mode == "2.5d" and target_2d == "max"
        voxels = sum(f.targets[0][0].size if max_projection and not f.planar else f.targets[0].size for f in trn)
        steps, why = data_steps(voxels, args.batch, patch, mode, finetune=pretrained and not sim_fields)
        print(f"steps {steps}: {why} (--steps to choose)")
    if lr is None:
        # A fine-tune's default is a quarter of the from-scratch rate: Adam's first steps
        # move every weight by about lr whatever the gradient, and at the full rate those
        # first steps on a few fields would undo much of what the initial model learnt.
        lr = TrainSettings.lr / 4 if pretrained else TrainSettings.lr
        if pretrained:
            print(f"lr {lr:g}: a fine-tune, a quarter of the {TrainSettings.lr:g} used from scratch (--lr to choose)")
    cfg = UNetConfig(structures=tuple(args.structures), depth=depth, base_channels=base_channels,
                     mode=mode, z_window=z_window, target_2d=target_2d)
    settings = TrainSettings(
        steps=steps, patch=patch, batch=args.batch, lr=lr, seed=args.seed,  # type: ignore[arg-type]
        intensity=args.intensity, gamma=args.gamma, noise=args.noise, z_shift=args.z_shift,
        precision=precision,
    )
    if init is not None:
        with torch.device("meta"):  # the names and shapes alone, nothing allocated
            shapes = {k: v.shape for k, v in UNet3D(cfg).state_dict().items()}
        plan = plan_transfer(shapes, {k: v.shape for k, v in init_net.state_dict().items()},
                             cfg.structures, c0.structures)
        print(f"fine-tuning {init.name} ({', '.join(c0.structures)}): {plan.describe()}")
        if not np.allclose(fields[0].voxel_size_um, init.meta.voxel_size_um, rtol=0.02):
            print(f"note: your data's voxel size {tuple(fields[0].voxel_size_um)} um differs from "
                  f"{init.name}'s {tuple(init.meta.voxel_size_um)} um; the fine-tuned model is for yours "
                  "(resample the data to the initial model's voxel size for the closest transfer)")
    fp = fingerprint(args.data)
    out_path = Path(args.out).with_suffix(".safetensors")
    state_path = training_state_path(out_path)
    if state_path.exists() and not args.resume:
        print(f"note: {state_path} (an earlier run's training state) will be overwritten; "
              "pass --resume to continue it instead")
    shape = f"{cfg.z_window}-plane window, {patch[1]}x{patch[2]}" if cfg.mode == "2.5d" else "x".join(map(str, patch))
    print(
        f"training {', '.join(cfg.structures)} on {len(trn)} field(s), validating on {len(val)}"
        f"{' (' + ', '.join(f.name for f in val) + ')' if val else ''}; "
        f"{settings.steps} steps of {settings.batch} x {shape} patches; {cfg.mode} U-Net depth {cfg.depth}, "
        f"{cfg.base_channels} base channels; {precision} on {device}"
    )
    if patience and not val:
        print("note: no validation fields, so no early stopping (--patience) and the last step's weights are saved")
    torch.manual_seed(args.seed)
    sim_record: dict[str, Any] = {}
    if sim_fields and args.resume and state_path.exists():
        print(f"note: resuming {state_path}: its weights already hold the simulated pretraining, skipped")
    elif sim_fields:
        init_net, sim_record = _pretrain_on_simulated(args, fields, cfg, settings, init_net, device, sim_fields)
    progress: Progress | None = None

    def on_step(step: int, loss: float) -> None:
        nonlocal progress
        if progress is None:  # made at the first step run, so a resumed run's ETA is right
            progress = Progress(settings.steps, start=step - 1)
        progress(step, loss)

    result = train(
        [f.as_pair() for f in trn],
        [f.as_pair() for f in val],
        cfg,
        settings,
        PercentileNorm(),
        on_step=on_step,
        val_every=args.val_every or max(1, settings.steps // 10),
        device=device,
        state_path=state_path,
        save_every=args.save_every,
        resume=args.resume,
        init=init_net,
        keep_best=True,
        patience=patience,
    )
    if progress is not None and progress.tty and result.steps_run != settings.steps:
        print()  # the progress line ends its line only at the last step
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from} of {settings.steps} ({state_path})")
    if result.stopped_early_at is not None:
        print(f"stopped early at step {result.stopped_early_at} of {settings.steps}: the mean validation r has "
              f"not improved on step {result.best_step}'s for {patience} validations (--patience)")
    val_pearson = result.best_val_pearson  # the saved weights' own scores
    extra: dict[str, Any] = {}
    if sim_record:
        extra["sim_pretrain"] = sim_record
    if init is not None:
        extra["init"] = {"model": init.name, "path": str(init.path.resolve()), "flattened_from_3d": flattened,
                         **(result.transfer.to_dict() if result.transfer else {})}
        before = next((h["val_pearson"] for h in result.history if h["step"] == 0), None)
        if before:
            print(f"{init.name} before fine-tuning: validation Pearson r "
                  + ", ".join(f"{s} {r:.3f}" for s, r in before.items()))
    meta = ModelMeta(
        config=cfg,
        norm=PercentileNorm(),
        voxel_size_um=fields[0].voxel_size_um,
        extra={
            "recipe": "livestain train",
            "settings": settings.to_dict(),
            "data": {
                "path": str(Path(args.data).resolve()),
                "fingerprint": fp,
                "train_fields": [f.name for f in trn],
                "val_fields": [f.name for f in val],
            },
            **extra,
            "val_pearson": val_pearson,
            "best_step": result.best_step,
            "steps_run": result.steps_run,
            "stopped_early_at": result.stopped_early_at,
            "patience": patience,
            "train_seconds": round(result.seconds, 1),
            # the z window the worker predicts from (inference.zwindow)
            **training_geometry([f.brightfield for f in trn], fields[0].voxel_size_um[0]),
            "resumed_from_step": result.resumed_from,
            "device": device,
            "history": result.history,
        },
    )
    if val:
        _calibrate_uncertainty(result.net, meta, out_path, val, device)
    if cfg.mode == "2.5d":
        _record_signature(result.net, meta, trn)
    path = save_checkpoint(out_path, result.net.cpu(), meta)
    curve = save_curve(path.with_suffix(".curve.png"), result.losses, result.history, cfg.structures)
    if val_pearson:
        summary = (", ".join(f"{s} {r:.3f}" for s, r in val_pearson.items())
                   + f" (mean {result.best_score:.3f}) at step {result.best_step} (of {result.steps_run} run)")
        if result.best_step == 0:
            summary += f": fine-tuning did not improve on {init.name if init else 'the initial model'}"
    else:
        summary = "n/a (no validation fields: the last step's weights)"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {curve}; "
          f"{result.seconds:.0f} s; best validation Pearson r: {summary}")
    return 0


def _record_signature(net: Any, meta: Any, fields: list) -> None:
    """Record what the training fields look like to the model (`inference.signature`),
    so the input checks can say when a stack does not."""
    from .signature import KEY, fit_signature, model_window

    windows = [model_window(f.brightfield, meta.config, meta.norm, meta.voxel_size_um) for f in fields]
    meta.extra[KEY] = signature = fit_signature(net, windows)
    print(f"input signature recorded from {signature['tiles']} tiles of the training fields: stacks unlike them "
          "will be flagged unlike_training")


def _calibrate_uncertainty(net: Any, meta: Any, out_path: Path, val: list, device: str) -> None:
    """Fit the model's own uncertainty scale on its validation fields
    (`inference.calibrate`) into ``meta``, and say what it is beside the bundled model's."""
    from .calibrate import calibrate
    from .checkpoint import LoadedModel
    from .predict import Predictor
    from .uncertainty import CALIBRATION_KEY, ERROR_PER_STD

    t0 = time.perf_counter()
    predictor = Predictor(LoadedModel(net, meta, out_path, "unsaved"), device)
    try:
        cal = calibrate(predictor, val)
    except ValueError as e:
        print(f"note: uncertainty not calibrated ({e}); --uncertainty will use the bundled model's scale")
        return
    meta.extra[CALIBRATION_KEY] = cal
    bundled = ERROR_PER_STD.get(cal["method"], {})
    scales = ", ".join(f"{s} {k:.3g}" + (f" (bundled {bundled[s]:.3g})" if s in bundled else "")
                       for s, k in cal["error_per_std"].items())
    print(f"uncertainty calibrated on {cal['fields']} validation field(s) in {time.perf_counter() - t0:.0f} s: "
          f"expected |error| per unit of spread {scales}; confidence halves at mean uncertainty "
          + ", ".join(f"{s} {u:.3g}" for s, u in cal["u_half"].items()))


def load_init(text: str) -> Any:
    """The model ``--init`` names (``bundled``: the bundled model), as a `LoadedModel`;
    a ValueError naming the file and the fix when it is missing or not a livestain model."""
    from .checkpoint import CheckpointError, load_checkpoint

    if text == "bundled":
        return load_checkpoint(None, "cpu")
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"--init {path}: no such model file{' (it is a folder)' if path.is_dir() else ''}. Give the "
            ".safetensors model to fine-tune (one `livestain train` wrote), or --init bundled for the "
            "bundled model"
        )
    try:
        return load_checkpoint(path, "cpu")
    except CheckpointError as e:
        raise ValueError(f"--init {path}: {e}") from None


def training_state_path(model_path: str | Path) -> Path:
    """Where ``livestain train --out MODEL`` keeps its resumable training state:
    ``MODEL.state.safetensors`` beside the model (weights + optimiser + step; no pickle)."""
    p = Path(model_path).with_suffix(".safetensors")
    return p.with_name(p.stem + ".state.safetensors")


def _check_voxel_sizes(fields: Sequence[Any]) -> None:
    """One model learns one voxel size: mixed data would blur what it learns."""
    first = np.asarray(fields[0].voxel_size_um)
    for f in fields[1:]:
        if not np.allclose(f.voxel_size_um, first, rtol=0.02):
            raise ValueError(
                f"{f.name} has voxel size {f.voxel_size_um} um but {fields[0].name} has "
                f"{tuple(first)}; one model learns one voxel size: resample the data or train "
                "on fields of one voxel size"
            )


def save_curve(path: Path, losses: Sequence[float], history: Sequence[dict], structures: Sequence[str]) -> Path:
    """PNG of the training loss per step and the validation Pearson r per structure."""
    from .evaluate import agg_figure

    fig = agg_figure()
    fig.set_size_inches(9, 3.5)
    ax_loss, ax_r = fig.subplots(1, 2)
    steps = np.arange(1, len(losses) + 1)
    ax_loss.plot(steps, losses, lw=0.6, alpha=0.5, label="loss")
    k = len(losses) // 20
    if k >= 2:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax_loss.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("MSE loss (z-score units)")
    ax_loss.legend(fontsize=8)
    if history:
        hs = [h["step"] for h in history]
        for s in structures:
            ax_r.plot(hs, [h["val_pearson"][s] for h in history], marker="o", label=s)
        ax_r.legend(fontsize=8)
    else:
        ax_r.text(0.5, 0.5, "no validation fields", ha="center", va="center", transform=ax_r.transAxes)
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("validation Pearson r")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


# ---------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every structure of a model for one brightfield stack (any format of
    `formats`); writes a CZYX OME-TIFF (2.5D models: Z=1), one named channel per structure."""
    from livestain.stackio import as_zyx, validate_stack, write_stack

    from .dataset import read_voxel_size
    from .formats import read_image
    from .predict import Predictor
    from .structures import canonical

    src, out = Path(args.input), Path(args.out)
    if not src.exists():
        raise ValueError(f"input stack {src} does not exist; give a ZYX brightfield OME-TIFF")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the input file; choose another name for the prediction")
    stack, info = read_image(src)
    stack = as_zyx(stack)
    if stack.ndim != 3:
        raise ValueError(
            f"{src} has shape {np.shape(stack)}; predict takes one ZYX brightfield stack: "
            "save a single channel and time point (e.g. Fiji: Image > Duplicate)"
        )
    voxel = tuple(args.voxel_size) if args.voxel_size else read_voxel_size(src)
    predictor = Predictor(args.model, args.device)
    validate_stack(stack, src, min_yx=predictor.min_yx)
    t0 = time.perf_counter()
    if not predictor.is_2_5d and (args.slide or args.z_centre is not None):
        raise ValueError("--slide and --z-centre are for 2.5D models; this model is 3D (it predicts every plane)")
    kw = dict(tile=args.tile, slide=args.slide, z_centre=args.z_centre, on_tile=tile_progress())
    channels = list(predictor.structures)
    extra: dict[str, Any] = {}
    unc = None
    if args.uncertainty:
        from .uncertainty import DEFAULT_METHOD, DEFAULT_PASSES

        if args.tta:
            print("note: --uncertainty already averages over y/x symmetries; --tta is not applied on top")
        mean, unc = predictor.predict_with_uncertainty(stack, voxel, **kw)
        pred = np.concatenate([mean, unc])
        channels += [f"{s}_uncertainty" for s in predictor.structures]
        extra = {"uncertainty": {"method": DEFAULT_METHOD, "passes": DEFAULT_PASSES,
                                 "units": "expected absolute error, z-score units"}}
    else:
        pred = predictor.predict(stack, voxel, tta=args.tta, **kw)
    seconds = time.perf_counter() - t0
    # the input checks always run (numpy, well under a second): a stack the model cannot
    # read (one plane for a 3D model, far out of focus...) is said, not silently predicted;
    # after the prediction, so they compare with the bundled model it was routed to
    from .ood import check_stack, model_expectations, stack_confidence
    from .signature import Likeness, check_likeness
    from .uncertainty import own_u_half

    checks = check_stack(stack, voxel, **model_expectations(predictor.model.meta, predictor.focus_window))
    check_likeness(checks, Likeness.of(predictor.model), stack, voxel)
    confidence = stack_confidence(unc, predictor.structures, checks, u_half=own_u_half(predictor.model.meta))
    extra.update(confidence.to_dict(), checks=checks.stats)
    write_stack(
        out,
        pred.astype(np.float32, copy=False),
        voxel_size_um=voxel,
        channel_names=channels,
        info={
            "kind": "prediction",
            "source": str(src.resolve()),
            "source_info": info,
            "structures": list(predictor.structures),
            "canonical_structures": [canonical(s) for s in predictor.structures],
            # tifffile drops length-1 axes on reading: the shape lets read_stack give a
            # 2.5D model's (s, 1, y, x) or a one-structure (1, z, y, x) back as written
            "shape": list(pred.shape),
            "units": "z-score",
            "model": predictor.model.name,
            "tile": list(args.tile) if args.tile else None,
            "tta": bool(args.tta) and not args.uncertainty,
            "mode": predictor.model.meta.config.mode,
            "slide": bool(args.slide),
            "inference_s": round(seconds, 3),
            "device": predictor.device,
            **extra,
        },
    )
    print(f"wrote {out}: {', '.join(channels)} x {pred.shape[1:]} in {seconds:.2f} s "
          f"on {predictor.device} with {predictor.model.name}")
    per = ", ".join(f"{s} {c:.2f}" for s, c in extra["confidence_per_structure"].items())
    source = "uncertainty and input checks" if unc is not None else "input checks only; --uncertainty for more"
    print(f"confidence {extra['confidence']:.2f} ({per}; {source})")
    for reason in extra["flag_reasons"]:
        print(f"flag: {reason}")
    return 0


# ---------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics (and optionally figures) of a model on a paired dataset folder."""
    from .checkpoint import load_checkpoint
    from .dataset import available_structures, field_files, fingerprint, load_fields
    from .evaluate import evaluate_model
    from .predict import Predictor, pick_device
    from .structures import canonical, match

    device = pick_device(args.device)
    model = load_checkpoint(args.model, device)
    fields_on_disk = field_files(args.data)
    have = set(available_structures(fields_on_disk[0][1]))
    # a model's structure is scored on the data's under its name or an alias (dapi: dna)
    matched = match(model.meta.config.structures, have)
    for _, files in fields_on_disk[1:]:
        found = match(list(matched), available_structures(files))
        matched = {s: d for s, d in matched.items() if s in found}
    structures = list(matched)
    if not structures:
        raise ValueError(
            f"the fields in {args.data} share no structure with the model "
            f"({', '.join(model.meta.config.structures)}; data has {', '.join(sorted(have)) or 'none'}): "
            "evaluate on data with the model's structures"
        )
    predictor = Predictor(model, device)
    fields = load_fields(args.data, structures, args.voxel_size, min_yx=predictor.min_yx)
    report = evaluate_model(predictor, fields, args.figures, tile=args.tile, tta=args.tta)
    report["data"] = {"path": str(Path(args.data).resolve()), "fingerprint": fingerprint(args.data)}
    aliased = {s: d for s, d in matched.items() if s != d}
    report["matched"] = aliased  # model structure -> the data's name for it, where they differ
    trained_on = model.meta.extra.get("data", {}).get("fingerprint")
    report["same_data_as_training"] = trained_on == report["data"]["fingerprint"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {len(fields)} field(s) of {args.data}")
    for s, d in aliased.items():
        print(f"note: the model's {s} is scored against the data's {d} (both name {canonical(s)})")
    if report["same_data_as_training"]:
        print("warning: this is the model's training dataset; the numbers are optimistic")
    print(f"{'structure':<14}{'pearson':>9}{'ssim':>9}{'nrmse':>9}")
    for s, m in report["mean"].items():
        print(f"{s:<14}{m['pearson']:>9.3f}{m['ssim']:>9.3f}{m['nrmse']:>9.3f}")
    if report["figures"]:
        print(f"figures: {Path(report['figures'][0]).parent}/ ({len(report['figures'])} PNG)")
    return 0


# ---------------------------------------------------------------- export


def _export_run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from livestain.run_export import export_ome_tiff

    run = Path(args.model)
    if not (run / "journal.sqlite").is_file():
        raise ValueError(f"{run} is not a livestain run folder (no journal.sqlite): --format ome-tiff "
                         "exports a run; give the folder a run wrote (its out:)")
    with Progress(transient=True) as bar:
        task = bar.add_task(f"exporting {run.name}", total=None)
        report = export_ome_tiff(run, args.out, progress=lambda done, total: bar.update(task, completed=done,
                                                                                           total=total))
    if args.json:
        print(json.dumps({"format": "ome-tiff", "out": str(args.out), **vars(report)}, indent=2))
    else:
        kept = f" ({report.kept} already there from an earlier export)" if report.kept else ""
        print(f"wrote {report.written} OME-TIFF files, {report.bytes / 1e6:.1f} MB, to {args.out}{kept}: "
              "open them in Fiji (File > Open) or napari")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model to ONNX (checked with onnxruntime) or a bioimage.io package, or a
    run to OME-TIFF files."""
    if args.format == "ome-tiff":
        return _export_run(args)
    from .checkpoint import load_checkpoint
    from .export import build_bioimageio, check_onnx, export_onnx

    model = load_checkpoint(args.model, "cpu")
    out = Path(args.out)
    if args.format == "onnx":
        if out.suffix != ".onnx":
            raise ValueError(f"--out {out}: an ONNX model file should end in .onnx")
        export_onnx(model, out)
        check = check_onnx(model, out)
        report: dict[str, Any] = {"format": "onnx", "path": str(out), "check": check.to_dict()}
        text = (f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): input {check_input_text(model)}; "
                f"onnxruntime {check.onnxruntime} vs torch, max abs difference {check.max_abs_diff:.2e} "
                f"(output std {check.output_std:.2f}) over shapes {', '.join(check.shapes)}")
    else:
        report = {"format": "bioimageio", **build_bioimageio(model, out, authors=args.author or None,
                                                            license=args.license)}
        v = report["validation"]
        text = (f"wrote bioimage.io package {report.get('zip', report['folder'])}: ONNX vs torch max abs "
                f"difference {report['onnx']['max_abs_diff']:.2e}; validation ({v['tool'] or 'none'}): "
                f"{v['status']}" + (f" ({'; '.join(v['errors'])})" if v["errors"] else ""))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(text)
    failed = report.get("validation", {}).get("status") == "failed"
    return 1 if failed else 0


def check_input_text(model: Any) -> str:
    cfg = model.meta.config
    if cfg.mode == "3d":
        return f"(1, 1, Z, Y, X) raw brightfield, Z, Y, X >= {2**cfg.depth}"
    return f"(1, {cfg.net_in_channels}, Y, X) raw brightfield planes, Y, X >= {2**cfg.depth}"


# ---------------------------------------------------------------- parsers


class _Given(argparse.Action):
    """Store an option's value and record its name in ``namespace.given``: `cmd_train`
    derives --steps and --patch from the data and takes the architecture from --init
    unless the user chose them, and a default value alone cannot tell it which."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = frozenset({*getattr(namespace, "given", ()), self.dest})


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``predict``, ``evaluate`` and ``export`` to the main parser's subcommands."""
    p = subparsers.add_parser("train", help="train a model on a paired dataset folder",
                              description="Train a 3D (or 2.5D) U-Net on DATA/fieldNNN/{brightfield,<structure>}.ome.tif "
                                          "(or .tif, .zarr, or a folder of .png z-planes per channel; "
                                          "structure names match their aliases, e.g. dapi for dna).")
    p.add_argument("data", type=Path, metavar="DATA", help="dataset folder (fieldNNN/ subfolders)")
    p.add_argument("--structures", type=parse_structures, required=True,
                   help="comma-separated structures to learn, e.g. dna,membrane,mitochondria")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL", help="model file to write (.safetensors)")
    p.add_argument("--init", default=None, metavar="MODEL0",
                   help="fine-tune from this model (.safetensors, or 'bundled' for the bundled model): its "
                        "architecture and weights are the start; structures it lacks get a fresh output head "
                        "row; a 3D model on single-plane truth (or with --mode 2.5d) starts a 2.5D network from "
                        "its kernels summed over z (default: train from scratch)")
    p.add_argument("--steps", type=int, default=600, action=_Given,
                   help="optimiser steps (default: from the data, ~16 passes over the training voxels within "
                        "300-3000; with --init ~4 passes within 100-750)")
    p.add_argument("--patch", type=parse_ints, default=(16, 64, 64), metavar="Z,Y,X", action=_Given,
                   help="training patch size (default: 16,64,64 fitted to the smallest training stack, y/x "
                        "multiples of 2**depth)")
    p.add_argument("--batch", type=int, default=4, help="patches per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: 2e-3; with --init 5e-4)")
    p.add_argument("--patience", type=int, default=None, metavar="N",
                   help="stop when the mean validation Pearson r has not improved for N validations; the "
                        "saved model is always the best validation's (default: 5 with --init, else 0: "
                        "never stop early)")
    p.add_argument("--depth", type=int, default=2, action=_Given, help="U-Net levels (default: %(default)s)")
    p.add_argument("--base-channels", type=int, default=8, action=_Given,
                   help="channels of the first level (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of fields held out for validation, at random (seeded by --seed); with a "
                        "single field, the share of its y rows held out: the last rows validate, patches "
                        "come only from the rows before them (default: %(default)s; 0: no validation)")
    p.add_argument("--val-fields", type=parse_field_names, default=None, metavar="NAME[,NAME]",
                   help="validate on these fields (folder names, e.g. field003,field007) and train on "
                        "the others; overrides --val-fraction")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, patches and weights (default: %(default)s)")
    p.add_argument("--mode", choices=("3d", "2.5d"), default="3d", action=_Given,
                   help="3d: stack in, stack out; 2.5d: a window of planes in, one plane out (default: %(default)s)")
    p.add_argument("--z-window", type=int, default=None, metavar="N", action=_Given,
                   help="2.5d: planes the model sees (default: 5); the z of --patch is ignored")
    p.add_argument("--target-2d", choices=("plane", "max"), default="plane", action=_Given,
                   help="2.5d with stack targets: learn the centre plane of each window, or the max "
                        "projection (default: %(default)s; single-plane targets are used as they are)")
    p.add_argument("--intensity", type=float, default=0.1,
                   help="augmentation: input scaled by 1 +- a and shifted by +- a (default: %(default)s; 0: off)")
    p.add_argument("--gamma", type=float, default=0.2,
                   help="augmentation: input gamma within 1/(1+g) .. 1+g (default: %(default)s; 0: off)")
    p.add_argument("--noise", type=float, default=0.03,
                   help="augmentation: Gaussian noise up to this sd, normalised units (default: %(default)s)")
    p.add_argument("--z-shift", type=int, default=0,
                   help="augmentation: shift the input against the target by up to N planes (default: 0)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision; auto: bf16 where the CPU/GPU has it natively, fp16 on "
                        "older GPUs, else fp32 (default: %(default)s)")
    p.add_argument("--val-every", type=int, default=None, metavar="N",
                   help="validation Pearson r every N steps (default: steps/10)")
    p.add_argument("--save-every", type=int, default=100, metavar="N",
                   help="save the resumable training state (MODEL.state.safetensors) every N steps "
                        "(default: %(default)s; 0: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from MODEL.state.safetensors (same data and options)")
    p.add_argument("--sim-pretrain", type=int, default=0, metavar="N",
                   help="first train on N simulated fields shaped like yours (your window's planes, evenly "
                        "spaced at your z step and centred on the truth's plane; your pixel size), then "
                        "fine-tune on your fields; single-plane truth only; 16 is what was measured "
                        "(docs/transfer.md) (default: 0, off)")
    p.add_argument("--sim-modality", choices=("brightfield", "phase", "dic"), default="brightfield",
                   help="--sim-pretrain: the simulated transmitted-light contrast (dic stands for oblique "
                        "light too) (default: %(default)s)")
    p.add_argument("--sim-steps", type=int, default=600,
                   help="--sim-pretrain: steps on the simulated fields (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    _voxel_size_arg(p, "voxel size in um of every field, needed when the files have no OME "
                       "metadata (default: from each brightfield file)")
    p.set_defaults(func=cmd_train, given=frozenset())

    p = subparsers.add_parser("predict", help="predict structures for one brightfield stack",
                              description="Write a CZYX float32 OME-TIFF, one named channel per structure (z-score "
                                          "units; 2.5D models: Z=1 unless --slide).")
    p.add_argument("model", metavar="MODEL", help="model .safetensors")
    p.add_argument("input", type=Path, metavar="INPUT",
                   help="ZYX brightfield stack: OME-TIFF, ImageJ or plain TIFF, OME-Zarr, a .png plane "
                        "or a folder of .png z-planes (TIFF without calibration and PNG need --voxel-size)")
    p.add_argument("--out", type=Path, required=True, metavar="OUTPUT", help="prediction OME-TIFF to write")
    _predict_args(p)
    _voxel_size_arg(p, "voxel size in um when INPUT has no OME metadata (default: from INPUT)")
    p.add_argument("--slide", action="store_true",
                   help="2.5d models: predict every plane from the window centred on it (default: one "
                        "plane, from the window centred in the stack)")
    p.add_argument("--z-centre", type=int, default=None, metavar="Z",
                   help="2.5d models: centre the window on this plane (default: the middle plane)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write a per-voxel uncertainty per structure (channels <structure>_uncertainty: "
                        "the spread over the 8 y/x rotations and flips, as an expected absolute error; 8x "
                        "slower; the structures are then their mean) and record a per-stack confidence and "
                        "input-check flags in the file's header")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("export", help="export a model to ONNX or a bioimage.io package, or a run "
                                             "to OME-TIFF files",
                              description="A model: ONNX (normalisation included, dynamic Z/Y/X, checked against "
                                          "torch with onnxruntime) or a bioimage.io model package (rdf.yaml, ONNX "
                                          "weights, test tensors; validated when bioimageio.spec is installed; "
                                          "needs: pip install onnx onnxruntime [bioimageio.spec]). A run: "
                                          "--format ome-tiff writes one OME-TIFF per stack and prediction, "
                                          "for Fiji (the run is only read).")
    p.add_argument("model", metavar="MODEL|RUN", help="model .safetensors, or a run folder (ome-tiff)")
    p.add_argument("--format", choices=("onnx", "bioimageio", "ome-tiff"), required=True)
    p.add_argument("--out", type=Path, required=True, metavar="PATH",
                   help="onnx: FILE.onnx; bioimageio: a folder, or FILE.zip; ome-tiff: a folder")
    p.add_argument("--author", action="append", default=None, help="bioimageio: an author name (repeatable)")
    p.add_argument("--license", default="BSD-3-Clause",
                   help="bioimageio: SPDX licence of the model (default: %(default)s; mind the training data's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("evaluate", help="score a model on a paired dataset folder",
                              description="Pearson r, SSIM and NRMSE per structure (z-score units).")
    p.add_argument("model", metavar="MODEL", help="model .safetensors")
    p.add_argument("data", type=Path, metavar="DATA", help="dataset folder (fieldNNN/ subfolders)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--figures", type=Path, default=None, metavar="DIR",
                   help="write one PNG per field (middle plane: brightfield | prediction | truth)")
    _predict_args(p)
    _voxel_size_arg(p, "voxel size in um of every field, needed when the files have no OME "
                       "metadata (default: from each brightfield file)")
    p.set_defaults(func=cmd_evaluate)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=parse_ints, default=None, metavar="Z,Y,X",
                   help="predict in blended tiles of this size (default: only when memory requires; "
                        "2.5d models tile in Y,X and ignore Z)")
    p.add_argument("--tta", action="store_true", help="average over y/x flips (4x slower, smoother)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")


def _voxel_size_arg(p: argparse.ArgumentParser, text: str) -> None:
    """``--voxel-size Z,Y,X``: a plain TIFF has no physical size, and guessing one would
    silently rescale every prediction (the data are resampled to the model's voxels)."""
    p.add_argument("--voxel-size", type=parse_floats, default=None, metavar="Z,Y,X", help=text)

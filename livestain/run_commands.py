"""The commands that run, watch and check acquisitions: ``demo``, ``run``, ``worker``,
``view``, ``status``/``pause``/``resume``/``stop``, ``keys``, ``audit``, ``check-config``
and ``train-bundled``.

Registered like every other group of commands (`register` adds the subcommands, each
with its handler as ``func``); `livestain.cli` fronts them all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from livestain import wire

def worker_count(text: str) -> int:
    """Local workers for a run: 1 to 16 (`RunConfig.worker.count`)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if not 1 <= count <= 16:
        raise argparse.ArgumentTypeError(f"{count} workers: a run takes 1 to 16 local workers")
    return count


def port_number(text: str) -> int:
    """A base port: the daemon uses it and the next three, all of them real TCP ports.

    Without the check ``--port 70000`` bound a port 65536 lower without a word.
    """
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1024 <= port <= 65532:
        raise argparse.ArgumentTypeError(
            f"{port} is outside 1024-65532 (the daemon uses this port and the next three)")
    return port


def _connect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default=wire.DEFAULT_HOST, metavar="HOST",
                   help="host of the daemon (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=wire.DEFAULT_BASE_PORT,
                   help="daemon base port; it uses this and the next three (default: %(default)s)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE key folder from `livestain keys` (needed beyond 127.0.0.1)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the commands that run, watch and check acquisitions to the main parser."""
    p = sub.add_parser("demo", help="run the whole loop on the simulated microscope with the bundled model")
    p.add_argument("--headless", action="store_true", help="no window: one status line per stack")
    p.add_argument("--timepoints", type=int, default=5, help="time points to acquire (default: %(default)s)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between time points (default: %(default)s)")
    p.add_argument("--positions", type=int, default=1, help="stage positions (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="dataset folder (default: ./livestain-demo/<time>)")
    p.add_argument("--model", default=None, help="model .safetensors (default: the bundled model)")
    p.add_argument("--device", default=None, help="torch device for the worker (default: cuda if present, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="sample seed of the simulated scope")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after a crash")
    p.add_argument("--storage", choices=("zarr", "tiff"), default="zarr",
                   help="zarr: one OME-Zarr image per position for raw and one for predictions (napari: "
                        "`napari OUT`); tiff: one OME-TIFF per stack (default: %(default)s)")
    p.add_argument("--scenario", choices=tuple(SCENARIOS), default="steady",
                   help="what the simulated sample does: " + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()))
    p.add_argument("--track-focus", action="store_true",
                   help="re-centre each position's stacks on its cells (policies.track_focus)")
    p.add_argument("--checks-every", type=int, default=None, metavar="N",
                   help="a real DNA check frame every N time points, scored against the prediction "
                        "(policies.checks; its light budget is --dose-budget)")
    p.add_argument("--dose-budget", type=float, default=0.05,
                   help="check frames' light, as a fraction of a run with fluorescence at every time point "
                        "(default: %(default)s)")
    p.add_argument("--uncertainty", action="store_true",
                   help="the worker predicts each structure's uncertainty too (8x the time); the window's "
                        "'uncertainty' box shows it")
    p.add_argument("--adapt", action="store_true",
                   help="fine-tune the model on the check frames during the run (policies.adapt; needs --checks-every)")
    p.add_argument("--workers", type=worker_count, default=1, metavar="N",
                   help="local worker processes sharing the stacks (worker.count; default: %(default)s)")
    _connect_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a plan from a YAML run configuration")
    p.add_argument("config", type=Path)
    p.add_argument("--headless", action="store_true", help="no window: one status line per stack")
    p.add_argument("--resume", action="store_true", help="continue the run's dataset after a crash")
    p.add_argument("--out", type=Path, default=None, help="dataset folder (overrides `out:` of the config)")
    p.add_argument("--model", default=None,
                   help="model .safetensors (overrides `model:`; a resumed run keeps its own otherwise)")
    p.add_argument("--device", default=None, help="torch device for the local worker (default: cuda if present, else cpu)")
    p.add_argument("--workers", type=worker_count, default=None, metavar="N",
                   help="local worker processes sharing the stacks (overrides `worker.count:`)")
    p.add_argument("--connect", default=None, metavar="HOST", help="address to listen on (overrides `host:`)")
    p.add_argument("--port", type=port_number, default=None, help="base port, uses 4 (overrides `port:`)")
    p.add_argument("--keys", default=None, metavar="DIR", help="CURVE key folder (overrides `keys:`)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="start an inference worker that connects to a daemon")
    _connect_args(p)
    p.add_argument("--model", default=None, help="model .safetensors (default: the bundled model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--exact", action="store_true",
                   help="predict in plain fp32 (default: the fast path, bf16 where the hardware has it)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network: the first stack of each size compiles (seconds "
                        "to a minute), cached on disk for later runs; measure before relying on it")
    p.add_argument("--uncertainty", action="store_true",
                   help="send each structure's per-voxel uncertainty too (8 predictions per stack: 8x the time)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--check-model", action="store_true",
                   help="load the model on the device as a worker would, print what it predicts, exit")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("view", help="open the live window on a running daemon")
    _connect_args(p)
    p.add_argument("--screenshot", type=Path, default=None,
                   help="save the window to this PNG once a prediction is shown, then exit")
    p.add_argument("--history-timepoints", type=int, default=50, metavar="N",
                   help="time points per position kept for the time scrubber (default: 50)")
    p.add_argument("--history-mb", type=float, default=1024, metavar="MB",
                   help="memory cap of that history; oldest evicted first (default: 1024)")
    p.set_defaults(func=cmd_view)

    for name, text in (("status", "show a running daemon's status"), ("pause", "pause acquisition"),
                       ("resume", "resume acquisition"), ("stop", "stop acquisition cleanly")):
        p = sub.add_parser(name, help=text)
        _connect_args(p)
        p.set_defaults(func=cmd_control)
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the raw JSON status")

    p = sub.add_parser("keys", help="create CURVE keys to run a daemon on a network interface")
    p.add_argument("dir", type=Path, help="folder for the key pairs (keep its *_secret files private)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("audit", help="check a run against its plan: every stack on disk, predicted, "
                                     "a recorded gap, or missing")
    p.add_argument("run", type=Path, help="the run's folder (its out:)")
    p.add_argument("--quick", action="store_true",
                   help="only check that files exist and are not empty (default: read each file's structure)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--show", type=int, default=20, metavar="N", help="problems listed (default: %(default)s)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("check-config", help="check Micro-Manager .cfg files without hardware: is the scope ready?")
    p.add_argument("paths", type=Path, nargs="+", metavar="CFG")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("train-bundled", help="reproduce the bundled demo model from the simulator")
    p.add_argument("--out", type=Path, default=Path("inference/models/bundled.safetensors"))
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 600; --robust 1500; --phase and --dense 1200, as shipped)")
    p.add_argument("--robust", action="store_true",
                   help="fine-tune the bundled model on randomized optics, cameras and samples instead")
    p.add_argument("--phase", action="store_true",
                   help="reproduce the bundled phase-contrast model (inference/models/bundled-phase.safetensors): "
                        "the bundled model fine-tuned on randomized phase-contrast fields")
    p.add_argument("--dense", action="store_true",
                   help="fine-tune on the bundled model's training fields plus dense colonies: the second step of "
                        "the shipped bundled model's recipe")
    p.add_argument("--canonical", action="store_true",
                   help="with --phase: fine-tune the phase model at the bundled acquisition (sparse and dense "
                        "samples): the second step of the shipped phase model's recipe")
    p.add_argument("--shading", action="store_true",
                   help="with --dense: add a copy of every field under uneven illumination (lamp tilt, vignette, "
                        "dust)")
    p.add_argument("--other-na", action="store_true",
                   help="with --dense: add fields through objectives of NA 0.3-1.2")
    p.add_argument("--edge", action="store_true",
                   help="with --dense: add windows of stacks that end near the cells (focus drift), made as the "
                        "worker makes them: the third step of the shipped bundled model's recipe")
    p.add_argument("--init", type=Path, default=None,
                   help="--phase/--robust/--dense: the model to start from (default: the shipped bundled model; "
                        "the shipped models started from plain `livestain train-bundled`'s output)")
    p.add_argument("--edge-fields", type=int, default=None, metavar="N",
                   help="with --edge: tall fields the edge windows are cut from, 2 windows each (default: "
                        f"{DEFAULT_RECIPE_FIELDS}; the shipped model's last step used 24)")
    p.add_argument("--na-fields", type=int, default=None, metavar="N",
                   help=f"with --other-na: fields through other objectives (default: {DEFAULT_RECIPE_FIELDS})")
    p.add_argument("--widen", type=int, default=None, metavar="N",
                   help="with --dense or --phase --canonical: widen the --init model to N base channels first "
                        "(same predictions, more capacity; the shipped models' last step)")
    p.add_argument("--weight", action="append", default=[], metavar="STRUCTURE=W",
                   help="with --dense or --phase --canonical: weight of a structure's error in the loss "
                        "(repeatable; default 1 each), e.g. --weight mitochondria=3")
    p.set_defaults(func=cmd_train_bundled)


#: ``livestain demo --scenario``: what the simulated sample does during the run.
SCENARIOS = {
    "steady": "the sample stays put (default)",
    "focus-drift": "the sample drifts 8 um up over the run, as a warming stage does; "
                   "try it with and without --track-focus",
    "novel-cells": "after two time points the field is a colony of large flat cells with big nuclei and faint "
                   "contrast, which the bundled model never saw (DNA r ~0.6); try --checks-every 1 --adapt",
    "out-of-distribution": "of every three time points one is normal, one dark (the lamp fails) and one "
                           "saturated (the exposure runs away): the confidence row and flags say so",
}

#: The novel-cells scenario's colony: large flat cells (12-16 um wide, 2-3 um tall) with
#: big nuclei and faint refractive-index contrast (0.6x). The bundled model has seen
#: dense colonies of ordinary cells since 2026-12-02 (DNA r 0.93 on them), not these:
#: DNA r 0.61-0.62 live, 0.82 after one adaptation round (tests/test_adaptation.py).
NOVEL_POPULATION = dict(n_cells=(12, 16), body_xy_um=(12.0, 16.0), body_z_um=(2.0, 3.0),
                        nucleus_frac=(0.65, 0.75), ri_scale=0.6, max_overlap=0.35, attempts_per_cell=10)
FOCUS_DRIFT_UM = 8.0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from livestain.acquisition.checks import CheckPolicy
    from livestain.acquisition.policies import Policies
    from livestain.devices.sample import CellPopulation
    from livestain.devices.simulated import SimulatedScope, build_simulated_core
    from livestain.launch import demo_sequence, exit_code, has_display, run_session
    from livestain.runconfig import RunConfig, WorkerConfig

    if args.timepoints < 1:
        raise ValueError("--timepoints must be at least 1")
    if args.positions < 1:
        raise ValueError("--positions must be at least 1")
    if args.interval < 0:
        raise ValueError("--interval cannot be negative: use 0 for time points back to back")
    show = not args.headless and has_display()
    if not args.headless and not show:
        print("no display found: running headless (status lines below)")
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR: the dataset folder of the run to continue")
    out = args.out or Path("livestain-demo") / time.strftime("%Y%m%d-%H%M%S")
    drift = 0.0
    if args.scenario == "focus-drift":
        if args.interval <= 0 or args.timepoints < 2:
            raise ValueError("--scenario focus-drift drifts over the run's time: give --interval > 0 "
                             "and --timepoints of 2 or more")
        drift = FOCUS_DRIFT_UM / (args.interval * (args.timepoints - 1))
    scope = SimulatedScope(seed=args.seed, z_drift_um_per_s=drift)
    if args.scenario == "novel-cells":
        scope.novel_population = CellPopulation(**NOVEL_POPULATION)
        scope.novel_after_s = 1.5 * max(args.interval, 1.0)
    elif args.scenario == "out-of-distribution":
        scope.faulty_every_s = 3 * max(args.interval, 1.0)
    checks = None
    if args.checks_every is not None:
        checks = CheckPolicy(every=args.checks_every, structures=("dna",), dose_budget=args.dose_budget)
    core = build_simulated_core(scope)
    seq = demo_sequence(args.timepoints, args.interval, args.positions)
    # the same run configuration `livestain run CONFIG` reads (policies, worker, where)
    config = RunConfig(microscope="simulated", out=out, plan=seq.model_dump(mode="json", exclude_unset=True),
                       model=args.model, host=args.connect, port=args.port, seed=args.seed, keys=args.keys,
                       policies=Policies(track_focus=args.track_focus, checks=checks, adapt=args.adapt,
                                         storage=args.storage),
                       worker=WorkerConfig(device=args.device, uncertainty=args.uncertainty, count=args.workers))
    opts = config.session_options(show_window=show)
    opts.resume = args.resume
    print(f"livestain demo: simulated microscope, {args.timepoints} time points x {args.positions} "
          f"position(s) x 16 planes, daemon on {args.connect}:{args.port}"
          + (f"; scenario {args.scenario}" if args.scenario != "steady" else "")
          + ("; tracking focus" if args.track_focus else ""))
    summary = run_session(core, seq, opts)
    for line in summary.lines():
        print(line)
    return exit_code(summary)


def cmd_run(args: argparse.Namespace) -> int:
    from livestain.launch import exit_code, has_display, run_session
    from livestain.runconfig import load_run_config

    cfg = load_run_config(args.config, out=args.out, host=args.connect, port=args.port,
                          keys=args.keys, model=args.model)
    core = cfg.build_core()
    opts = cfg.session_options(show_window=not args.headless and has_display())
    opts.resume = args.resume
    if args.device:  # the command line wins over the config's worker.device
        opts.device = args.device
    if args.workers is not None:  # and over worker.count
        opts.workers = args.workers
    summary = run_session(core, cfg.sequence(), opts)
    for line in summary.lines():
        print(line)
    return exit_code(summary)


def cmd_worker(args: argparse.Namespace) -> int:
    if args.check_model:
        return _check_model(args.model, args.device)
    from livestain.inference.worker import run_worker

    eps = wire.endpoints(args.connect, args.port)
    return run_worker(eps["stacks"], eps["results"], args.model, args.device,
                      parent_pid=args.parent_pid, keys=args.keys, exact=args.exact, compile=args.compile,
                      uncertainty=args.uncertainty)


def _check_model(model: str | None, device: str | None) -> int:
    """``worker --check-model``: what the daemon runs before the first frame."""
    from livestain.inference.predict import Predictor

    try:
        predictor = Predictor(model, device, fast=True)
    except (ValueError, OSError):
        raise
    except Exception as e:  # e.g. a CUDA device asked for on a machine without one
        raise ValueError(f"cannot load the model on device {device!r}: {e}") from None
    from livestain.inference.ood import model_expectations

    meta = predictor.model.meta
    # what the input checks will hold each stack to: the run's start compares its plan with it
    expect = model_expectations(meta, predictor.focus_window)
    # how good the model was on its own validation fields: the confidence is relative to that
    validation = meta.extra.get("val_pearson") or None
    print(json.dumps({"name": predictor.model.name, "structures": list(meta.config.structures),
                      "voxel_size_um": list(meta.voxel_size_um), "device": predictor.device,
                      "expectations": {k: list(v) if isinstance(v, tuple) else v for k, v in expect.items()},
                      "validation_pearson": validation}))
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from livestain.ui.app import run_viewer

    eps = wire.endpoints(args.connect, args.port)
    return run_viewer(eps["display"], screenshot=args.screenshot, screenshot_after_s=30.0, keys=args.keys,
                      control_endpoint=eps["control"], history_timepoints=args.history_timepoints,
                      history_mb=args.history_mb)


def cmd_control(args: argparse.Namespace) -> int:
    from livestain.acquisition.control import send_command

    reply = send_command(wire.endpoints(args.connect, args.port)["control"], args.command, keys=args.keys)
    if getattr(args, "json", False):
        print(json.dumps(reply, indent=2))
    elif not reply.get("ok"):
        print(f"daemon refused: {reply.get('error')}", file=sys.stderr)
        return 1
    else:
        print(
            f"run {reply['run_id']} {reply['state']}: {reply['stacks_acquired']} acquired, "
            f"{reply['stacks_predicted']} predicted, {reply['stacks_dropped']} dropped, "
            f"backlog {reply['backlog']}, up {reply['uptime_s']:.0f} s; data in {reply['out_dir']}"
        )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from livestain.security import create_keys

    folder = create_keys(args.dir)
    print(f"wrote CURVE keys to {folder}: give the daemon and every worker/viewer --keys {folder} "
          f"(copy the folder to other hosts; keep *.key_secret files private)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """0 only when nothing planned is missing or unreadable; 1 otherwise."""
    from livestain.acquisition.audit import audit_run

    show = sys.stderr.isatty() and not args.json

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rauditing: {done}/{total} stacks", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    report = audit_run(args.run, deep=not args.quick, progress=progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines(max_problems=args.show)))
    return 0 if report.ok else 1


def cmd_check_config(args: argparse.Namespace) -> int:
    from livestain.devices.mmconfig import check_config

    ready = True
    for path in args.paths:
        report = check_config(path)
        ready &= report.ready
        print("\n".join(report.summary_lines()))
        print()
    return 0 if ready else 1


#: Edge and other-objective fields of `bundled.train_dense_mix` when --edge-fields /
#: --na-fields are not given.
DEFAULT_RECIPE_FIELDS = 12


def structure_weights(given: list[str]) -> tuple[float, ...]:
    """``--weight STRUCTURE=W`` options as the bundled structures' loss weights (empty:
    all 1); the names take the usual aliases (dapi, hoechst, ...)."""
    from livestain.inference.model import UNetConfig
    from livestain.inference.structures import canonical

    names = UNetConfig().structures
    weights = dict.fromkeys(names, 1.0)
    for item in given:
        name, sep, value = item.partition("=")
        structure = canonical(name.strip()) if sep else None
        if structure not in weights:
            raise ValueError(f"--weight {item!r}: give STRUCTURE=W with STRUCTURE one of {', '.join(names)}")
        try:
            weights[structure] = float(value)
        except ValueError:
            raise ValueError(f"--weight {item!r}: {value!r} is not a number") from None
        if not weights[structure] >= 0:
            raise ValueError(f"--weight {item!r}: a weight is 0 or more")
    if given and not any(weights.values()):
        raise ValueError("--weight: every structure weighted 0 leaves nothing to learn")
    return tuple(weights.values()) if given else ()


def cmd_train_bundled(args: argparse.Namespace) -> int:
    from livestain.bundled import train_bundled, train_dense_mix, train_phase_mix, train_robust

    # modifiers of one recipe, which the others would silently ignore
    needs = {"--canonical": ("phase", args.canonical), "--edge": ("dense", args.edge),
             "--edge-fields": ("edge", args.edge_fields is not None),
             "--na-fields": ("other_na", args.na_fields is not None),
             "--shading": ("dense", args.shading), "--other-na": ("dense", args.other_na)}
    for flag, (base, given) in needs.items():
        if given and not getattr(args, base):
            option = "--" + base.replace("_", "-")
            example = ("--dense " if base in ("edge", "other_na") else "") + f"{option} {flag}" \
                + " N" * flag.endswith("-fields")
            print(f"livestain train-bundled: {flag} changes the {option} recipe; add {option} "
                  f"(e.g. `livestain train-bundled {example}`)", file=sys.stderr)
            return 2

    if (args.widen is not None or args.weight) and not (args.dense or (args.phase and args.canonical)):
        print("livestain train-bundled: --widen and --weight change the fine-tunes; add --dense "
              "(or --phase --canonical)", file=sys.stderr)
        return 2
    try:
        weights = structure_weights(args.weight)
    except ValueError as exc:
        print(f"livestain train-bundled: {exc}", file=sys.stderr)
        return 2
    tuning = {"widen_to": args.widen, "structure_weights": weights}

    if args.phase:
        out = args.out if args.out != Path("inference/models/bundled.safetensors") else \
            Path("inference/models/bundled-phase.safetensors")
        if args.canonical:
            train_phase_mix(out, steps=args.steps or 1200, init=args.init, **tuning)
        else:
            train_robust(out, steps=args.steps or 1200, p_phase=1.0, init=args.init)
        return 0
    if args.robust:
        train_robust(args.out, steps=args.steps or 1500, init=args.init)
        return 0
    if args.dense:
        train_dense_mix(args.out, steps=args.steps or 1200, init=args.init,
                        edge_fields=(DEFAULT_RECIPE_FIELDS if args.edge_fields is None else args.edge_fields) if args.edge else 0,
                        shading=args.shading,
                        na_fields=(DEFAULT_RECIPE_FIELDS if args.na_fields is None else args.na_fields) if args.other_na else 0, **tuning)
        return 0

    train_bundled(args.out, steps=args.steps or 600)
    return 0

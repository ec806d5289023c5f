"""``livestain predict-run | evaluate-run``: batch prediction and scoring of whole runs on Dask.

The argparse half (`register`) and the console half (a progress bar with ETA, the
dashboard's address, a final table); the work is in `inference.batch` (predicting),
`inference.runeval` (scoring), `inference.cluster` (which cluster) and
`inference.runsets` (the files). Heavy imports happen inside the commands so
``livestain --help`` stays fast.

Exit codes: 0 every stack predicted (or scored); 1 some stacks failed (each recorded
with its reason); 2 a problem to fix before anything ran (the CLI's usual user error);
130 interrupted (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .commands import parse_structures

STATUS_STYLE = {"written": "green", "exists": "cyan", "failed": "red"}


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


class ProgressView:
    """A rich progress bar (stacks, rate, ETA) on a terminal; a line every ~10% otherwise
    (a log file or a Slurm job's output should not fill with redraws)."""

    def __init__(self, console: Any, total: int, what: str) -> None:
        self.console = console
        self.total = total
        self.what = what
        self.t0 = time.perf_counter()
        self.every = max(1, total // 10)
        self.failed = 0
        self.bar: Any = None
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[failed]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=console, transient=False)
            self.task = self.bar.add_task(what, total=total, rate="", failed="")
            self.bar.start()

    def advance(self, done: int, failed: int, elapsed: float | None = None) -> None:
        self.failed = failed
        elapsed = time.perf_counter() - self.t0 if elapsed is None else elapsed
        rate = done / elapsed if elapsed > 0 else 0.0
        fails = f"[red]{failed} failed[/red]" if failed else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=done, rate=f"{rate:.2f} stacks/s", failed=fails)
        elif done % self.every == 0 or done == self.total:
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            self.console.print(f"{self.what}: {done}/{self.total} stacks, {rate:.2f} stacks/s, "
                               f"{failed} failed, elapsed {elapsed:.0f} s, ETA {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------- cluster options


def _cluster_settings(args: argparse.Namespace) -> dict[str, Any]:
    from .cluster import slurm_settings

    dashboard = None if str(args.dashboard).lower() in ("", "none", "off") else args.dashboard
    slurm = None
    if args.scheduler == "slurm":
        slurm = slurm_settings({"queue": args.slurm_queue, "account": args.slurm_account,
                                "walltime": args.slurm_walltime, "cores": args.slurm_cores,
                                "memory": args.slurm_memory, "interface": args.slurm_interface,
                                "gpus": args.slurm_gpus, "prologue": args.slurm_prologue,
                                "log_directory": args.slurm_log_dir}, args.slurm_config)
    elif args.print_job_script:
        raise ValueError("--print-job-script is for --scheduler slurm")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1")
    return {"scheduler": args.scheduler, "workers": args.workers, "device": args.device,
            "dashboard": dashboard, "slurm": slurm}


def _print_job_script(settings: dict[str, Any]) -> int:
    from .cluster import start_slurm

    cluster, _ = start_slurm(settings["slurm"], settings["workers"], None)
    try:
        print(cluster.job_script())
    finally:
        cluster.close()
    return 0


def _quiet(args: argparse.Namespace) -> None:
    from .cluster import quiet_dask_logs

    if not getattr(args, "verbose", False):
        quiet_dask_logs()


def _say_cluster(console: Any, client: Any, info: Any) -> None:
    console.print(f"cluster: {info.description}")
    if info.dashboard:
        console.print(f"dashboard: [link={info.dashboard}]{info.dashboard}[/link]")
    if info.kind != "local":
        n = len(client.scheduler_info().get("workers", {}))
        wait = " (tasks wait for workers to join: Slurm jobs may queue)" if n == 0 else ""
        console.print(f"{n} worker(s) connected now{wait}")


# ---------------------------------------------------------------- predict-run


def cmd_predict_run(args: argparse.Namespace) -> int:
    """Predict every stack of the runs that the set lacks, on a Dask cluster."""
    from .batch import execute, plan_prediction
    from .checkpoint import load_checkpoint
    from .cluster import connect
    from .runsets import find_runs

    _quiet(args)
    settings = _cluster_settings(args)
    if args.print_job_script:
        return _print_job_script(settings)
    console = _console()
    runs = find_runs(args.runs)
    model = load_checkpoint(args.model, "cpu")
    plan = plan_prediction(runs, model, structures=args.structures, exact=args.exact, tta=args.tta,
                           channel=args.channel, set_name=args.set)
    console.print(f"{len(runs)} run{'s' * (len(runs) > 1)}, {plan.total} stacks; {plan.total - plan.todo} "
                  f"already predicted, {plan.todo} to do -> predictions/{', '.join(plan.set_names)}/")
    if args.dry_run or not plan.todo:
        if not plan.todo:
            console.print("nothing to do: every stack has its prediction in this set")
        _print_predict_table(console, plan, None)
        return 0
    with connect(**settings) as (client, info):
        _say_cluster(console, client, info)
        console.print(f"loading {plan.model_name} on the workers ...")
        view = ProgressView(console, plan.todo, "predicting")

        def on_result(result: dict[str, Any], report: Any) -> None:
            view.advance(report.finished, report.failed, report.wall_s)
            if result.get("status") == "failed" and view.bar is None:
                console.print(f"[red]failed[/red] {Path(result['run']).name} t{result['t']} p{result['p']}: "
                              f"{result.get('reason')}")

        try:
            report = execute(client, plan, torch_threads=info.torch_threads, device=args.device,
                             on_result=on_result)
        finally:
            view.close()
    if args.json:
        print(json.dumps(_report_dict(plan, report), indent=2, default=str))
    else:
        _print_predict_table(console, plan, report)
    if report.interrupted:
        console.print(f"interrupted: {report.written} stacks written and kept; run the same command again "
                      "to continue")
        return 130
    if report.failed:
        console.print(f"[red]{report.failed} stack(s) failed[/red]; the reasons are in "
                      f"predictions/<set>/p*/t*.failed.json (first: {report.failures[0]['reason']}); "
                      "the next call tries them again")
        return 1
    return 0


def _report_dict(plan: Any, report: Any) -> dict[str, Any]:
    return {
        "model": plan.model_name,
        "sets": plan.set_names,
        "wall_s": report.wall_s,
        "setup_s": report.setup_s,
        "stacks_per_s": report.stacks_per_s,
        "s_per_stack": report.s_per_stack,
        "workers": report.workers,
        "interrupted": report.interrupted,
        "runs": [vars(r) | {"run": str(r.run)} for r in report.runs],
        "failures": report.failures,
    }


def _print_predict_table(console: Any, plan: Any, report: Any) -> None:
    from rich.table import Table

    from .batch import RunTally, runs_total

    table = Table(title=f"{plan.model_name}{' (exact fp32)' if plan.exact else ''}{' + TTA' if plan.tta else ''}")
    for col in ("run", "stacks", "done before", "predicted", "failed", "s/stack", "stacks/s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    tallies = report.runs if report else [RunTally(r.run, r.pset.name, len(r.stacks), r.done) for r in plan.runs]
    wall = report.wall_s if report else 0.0
    rows = tallies + ([runs_total(tallies)] if len(tallies) > 1 else [])
    for i, t in enumerate(rows):
        name = "all" if i == len(tallies) else str(t.run.name)
        per = f"{t.seconds / t.written:.2f}" if t.written else "-"
        rate = f"{t.written / wall:.2f}" if t.written and wall and (len(tallies) == 1 or i == len(tallies)) else "-"
        table.add_row(name, str(t.stacks), str(t.already), str(t.written + t.existed),
                      f"[red]{t.failed}[/red]" if t.failed else "0", per, rate)
    console.print(table)
    if report and report.written:
        console.print(f"{report.written} stacks in {report.wall_s:.1f} s: {report.stacks_per_s:.2f} stacks/s over "
                      f"{len(report.workers) or '?'} worker(s) (after {report.setup_s:.1f} s loading the model); "
                      "s/stack is one worker's read + predict + write")


# ---------------------------------------------------------------- evaluate-run


def cmd_evaluate_run(args: argparse.Namespace) -> int:
    """Score a prediction set against the run's real fluorescence, per time point."""
    from .cluster import connect
    from .runeval import evaluate_runs, parse_against, plan_evaluation
    from .runsets import find_runs

    _quiet(args)
    settings = _cluster_settings(args)
    if args.print_job_script:
        return _print_job_script(settings)
    console = _console()
    runs = find_runs(args.runs)
    plans = plan_evaluation(runs, parse_against(args.against), args.set, args.channel)
    total = sum(len(p.tasks) for p in plans)
    for p in plans:
        console.print(f"{p.run.name}: set {p.set_name}, {len(p.tasks)} stacks to score"
                      + (f", {len(p.missing)} lack a prediction or the truth" if p.missing else ""))
    if not total:
        raise ValueError("no stack has both a prediction and the real fluorescence; predict the run first "
                         "(livestain predict-run RUN) or check --against and --set")
    with connect(**settings) as (client, info):
        _say_cluster(console, client, info)
        view = ProgressView(console, total, "scoring")
        failed = 0

        def on_result(result: dict[str, Any], done: int, _total: int) -> None:
            nonlocal failed
            failed += result.get("status") != "ok"
            view.advance(done, failed)

        try:
            report = evaluate_runs(client, plans, on_result)
        finally:
            view.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_eval_tables(console, report)
    n_failed = sum(len(r["failed"]) for r in report["runs"])
    if n_failed:
        first = next(f for r in report["runs"] for f in r["failed"])
        console.print(f"[red]{n_failed} stack(s) could not be scored[/red] (first: t{first['t']} p{first['p']}: "
                      f"{first['reason']})")
        return 1
    return 0


def _print_eval_tables(console: Any, report: dict[str, Any]) -> None:
    """One row per time point and structure (narrow, however many structures)."""
    from rich.table import Table

    for run in report["runs"]:
        structures = sorted(run["mean"])
        table = Table(title=f"{Path(run['run']).name}: set {run['set']} against "
                            + ", ".join(f"{s}={c}" if s != c else s for s, c in run["against"].items()))
        for col in ("t", "positions", "structure", "pearson", "ssim", "nrmse"):
            table.add_column(col, justify="left" if col == "structure" else "right")
        rows = [(str(t), row["positions"], row["mean"]) for t, row in run["time_points"].items()]
        rows.append(("all", run["stacks"], run["mean"]))
        for t, n, means in rows:
            for i, s in enumerate(structures):
                m = means.get(s)
                table.add_row(t if i == 0 else "", str(n) if i == 0 else "", s,
                              *(f"{m[k]:.3f}" if m else "-" for k in ("pearson", "ssim", "nrmse")),
                              end_section=i == len(structures) - 1)
        console.print(table)


# ---------------------------------------------------------------- parsers


def _cluster_args(p: argparse.ArgumentParser) -> None:
    from .cluster import DEFAULT_DASHBOARD

    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", default="local", metavar="local|ADDRESS|slurm",
                   help="local: worker processes on this machine (default); ADDRESS: an existing Dask "
                        "scheduler (tcp://host:8786); slurm: Slurm jobs via dask-jobqueue")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local: worker processes (default: one per GPU, else one per core up to 4); "
                        "slurm: jobs (default: 1); ADDRESS: ignored (the cluster has its own)")
    g.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where workers predict (default: cuda where a worker has a GPU, else cpu)")
    g.add_argument("--dashboard", default=DEFAULT_DASHBOARD, metavar="HOST:PORT",
                   help="local/slurm: the Dask dashboard's address (default: %(default)s; none: off)")
    s = p.add_argument_group("slurm (with --scheduler slurm; one worker per job)")
    s.add_argument("--slurm-config", type=Path, default=None, metavar="FILE",
                   help="YAML of dask-jobqueue SLURMCluster arguments (cores, memory, queue, account, "
                        "walltime, job_extra_directives, job_script_prologue, ...); options below win")
    s.add_argument("--slurm-queue", default=None, metavar="PARTITION", help="partition (sbatch -p)")
    s.add_argument("--slurm-account", default=None, help="account (sbatch -A)")
    s.add_argument("--slurm-walltime", default=None, metavar="HH:MM:SS", help="time limit per job (default: 01:00:00)")
    s.add_argument("--slurm-cores", type=int, default=None, help="CPU cores per job (default: 4)")
    s.add_argument("--slurm-memory", default=None, metavar="SIZE", help="memory per job, e.g. 32GB (default: 16GB)")
    s.add_argument("--slurm-gpus", type=int, default=None, choices=(0, 1), help="GPUs per job (default: 0)")
    s.add_argument("--slurm-prologue", action="append", default=None, metavar="LINE",
                   help="shell line run before the worker, e.g. 'module load cuda' (repeatable)")
    s.add_argument("--slurm-interface", default=None, metavar="IFACE",
                   help="network interface the workers use, e.g. ib0")
    s.add_argument("--slurm-log-dir", default=None, metavar="DIR", help="where the jobs' output goes")
    s.add_argument("--print-job-script", action="store_true", help="print the Slurm job script and exit")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict-run`` and ``evaluate-run`` to the main parser's subcommands."""
    p = subparsers.add_parser(
        "predict-run", help="re-predict whole runs on a Dask cluster (laptop to many GPUs)",
        description="Predict every brightfield stack of the runs with a model, on a Dask cluster, into a named "
                    "prediction set beside the live predictions (RUN/predictions/<model@fingerprint>/p000/"
                    "t0000.ome.tif); never overwrites the live ones. Resumable: a second call predicts only "
                    "what is missing. Failed stacks are recorded (t0000.failed.json) and retried next time.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder, or a folder of runs")
    p.add_argument("--model", default=None, help="model .safetensors (default: the bundled model)")
    p.add_argument("--structures", type=parse_structures, default=None,
                   help="comma-separated structures to keep (default: all the model predicts)")
    p.add_argument("--exact", action="store_true",
                   help="plain fp32 (default: the live worker's fast path, bf16 where the hardware has it)")
    p.add_argument("--tta", action="store_true", help="average over y/x flips (4x slower, smoother)")
    p.add_argument("--channel", default=None,
                   help="input channel (default: the run's streamed channel, usually brightfield)")
    p.add_argument("--set", default=None, metavar="NAME",
                   help="prediction set name (default: model@fingerprint plus the options that differ)")
    p.add_argument("--dry-run", action="store_true", help="say what would be predicted, start nothing")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    _cluster_args(p)
    p.set_defaults(func=cmd_predict_run)

    p = subparsers.add_parser(
        "evaluate-run", help="score a run's predictions against its real fluorescence, per time point",
        description="Pearson r, SSIM and NRMSE of a prediction set (or the live predictions: --set live) "
                    "against the fluorescence stacks of a paired run (p000/t0000_dna.ome.tif), per time "
                    "point, on a Dask cluster.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder, or a folder of runs")
    p.add_argument("--against", required=True, metavar="CHANNEL",
                   help="fluorescence channel(s) to score against, e.g. dna or dna,membrane; "
                        "STRUCTURE=CHANNEL when the names differ (dna=hoechst)")
    p.add_argument("--set", default=None, metavar="NAME",
                   help="prediction set (default: the run's only set, else live)")
    p.add_argument("--channel", default=None, help="input channel the stacks are listed by (default: streamed)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    _cluster_args(p)
    p.set_defaults(func=cmd_evaluate_run)

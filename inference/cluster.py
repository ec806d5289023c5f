"""Where batch prediction runs: a Dask cluster on this machine, an existing one, or Slurm.

``--scheduler local`` (default) starts worker processes here: one per GPU when there are
GPUs (each sees only its own: ``CUDA_VISIBLE_DEVICES`` is set per worker, or dask-cuda's
``LocalCUDACluster`` does it when installed), else ``--workers`` CPU workers sharing the
cores (PyTorch threads split between them). ``--scheduler tcp://host:8786`` uses a
cluster someone started (``dask scheduler`` / ``dask worker``, or ``dask cuda worker``
on GPU hosts). ``--scheduler slurm`` starts a scheduler here and submits one Slurm job
per worker with dask-jobqueue; a job's resources come from ``--slurm-*`` options, a
YAML file of ``SLURMCluster`` arguments (``--slurm-config``), or dask-jobqueue's own
``~/.config/dask/jobqueue.yaml``, in that order of precedence.

Every worker must reach the runs (and the model file) at the same path as this machine,
and run the same livestain (one virtual environment on a shared file system: Slurm jobs
use this interpreter, ``sys.executable``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: distributed's loggers that narrate normal operation; their warnings are mostly noise
#: to a user (a worker that died and was restarted is still said, by the nanny)
_CHATTY = ("distributed.worker", "distributed.core", "distributed.comm", "distributed.batched",
           "distributed.http", "distributed.shuffle", "distributed.utils_perf", "distributed.deploy",
           "distributed.diskutils", "distributed.preloading", "distributed.worker_memory",
           "distributed.active_memory_manager", "distributed.client", "dask_jobqueue")

DEFAULT_DASHBOARD = "127.0.0.1:8787"
SLURM_DEFAULTS: dict[str, Any] = {"cores": 4, "memory": "16GB", "processes": 1, "walltime": "01:00:00"}
#: ``--slurm-*`` option -> SLURMCluster keyword
SLURM_OPTIONS = {"queue": "queue", "account": "account", "walltime": "walltime", "cores": "cores",
                 "memory": "memory", "interface": "interface", "local_directory": "local_directory",
                 "log_directory": "log_directory"}


def quiet_dask_logs() -> None:
    """Keep distributed's console output to what matters: errors, lost workers, and
    the scheduler's own warnings; the rest (connections, event loop timing) is silenced."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.ERROR)


def cpu_count() -> int:
    """Cores this process may use (a Slurm job or container may have fewer than the host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_local_workers(device: str | None) -> int:
    """One worker per GPU; on the CPU one per core, at most 4 (then threads per worker).

    Measured in bench/bench_batch.py on 2 cores: two single-threaded workers predict
    about twice what one single-threaded worker does, and clearly more than one worker
    with both cores (PyTorch's threads of one small network synchronise often, and
    reading and writing stacks overlap with the other worker's network). At most 4
    because each worker holds a stack, its prediction and the network's activations.
    """
    n_gpus = gpu_count() if device in (None, "cuda") else 0
    if n_gpus:
        return n_gpus
    return max(1, min(cpu_count(), 4))


def local_worker_specs(n_workers: int, n_gpus: int, memory_limit: int | str = "auto"
                       ) -> dict[str, dict[str, Any]]:
    """SpecCluster worker specs: Nanny processes with one task thread each (the model is
    not shared between threads), worker ``i`` pinned to GPU ``i`` when there are GPUs."""
    from distributed import Nanny

    specs = {}
    for i in range(n_workers):
        env = {"CUDA_VISIBLE_DEVICES": str(i % n_gpus)} if n_gpus else {}
        specs[f"{'gpu' if n_gpus else 'cpu'}-{i}"] = {
            "cls": Nanny,
            "options": {"nthreads": 1, "host": "127.0.0.1", "memory_limit": memory_limit, "env": env,
                        "silence_logs": logging.ERROR},
        }
    return specs


@dataclass
class ClusterInfo:
    """What the console shows about the cluster, and how many threads each worker's
    PyTorch may use (None: the worker's own cores)."""

    kind: str
    description: str
    dashboard: str | None
    workers: int | None
    torch_threads: int | None = None
    gpus: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def start_local(workers: int | None, device: str | None, dashboard: str | None) -> tuple[Any, ClusterInfo]:
    """A cluster of worker processes on this machine (see the module docstring)."""
    from distributed import Scheduler, SpecCluster

    n_gpus = gpu_count() if device in (None, "cuda") or (device or "").startswith("cuda") else 0
    if device and device.startswith("cuda") and not n_gpus:
        raise ValueError(f"--device {device}: this machine has no CUDA GPU PyTorch can use; "
                         "use --device cpu, or a cluster with GPUs (--scheduler ADDRESS or slurm)")
    n = workers or default_local_workers(device)
    if n < 1:
        raise ValueError(f"--workers {n}: give at least 1")
    threads = max(1, cpu_count() // n)
    dash = dashboard or ""
    if n_gpus:
        try:
            from dask_cuda import LocalCUDACluster  # type: ignore[import-not-found]
        except ImportError:
            LocalCUDACluster = None
        if LocalCUDACluster is not None:
            cluster = LocalCUDACluster(n_workers=n, threads_per_worker=1, dashboard_address=dash or None,
                                       silence_logs=logging.ERROR)
            return cluster, ClusterInfo("local", f"{n} GPU workers (dask-cuda) on this machine",
                                        cluster.dashboard_link if dash else None, n, threads, n_gpus)
    total = _memory_bytes()
    cluster = SpecCluster(
        workers=local_worker_specs(n, n_gpus, memory_limit=total // n if total else "auto"),
        scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0,
                                                 "dashboard_address": dash or None,
                                                 "dashboard": bool(dash)}},
        silence_logs=False,
        name="livestain",
    )
    kind = f"{n} GPU worker{'s' * (n > 1)}" if n_gpus else f"{n} CPU worker{'s' * (n > 1)} x {threads} threads"
    return cluster, ClusterInfo("local", f"{kind} on this machine", cluster.dashboard_link if dash else None,
                                n, threads, n_gpus)


def _memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - only a memory limit's default depends on it
        return 0


def slurm_settings(options: dict[str, Any], config_file: str | Path | None = None) -> dict[str, Any]:
    """SLURMCluster keyword arguments: defaults < ``config_file`` (YAML mapping) < options.

    ``options`` holds the ``--slurm-*`` values by `SLURM_OPTIONS` name plus ``gpus``
    (per job: 0 or 1) and ``prologue`` (shell lines run before the worker starts, e.g.
    ``module load cuda``). One worker process per job, so ``--workers N`` is N jobs.
    """
    import yaml

    settings: dict[str, Any] = dict(SLURM_DEFAULTS)
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--slurm-config {path} cannot be read ({e}); give a YAML file of "
                             "SLURMCluster arguments such as cores: 8, memory: 32GB, queue: gpu") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--slurm-config {path} must be a YAML mapping (cores: 8, memory: 32GB, ...)")
        settings.update({k.replace("-", "_"): v for k, v in loaded.items()})
    for opt, key in SLURM_OPTIONS.items():
        if options.get(opt) is not None:
            settings[key] = options[opt]
    gpus = int(options.get("gpus") or settings.pop("gpus", 0) or 0)
    if gpus not in (0, 1):
        raise ValueError(f"--slurm-gpus {gpus}: each Slurm job runs one worker with at most one GPU; "
                         "ask for more jobs instead (--workers N)")
    directives = list(settings.get("job_extra_directives") or [])
    if gpus and not any("gres" in d or "gpus" in d for d in directives):
        directives.append("--gres=gpu:1")
    settings["job_extra_directives"] = directives
    prologue = list(settings.get("job_script_prologue") or []) + list(options.get("prologue") or [])
    settings["job_script_prologue"] = prologue
    settings.setdefault("python", sys.executable)
    settings["processes"] = 1
    settings.setdefault("job_name", "livestain")
    return settings


def start_slurm(settings: dict[str, Any], workers: int | None, dashboard: str | None) -> tuple[Any, ClusterInfo]:
    """A scheduler here and ``workers`` Slurm jobs of one worker each."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ValueError("--scheduler slurm needs dask-jobqueue: pip install dask-jobqueue "
                         "(or pip install 'livestain[batch]')") from None
    options = dict(settings)
    sched = dict(options.pop("scheduler_options", None) or {})
    # the dashboard stays on this host's loopback unless asked otherwise: reach it with
    # ssh -L 8787:localhost:8787 LOGIN-NODE rather than opening it to the cluster network
    sched.setdefault("dashboard_address", dashboard)
    cluster = SLURMCluster(scheduler_options=sched, silence_logs="error", **options)
    n = workers or 1
    threads = int(options.get("cores", 1)) // int(options.get("processes", 1))
    gpus = any("gres" in d or "gpus" in d for d in options.get("job_extra_directives", []))
    return cluster, ClusterInfo("slurm", f"{n} Slurm job{'s' * (n > 1)} ({options.get('cores')} cores, "
                                         f"{options.get('memory')}{', 1 GPU' if gpus else ''}, "
                                         f"{options.get('walltime')})",
                                cluster.dashboard_link, n, max(1, threads), int(gpus), {"scale": n})


@contextlib.contextmanager
def connect(scheduler: str = "local", workers: int | None = None, device: str | None = None,
            dashboard: str | None = DEFAULT_DASHBOARD, slurm: dict[str, Any] | None = None
            ) -> Iterator[tuple[Any, ClusterInfo]]:
    """A `distributed.Client` on the chosen cluster, closed (and the cluster with it,
    when this started it) on exit."""
    try:
        from distributed import Client
    except ImportError:
        raise ValueError("batch prediction needs Dask: pip install 'dask[distributed]' "
                         "(or pip install 'livestain[batch]')") from None

    quiet_dask_logs()
    # a local nanny writes OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_ and PYTHONHASHSEED into
    # this process's os.environ before each worker it spawns; put them back afterwards so
    # what this process starts later (a live worker, say) does not inherit them
    environ = dict(os.environ)
    cluster: Any = None
    if scheduler == "local":
        cluster, info = start_local(workers, device, dashboard)
    elif scheduler == "slurm":
        cluster, info = start_slurm(slurm or slurm_settings({}), workers, dashboard)
    elif "://" in scheduler or ":" in scheduler:
        info = ClusterInfo("address", f"the cluster at {scheduler}", None, workers)
    else:
        raise ValueError(f"--scheduler {scheduler!r}: give local, slurm, or a scheduler address "
                         "such as tcp://host:8786")
    try:
        if cluster is not None:
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout="20s")
            except OSError as e:
                raise OSError(f"no Dask scheduler answers at {scheduler} ({e}); start one "
                              "(dask scheduler; dask worker ADDRESS) or use --scheduler local") from None
            info.dashboard = client.dashboard_link
        try:
            if info.kind == "slurm":
                cluster.scale(info.extra["scale"])
            yield client, info
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
            os.environ.clear()
            os.environ.update(environ)

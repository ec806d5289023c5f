"""One configuration from YAML to the worker (issue 14): the run config's ``worker:``
section chooses the local worker's device, precision, compilation and uncertainty, and
``livestain demo`` builds the same `RunConfig`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from livestain import launch
from livestain.runconfig import WorkerConfig, load_run_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "simulated.yaml"


def _config(tmp_path: Path, **worker) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["out"] = str(tmp_path / "run")
    data["worker"] = worker
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_worker_section_reaches_the_session(tmp_path) -> None:
    cfg = load_run_config(_config(tmp_path, device="cpu", exact=True, compile=True, uncertainty=True))
    opts = cfg.session_options(show_window=False)
    assert (opts.device, opts.exact, opts.compile, opts.uncertainty) == ("cpu", True, True, True)
    assert opts.policies.storage == "zarr"


def test_a_misspelt_worker_field_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(ValueError, match="devcie"):
        load_run_config(_config(tmp_path, devcie="cuda"))


def test_the_spawned_worker_gets_the_configs_flags(tmp_path, monkeypatch) -> None:
    """What `run_session` hands the worker supervisor: the worker's own command line."""
    seen: dict[str, list[str]] = {}

    class Stop(Exception):
        pass

    class Supervisor:
        def __init__(self, args, **kw) -> None:  # noqa: ANN001
            seen["args"] = list(args)
            raise Stop

    from livestain.acquisition import supervisor

    monkeypatch.setattr(supervisor, "WorkerSupervisor", Supervisor)
    monkeypatch.setattr(supervisor, "check_worker_model",
                        lambda model, device, **kw: {"name": "bundled", "structures": ["dna"]})
    cfg = load_run_config(_config(tmp_path, device="cpu", exact=True, compile=True, uncertainty=True))
    with pytest.raises(Stop):
        launch.run_session(cfg.build_core(), cfg.sequence(), cfg.session_options(show_window=False))
    args = seen["args"]
    assert args[0] == "worker" and args[args.index("--device") + 1] == "cpu"
    assert {"--exact", "--compile", "--uncertainty"} <= set(args)


def test_defaults_leave_the_worker_to_choose() -> None:
    assert WorkerConfig() == WorkerConfig(device=None, exact=False, compile=False, uncertainty=False)

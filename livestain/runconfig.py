"""The run configuration of ``livestain run CONFIG.yaml``, validated with pydantic.

Example (``examples/simulated.yaml``)::

    microscope: simulated          # or {replay: PATH} or the path of a Micro-Manager .cfg
    out: runs/overnight            # dataset folder, must not already hold a run
    plan:                          # a useq-schema MDASequence, inline or a file path
      time_plan: {interval: 60, loops: 4320}
      channels: [{config: Brightfield, exposure: 10}]
      stage_positions: [{x: 0, y: 0, z: 4}]
      z_plan: {range: 15, step: 1}
    model: null                    # null: the bundled model
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import useq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from livestain import wire
from livestain.acquisition.policies import Policies
from livestain.acquisition.preflight import check_plan, unknown_keys
from livestain.launch import SessionOptions


class WorkerConfig(BaseModel):
    """The local worker a run starts (``worker:`` in the run config).

    Attributes
    ----------
    device : str | None
        Torch device: ``cuda``, ``cuda:1``, ``cpu``; None: CUDA if present, else CPU.
        ``livestain run --device`` overrides it.
    exact : bool
        Plain float32 inference instead of the fast path (fused, reduced precision
        where the device supports it); slower, bit-for-bit what ``livestain predict`` gives.
    compile : bool
        ``torch.compile`` the network (minutes at start, faster per stack on a GPU).
    uncertainty : bool
        Predict each structure's per-voxel uncertainty too (8x the time), shown in the
        window and written as extra prediction channels.
    count : int
        Local worker processes, all on ``device``, sharing the stacks (each asks for the
        next when it is free). More than one pays where one worker leaves the device
        idle between stacks (a large GPU); on a CPU they share its cores.
    """

    model_config = ConfigDict(extra="forbid")

    device: str | None = None
    exact: bool = False
    compile: bool = False
    uncertainty: bool = False
    count: int = Field(1, ge=1, le=16)


class RunConfig(BaseModel):
    """One acquisition run.

    Attributes
    ----------
    microscope : str | dict
        ``simulated``; ``{replay: PATH}`` to play back recorded z-stacks (a TIFF file
        or a folder, see `livestain.devices.replay`); or the path of a Micro-Manager
        ``.cfg`` file. Relative paths are relative to the run config's folder.
    out : Path
        Dataset folder.
    plan : dict | str
        A useq-schema MDASequence as a mapping, or the path of a file useq can read.
    model : str | None
        Model checkpoint for the worker; None uses the bundled model.
    host, port : str, int
        Where the daemon listens; 127.0.0.1 keeps it private to this computer.
    spawn_worker : bool
        Start a local worker (false when workers run on another host).
    seed : int
        Sample seed of the simulated microscope.
    policies : Policies
        Disk margin, live backlog, resend and drain timeouts, streamed channels.
    keys : str | None
        CURVE key folder from ``livestain keys``; required when ``host`` is not loopback.
    worker : WorkerConfig
        The local worker's device, precision, compilation and uncertainty.
    """

    model_config = ConfigDict(extra="forbid")

    microscope: str | dict[str, str] = "simulated"
    out: Path
    plan: dict[str, Any] | str
    model: str | None = None
    host: str = wire.DEFAULT_HOST
    port: int = Field(wire.DEFAULT_BASE_PORT, ge=1024, le=65532)
    spawn_worker: bool = True
    seed: int = 0
    policies: Policies = Field(default_factory=Policies)
    keys: str | None = None
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    base_dir: Path = Field(Path("."), exclude=True)

    @field_validator("microscope")
    @classmethod
    def _check_microscope(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if set(v) != {"replay"} or not isinstance(v["replay"], str) or not v["replay"]:
                raise ValueError(
                    "a mapping must be {replay: PATH} (recorded stacks to play back)"
                )
            return v
        if v == "simulated" or str(v).lower().endswith(".cfg"):
            return v
        raise ValueError(
            "must be `simulated`, `{replay: PATH}` or the path of a Micro-Manager .cfg file"
        )

    def plan_data(self) -> dict[str, Any]:
        """The plan as a mapping, read from its file when ``plan:`` is a path."""
        if not isinstance(self.plan, str):
            return self.plan
        path = (self.base_dir / self.plan).resolve()
        if not path.is_file():
            raise ValueError(f"plan file {path} does not exist; fix `plan:` in the run config")
        try:
            data = yaml.safe_load(path.read_text())  # JSON is YAML too
        except yaml.YAMLError as e:
            raise ValueError(f"plan file {path} is not valid YAML or JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"plan file {path} must hold a mapping (time_plan:, z_plan:, channels: ...)")
        return data

    def sequence(self) -> useq.MDASequence:
        return useq.MDASequence.model_validate(self.plan_data())

    def build_core(self):  # noqa: ANN201
        if isinstance(self.microscope, dict):
            from livestain.devices.replay import build_replay_core

            path = (self.base_dir / self.microscope["replay"]).resolve()
            if not path.exists():
                raise ValueError(f"replay data {path} does not exist; fix `microscope: {{replay: ...}}`")
            return build_replay_core(path)
        if self.microscope == "simulated":
            from livestain.devices.simulated import SimulatedScope, build_simulated_core

            return build_simulated_core(SimulatedScope(seed=self.seed))
        from livestain.devices.hardware import load_hardware_core

        return load_hardware_core((self.base_dir / self.microscope).resolve())

    def session_options(self, show_window: bool) -> SessionOptions:
        return SessionOptions(
            out_dir=(self.base_dir / self.out).resolve(),
            host=self.host,
            base_port=self.port,
            model=str((self.base_dir / self.model).resolve()) if self.model else None,
            spawn_worker=self.spawn_worker,
            show_window=show_window,
            policies=self.policies,
            keys=str((self.base_dir / self.keys).resolve()) if self.keys else None,
            device=self.worker.device,
            exact=self.worker.exact,
            compile=self.worker.compile,
            uncertainty=self.worker.uncertainty,
            workers=self.worker.count,
        )


def load_run_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read and validate a run config; errors name the field, the value and the fix.

    ``overrides`` (``out``, ``host``, ``port``, ``keys``, ``model``) replace the file's
    settings where not None: the command line's ``--out``, ``--connect``, ``--port``,
    ``--keys``, ``--model``. Paths given on the command line are relative to the current
    folder, not to the config's.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"run config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"run config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"run config {path} must be a mapping of settings (microscope:, out:, plan:)")
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in ("out", "keys", "model"):
        if key in given:
            given[key] = str(Path(given[key]).resolve())  # absolute: base_dir must not apply
    try:
        cfg = RunConfig.model_validate(data | given | {"base_dir": path.parent})
    except ValidationError as e:
        raise ValueError(f"run config {path}: {_first_error(e)}") from None
    if unknown := unknown_keys(cfg.plan_data()):
        raise ValueError(
            f"run config {path}: plan has setting(s) that useq-schema does not know: "
            f"{', '.join('plan.' + k for k in unknown)}. Check the spelling (see useq-schema's "
            f"MDASequence: time_plan {{interval, loops}}, z_plan {{range, step}}, channels {{config, "
            f"exposure}}, stage_positions {{x, y, z, name}})."
        )
    try:
        check_plan(cfg.sequence(), cfg.policies.stream_channels)
    except ValidationError as e:
        raise ValueError(
            f"run config {path}: plan.{_first_error(e)} (see useq-schema's MDASequence)"
        ) from None
    return cfg


def _first_error(e: ValidationError) -> str:
    """The most specific error: the one with the longest location wins over union noise."""
    err = max(e.errors(), key=lambda x: len(x["loc"]) if x["type"] != "missing" else 0)
    where = ".".join(str(x) for x in err["loc"] if not str(x)[:1].isupper())
    return f"`{where}` = {err.get('input')!r}: {err['msg']}"

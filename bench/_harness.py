"""What the soak and latency benches share: a daemon on the simulated scope with a
supervised worker process, as `livestain demo` runs it, minus the console."""

from __future__ import annotations

import tempfile
from pathlib import Path

import useq

from livestain import wire
from livestain.acquisition.daemon import Daemon, DaemonHooks
from livestain.acquisition.policies import Policies
from livestain.acquisition.supervisor import WorkerSupervisor
from livestain.devices.simulated import SimulatedScope, build_simulated_core


def simulated_run(name: str, sequence: useq.MDASequence, port: int,
                  policies: Policies, scope: SimulatedScope | None = None,
                  ) -> tuple[Daemon, WorkerSupervisor]:
    """A daemon writing to a fresh temporary folder and its (started) worker;
    ``scope`` replaces the default simulated scope (the soaks' small, fast one)."""
    out = Path(tempfile.mkdtemp(prefix=f"livestain-{name}-")) / "run"
    supervisor = WorkerSupervisor(["worker", "--port", str(port)], report=print)
    daemon = Daemon(build_simulated_core(scope or SimulatedScope()), sequence, out,
                    wire.endpoints(base_port=port), policies, report=lambda line: None,
                    hooks=DaemonHooks(on_tick=supervisor.check, on_hung_worker=supervisor.kill_hung,
                                      extra_status=supervisor.status))
    supervisor.on_restart = daemon.predictions.requeue_in_flight
    supervisor.start()
    return daemon, supervisor

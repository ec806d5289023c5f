"""One typed status (`livestain.run_status.RunStatus`) for the control reply, `status
--json`, the window and docs/wire.md (issue 14): a field the daemon adds without declaring
it fails here instead of drifting from what clients read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from livestain import wire
from livestain.acquisition.daemon import Daemon, DaemonHooks
from livestain.acquisition.policies import Policies
from livestain.devices.simulated import SimulatedScope, build_simulated_core
from livestain.launch import demo_sequence
from livestain.run_status import RunStatus, fields_table

WIRE_DOC = Path(__file__).resolve().parents[1] / "docs" / "wire.md"


def _daemon(tmp_path: Path, port: int, **kw) -> Daemon:
    return Daemon(build_simulated_core(SimulatedScope()), demo_sequence(3, 0.0), tmp_path / "run",
                  wire.endpoints(base_port=port), Policies(drain_timeout_s=0.3), report=lambda line: None, **kw)


def _close(daemon: Daemon) -> None:
    daemon.sockets.close()
    daemon.journal.close()
    daemon.folder.release_lock()


def test_the_wire_doc_lists_every_status_field_as_the_model_declares_it() -> None:
    doc = WIRE_DOC.read_text()
    table = re.search(r"<!-- status-table -->\n(.*?)\n<!-- /status-table -->", doc, re.S)
    assert table is not None, "docs/wire.md lost its status table markers"
    assert table.group(1) == fields_table(), "regenerate: python -c 'from livestain.run_status import fields_table; print(fields_table())'"


def test_a_daemons_status_is_a_run_status_and_an_undeclared_field_is_refused(tmp_path, base_port) -> None:
    daemon = _daemon(tmp_path, base_port, hooks=DaemonHooks(extra_status=lambda: {
        "worker_pid": 42, "worker_alive": True, "worker_restarts": 0}))
    try:
        status = RunStatus.model_validate(daemon.status())
        assert status.state == "acquiring" and status.timepoints == 3 and status.worker_pid == 42
        assert status.stacks_total == 3 and status.out_dir == str(tmp_path / "run")
        daemon.hooks.extra_status = lambda: {"worker_cpu": 0.5}  # a field nobody declared
        with pytest.raises(ValidationError, match="worker_cpu"):
            daemon.status()
        daemon.hooks.extra_status = lambda: {"worker_pid": "forty-two"}  # a declared field of the wrong type
        with pytest.raises(ValidationError, match="worker_pid"):
            daemon.status()
    finally:
        _close(daemon)


def test_a_client_keeps_what_it_knows_of_a_newer_daemons_status(tmp_path, base_port) -> None:
    daemon = _daemon(tmp_path, base_port)
    try:
        body = {"schema": wire.SCHEMA, "kind": "reply", "ok": True} | daemon.status() | {"new_in_v2": [1, 2]}
    finally:
        _close(daemon)
    status = RunStatus.from_reply(body)
    assert status.run_id == daemon.run_id and not hasattr(status, "new_in_v2")
    with pytest.raises(ValidationError, match="stacks_acquired"):
        RunStatus.from_reply(body | {"stacks_acquired": "many"})


def test_status_json_prints_the_models_fields(tmp_path, base_port, capsys) -> None:
    """`livestain status --json` against a real daemon: exactly the model's fields."""
    import json
    import threading

    from livestain.cli import main

    daemon = _daemon(tmp_path, base_port)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if daemon.sockets.control.poll(20):
                daemon.control.answer(daemon.sockets.control)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert main(["status", "--json", "--port", str(base_port)]) == 0
    finally:
        stop.set()
        thread.join(5)
        _close(daemon)
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) - {"ok", "schema", "kind"} == set(RunStatus.model_fields)

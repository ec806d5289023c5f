"""The whole loop with real processes on loopback: daemon, worker, files, control."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from livestain.devices.pairs import simulate_pairs
from livestain.inference.train import pearson

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "livestain.cli"]
from _helpers import run_predictions, run_stacks


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_headless_writes_a_prediction_for_every_stack(tmp_path, base_port) -> None:
    out = tmp_path / "run"
    proc = _run(["demo", "--headless", "--timepoints", "2", "--interval", "0",
                 "--out", str(out), "--port", str(base_port)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 stacks acquired, 2 predicted" in proc.stdout
    assert "mean latency" in proc.stdout
    raws, preds = run_stacks(out), run_predictions(out)
    assert len(raws) == 2 and len(preds) == 2
    (truth,) = simulate_pairs([(0, 0)], seed=0)  # the demo's tile, seed and z-plan
    for (raw, raw_info), (pred, pred_info) in zip(raws, preds):
        assert (raw_info["t"], raw_info["p"]) == (pred_info["t"], pred_info["p"])
        assert pred_info["source_seq"] == raw_info["seq"]
        assert pred_info["structures"] == ["dna", "membrane", "mitochondria"]
        assert raw.shape == (16, 256, 256) and raw.dtype == np.uint16
        assert pred.shape == (3, *raw.shape) and pred.dtype == np.float32
        assert raw_info["voxel_size_um"] == pytest.approx(pred_info["voxel_size_um"])
        assert raw_info["voxel_size_um"] == pytest.approx((1.0, 0.325, 0.325))
        assert raw_info["gaps"] == []
        # the planes are the simulated sample at the planned focus positions
        assert pearson(raw.astype(float), truth.brightfield.astype(float)) > 0.8
        # and the prediction finds the nuclei and membranes of the simulated cells
        assert pearson(pred[0], truth.targets[0]) > 0.5
        assert pearson(pred[1], truth.targets[1]) > 0.5
    run = json.loads((out / "run.json").read_text())
    assert run["run_id"] == raw_info["run_id"]


def test_refuses_to_overwrite_an_existing_run(tmp_path, base_port) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    proc = _run(["demo", "--headless", "--timepoints", "1", "--out", str(out), "--port", str(base_port)])
    assert proc.returncode == 2
    assert "already holds a livestain run" in proc.stderr
    assert (out / "run.json").read_text() == "{}"


def test_status_and_stop_over_the_control_socket(tmp_path, base_port) -> None:
    out = tmp_path / "run"
    daemon = subprocess.Popen(
        [*CLI, "demo", "--headless", "--timepoints", "500", "--interval", "0.5",
         "--out", str(out), "--port", str(base_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        status = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            proc = _run(["status", "--json", "--port", str(base_port)], timeout=30)
            if proc.returncode == 0:
                status = json.loads(proc.stdout)
                if status["stacks_predicted"] >= 1:
                    break
            time.sleep(0.5)
        assert status is not None and status["stacks_predicted"] >= 1, status
        assert status["state"] == "acquiring" and status["out_dir"] == str(out)
        # a viewer attaches, draws a prediction, saves it and closes: the run goes on
        shot = tmp_path / "window.png"
        view = _run(["view", "--port", str(base_port), "--screenshot", str(shot)], timeout=120)
        assert view.returncode == 0, view.stderr[-2000:]
        assert shot.stat().st_size > 10_000
        after = json.loads(_run(["status", "--json", "--port", str(base_port)], timeout=30).stdout)
        assert after["run_id"] == status["run_id"] and after["state"] == "acquiring"
        assert after["stacks_acquired"] > status["stacks_acquired"]
        # pause holds acquisition, resume lets it go on
        assert _run(["pause", "--port", str(base_port)], timeout=30).returncode == 0

        def acquired() -> dict:
            return json.loads(_run(["status", "--json", "--port", str(base_port)], timeout=30).stdout)

        paused = acquired()
        assert paused["state"] == "paused"
        # frames already taken are still written; then the count must stop for good
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            before = acquired()
            time.sleep(1.5)  # 3 intervals of the plan
            still = acquired()
            if still["stacks_acquired"] == before["stacks_acquired"]:
                break
        assert still["stacks_acquired"] == before["stacks_acquired"], "acquisition went on while paused"
        assert still["state"] == "paused"
        assert _run(["resume", "--port", str(base_port)], timeout=30).returncode == 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            going = json.loads(_run(["status", "--json", "--port", str(base_port)], timeout=30).stdout)
            if going["state"] == "acquiring" and going["stacks_acquired"] > still["stacks_acquired"]:
                break
            time.sleep(0.3)
        assert going["stacks_acquired"] > still["stacks_acquired"]
        assert _run(["stop", "--port", str(base_port)], timeout=30).returncode == 0
        stdout, stderr = daemon.communicate(timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert "(stopped early)" in stdout, stderr[-2000:]
    raws = run_stacks(out)
    assert 1 <= len(raws) < 500
    for raw, _ in raws:  # every stack written before the stop is complete and readable
        assert raw.shape == (16, 256, 256) and raw.mean() > 100
    assert not list(out.rglob("*.partial"))


def test_status_without_a_daemon_says_so_in_one_line(base_port) -> None:
    proc = _run(["status", "--port", str(base_port)], timeout=30)
    assert proc.returncode == 2
    assert "No livestain daemon answered" in proc.stderr
    assert "Traceback" not in proc.stderr

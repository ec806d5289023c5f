"""A user's real Micro-Manager config: clear errors naming the missing adapters."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livestain.devices.hardware import load_hardware_core


def test_missing_adapters_are_named_with_how_to_install(shared_data) -> None:
    cfg = next((shared_data / "mm_configs").rglob("mantis-V2.cfg"))
    with pytest.raises(OSError) as info:
        load_hardware_core(cfg)
    message = str(info.value)
    for adapter in ("ASITiger", "NikonTi2", "PVCAM", "SpinnakerCamera"):
        assert adapter in message
    assert "mmcore install" in message and "check-config" in message


def test_run_with_a_hardware_config_fails_in_one_line(shared_data, tmp_path) -> None:
    cfg = next((shared_data / "mm_configs").rglob("mantis-V2.cfg"))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"microscope: {cfg}\nout: {tmp_path / 'out'}\n"
        "plan: {channels: [{config: Brightfield}], z_plan: {range: 4, step: 1}}\n"
    )
    proc = subprocess.run([sys.executable, "-m", "livestain.cli", "run", str(config), "--headless"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs Micro-Manager device adapters" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing created for a run that never started

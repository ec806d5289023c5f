"""Real microscopes: a user's Micro-Manager ``.cfg`` loaded through pymmcore-plus."""

from __future__ import annotations

from pathlib import Path

from ._quiet import quiet_unicore
from .mmconfig import check_config, missing_adapters


def load_hardware_core(cfg_path: Path):  # noqa: ANN201  (-> CMMCorePlus)
    """A core with the user's hardware configuration loaded.

    Raises `OSError` naming the file and, when device adapters are missing, how to get
    them (``mmcore install`` on Windows/macOS; build Micro-Manager on Linux).
    """
    if not cfg_path.is_file():
        raise OSError(f"Micro-Manager config {cfg_path} does not exist")
    with quiet_unicore():
        from pymmcore_plus import CMMCorePlus

        core = CMMCorePlus()
    report = check_config(cfg_path)  # a ValueError naming the line for a non-config file
    available = set(core.getDeviceAdapterNames()) if core.getDeviceAdapterSearchPaths() else set()
    missing = missing_adapters(report, available)
    if missing:
        raise OSError(
            f"{cfg_path} needs Micro-Manager device adapters that are not installed here: "
            f"{', '.join(missing)}. Install Micro-Manager with them: `mmcore install` "
            f"(Windows/macOS) or build Micro-Manager from source (Linux); then try again. "
            f"`livestain check-config {cfg_path}` shows what else the file needs."
        )
    try:
        core.loadSystemConfiguration(str(cfg_path))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"Could not load {cfg_path}: {first}. Check the devices are connected and "
            f"switched on; `livestain check-config {cfg_path}` lists what the file expects."
        ) from None
    return core

"""Real microscopes: a user's Micro-Manager ``.cfg`` loaded through pymmcore-plus."""

from __future__ import annotations

from pathlib import Path

from ._quiet import quiet_unicore


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
    try:
        core.loadSystemConfiguration(str(cfg_path))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"Could not load {cfg_path}: {first}. The Micro-Manager device adapters it "
            f"names must be installed: run `mmcore install` (Windows/macOS) or build "
            f"Micro-Manager from source (Linux), then try again."
        ) from None
    return core

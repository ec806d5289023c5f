"""The fluorescence light a run used, against what the same run with fluorescence at
every time point would have used: the figure that says what leaving the lamp off saved.

The scope's camera keeps a ledger of the light it was exposed to (the simulated one
does: a ``DoseLedger`` property). It is read on the MDA thread when a stack's last
plane arrives, so the daemon loop never talks to the hardware while the runner does,
and stored with the stack it belongs to.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .stacks import StackKey

log = logging.getLogger(__name__)


class LightDose:
    """Per-stack readings of the camera's light ledger, and the run's dose figures.

    Parameters
    ----------
    equivalent_exposure_ms : float
        Exposure per plane and structure of the fluorescence run it is compared with.
    """

    def __init__(self, equivalent_exposure_ms: float) -> None:
        self.equivalent_exposure_ms = equivalent_exposure_ms
        self._by_stack: dict[StackKey, dict | None] = {}
        self.last: dict | None = None
        self.streamed_stacks = 0  # this session's stacks of streamed (brightfield) channels

    def read(self, core: Any, key: StackKey) -> None:
        """On the MDA thread, as a stack's last plane arrives: the camera's ledger now."""
        self._by_stack[key] = _camera_ledger(core)

    def take(self, key: StackKey) -> dict | None:
        """The ledger read for this stack (once), remembered as the latest; returned as
        the run's totals per channel (`run_totals`), what each stack's record keeps."""
        ledger = self._by_stack.pop(key, None)
        if ledger is None:
            return None
        self.last = ledger
        return run_totals(ledger)

    def status(self, planes: int, structures: int) -> dict[str, Any]:
        """Fluorescence light used so far, and what the same run with fluorescence would use."""
        # per brightfield (streamed) stack: paired and check-frame fluorescence stacks are
        # the light being counted, not stacks a fluorescence run would also take
        avoided = self.streamed_stacks * planes * structures * self.equivalent_exposure_ms
        used = None
        if self.last is not None:
            used = sum(p.get("fluorescence_dose", 0.0) for p in self.last.get("positions", {}).values())
        return {
            "fluorescence_dose_ms": used,
            "equivalent_fluorescence_run_dose_ms": avoided,
            "dose_note": (f"a fluorescence run would expose {structures} channels x {planes} planes x "
                          f"{self.equivalent_exposure_ms:g} ms per stack"),
        }


def run_totals(ledger: dict) -> dict[str, Any]:
    """The camera's ledger summed over positions: light per channel, fluorescence in all,
    positions harmed so far.

    Each stack's record keeps this, not the ledger itself: that has an entry per
    position, so on a run of 96 positions it took 12 KB per stack in the journal (the
    soak found it: 69 MB of journal at 5,000 stacks); this is a few hundred bytes.
    """
    channels: dict[str, dict[str, float]] = {}
    positions = ledger.get("positions", {}).values()
    for position in positions:
        for name, c in position.get("channels", {}).items():
            total = channels.setdefault(name, {"dose": 0.0, "exposures": 0})
            total["dose"] = round(total["dose"] + c.get("dose", 0.0), 6)
            total["exposures"] += c.get("exposures", 0)
    return {"unit": ledger.get("unit", ""), "channels": channels,
            "fluorescence_dose": round(sum(p.get("fluorescence_dose", 0.0) for p in positions), 6),
            "positions_harmed": sum(p.get("harmed_at_s") is not None for p in positions)}


def _camera_ledger(core: Any) -> dict | None:
    """The camera's light-dose ledger (the simulated scope has one), else None."""
    cam = core.getCameraDevice()
    try:
        if cam and core.hasProperty(cam, "DoseLedger"):
            return json.loads(core.getProperty(cam, "DoseLedger"))
    except (RuntimeError, ValueError):
        log.warning("could not read the camera's dose ledger")
    return None

"""Light dose, photobleaching and phototoxicity of the simulated sample.

Every fluorescence exposure (light path not ``Brightfield``, shutter open) adds
``exposure_ms x intensity`` (intensity 1.0 = full lamp power) to a cumulative dose per
channel and per stage position (sample tile). Brightfield exposures are counted too,
with dose 0: transmitted light is not what bleaches a fluorophore or harms a cell.

* Photobleaching: a channel's signal at a position is multiplied by
  ``exp(-dose / bleach_dose_ms[structure])``, averaged over each exposure (the
  fluorophore bleaches while the camera integrates).
* Phototoxicity: once the total fluorescence dose at a position passes
  ``harm_dose_ms``, its cells are harmed: they stop moving (migration and mitochondrial
  motion freeze at the time the threshold was crossed). Rounding up is not modelled.

`DoseLedger.as_dict()` is what the camera's read-only ``DoseLedger`` property returns
(as JSON) and what `SimulatedScope.dose_ledger()` returns, for a daemon to record in
each stack's metadata: the measured light budget of a run.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from .sample import STRUCTURES

#: Unit of every dose in the ledger.
DOSE_UNIT = "ms x relative intensity (1.0 = full lamp power)"


def _default_bleach() -> dict[str, float]:
    # dose (ms at full power) that bleaches a channel to 1/e: a 16-plane stack at
    # 10 ms is 160, so mitochondria dyes (fastest) lose ~15 % per stack
    return {"dna": 3000.0, "membrane": 1500.0, "mitochondria": 1000.0}


@dataclass(frozen=True)
class PhotoConfig:
    """How the sample responds to fluorescence light.

    Attributes
    ----------
    bleach_dose_ms : dict[str, float]
        Per structure, the cumulative dose at which its signal has fallen to 1/e.
    harm_dose_ms : float
        Total fluorescence dose at a position past which its cells stop moving.
    """

    bleach_dose_ms: dict[str, float] = field(default_factory=_default_bleach)
    harm_dose_ms: float = 4000.0

    def __post_init__(self) -> None:
        missing = [s for s in STRUCTURES if s not in self.bleach_dose_ms]
        if missing:
            raise ValueError(f"PhotoConfig.bleach_dose_ms lacks {missing}")


def tile_key(tile: tuple[int, int]) -> str:
    """Ledger key of a sample tile: ``"row,col"`` (the frame metadata's livestain_tile)."""
    return f"{tile[0]},{tile[1]}"


class DoseLedger:
    """Cumulative light dose per (position, channel); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dose: dict[tuple[str, str], float] = {}
        self._count: dict[tuple[str, str], int] = {}
        self._fluor: dict[str, float] = {}
        self._harmed_at: dict[str, float] = {}

    def dose(self, tile: tuple[int, int], channel: str) -> float:
        with self._lock:
            return self._dose.get((tile_key(tile), channel), 0.0)

    def fluorescence_dose(self, tile: tuple[int, int]) -> float:
        """Total fluorescence dose, all channels, at one position."""
        with self._lock:
            return self._fluor.get(tile_key(tile), 0.0)

    def harmed_at(self, tile: tuple[int, int]) -> float | None:
        """Scope time (s) at which the position's cells were harmed, None if never."""
        with self._lock:
            return self._harmed_at.get(tile_key(tile))

    def expose(
        self,
        tile: tuple[int, int],
        channel: str,
        dose: float,
        t_s: float,
        harm_dose_ms: float,
        fluorescent: bool,
    ) -> tuple[float, float]:
        """Record one exposure; returns the channel's dose (before, after) it."""
        key = (tile_key(tile), channel)
        add = float(dose) if fluorescent else 0.0
        with self._lock:
            before = self._dose.get(key, 0.0)
            self._dose[key] = before + add
            self._count[key] = self._count.get(key, 0) + 1
            if fluorescent:
                total = self._fluor.get(key[0], 0.0) + add
                self._fluor[key[0]] = total
                if total > harm_dose_ms and key[0] not in self._harmed_at:
                    self._harmed_at[key[0]] = float(t_s)
            return before, before + add

    def as_dict(self) -> dict:
        """JSON-ready snapshot::

            {"unit": "...", "positions": {"0,0": {
                "channels": {"Dna": {"dose": 160.0, "exposures": 16},
                             "Brightfield": {"dose": 0.0, "exposures": 32}},
                "fluorescence_dose": 160.0, "harmed_at_s": null}}}
        """
        with self._lock:
            positions: dict[str, dict] = {}
            for (pos, channel), d in sorted(self._dose.items()):
                entry = positions.setdefault(
                    pos,
                    {
                        "channels": {},
                        "fluorescence_dose": round(self._fluor.get(pos, 0.0), 6),
                        "harmed_at_s": self._harmed_at.get(pos),
                    },
                )
                entry["channels"][channel] = {
                    "dose": round(d, 6),
                    "exposures": self._count[(pos, channel)],
                }
            return {"unit": DOSE_UNIT, "positions": positions}


def bleach_factor(dose_before: float, dose_after: float, k: float) -> float:
    """Mean of ``exp(-dose / k)`` over an exposure taking the dose from before to after."""
    if dose_after <= dose_before:
        return math.exp(-dose_before / k)
    return k / (dose_after - dose_before) * (
        math.exp(-dose_before / k) - math.exp(-dose_after / k)
    )

"""A small, fast simulated run for soaks: many tiny stacks over many positions.

A three-day run is about the number of stacks, files, journal rows and worker
round-trips, not their size, so the soak uses 4-plane stacks of 32x32 pixels over 96
positions (one sample tile each): the loop, the disk, the journal and the workers see
the same per-stack traffic as a real run, at hundreds of times the pace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import useq

from livestain.devices.sample import SampleGeometry
from livestain.devices.simulated import SimulatedScope
from livestain.devices.optics import FieldRenderer


@dataclass
class CachedScope(SimulatedScope):
    """The simulated scope with every visited tile's renderer kept.

    `SimulatedScope` keeps 8 tiles (a real sample stays put, so 8 is plenty); a soak
    cycling 96 positions would rebuild a tile's cells (~30 ms) on every stack and
    measure the sample simulator instead of livestain.
    """

    def renderer(self, tile: tuple[int, int], t_s: float | None = None) -> FieldRenderer:
        cache = self.__dict__.setdefault("_all_renderers", {})
        key = (tile, self.novel(t_s))
        if key not in cache:
            cache[key] = super().renderer(tile, t_s)
        return cache[key]


def small_scope(yx: int = 32, seed: int = 0) -> CachedScope:
    """A scope whose camera is ``yx`` x ``yx`` pixels (one sample tile per field)."""
    return CachedScope(seed=seed, geometry=SampleGeometry(shape=(40, yx, yx)))


def days_sequence(stacks: int, positions: int = 96, planes: int = 4, yx: int = 32,
                  interval_s: float = 0.0) -> useq.MDASequence:
    """``positions`` fields, each a ``planes``-plane brightfield stack per time point, with
    enough time points for at least ``stacks`` stacks; ``interval_s`` paces time points."""
    field_um = SampleGeometry(shape=(40, yx, yx)).field_um[1]
    return useq.MDASequence(
        axis_order="tpcz",
        stage_positions=[{"x": i * field_um, "y": 0.0, "z": 4.0, "name": f"Pos{i}"}
                         for i in range(positions)],
        time_plan={"interval": interval_s, "loops": max(1, math.ceil(stacks / positions))},
        channels=[{"config": "Brightfield", "exposure": 1.0}],
        z_plan={"range": float(planes - 1), "step": 1.0},
    )

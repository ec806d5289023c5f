"""Where the sample is along z, over time: the focus track per position, from status.

The daemon estimates every stack's focal plane from its brightfield (`livestain.focus`)
and reports, per position, the latest estimate and the z correction focus tracking has
applied. This plot keeps what it has seen of them (bounded) and draws, per position,
the sample's height relative to the plan (correction + the cells' offset from the
stack's centre: the drift) and the correction (where tracking put the stack). A drift
line walking away from zero with a flat correction line is a sample leaving its stack:
turn on ``policies.track_focus`` or re-centre the z plan.
"""

from __future__ import annotations

import collections
from typing import Any

import pyqtgraph as pg

#: Points kept per position (a poll a second: over half an hour of samples at full rate).
KEPT = 2000


class FocusPlot(pg.PlotWidget):
    """Sample height and z correction per position against time point."""

    def __init__(self, parent=None) -> None:  # noqa: ANN001
        super().__init__(parent)
        self.setMinimumHeight(140)
        self.setLabel("left", "z (um, from the plan)")
        self.setLabel("bottom", "time point")
        self.setTitle("focus: sample (solid) and stack correction (dashed)")
        self.addLegend(offset=(5, 5))
        self.showGrid(x=True, y=True, alpha=0.3)
        #: per position: (t, sample z or None, correction the stack was taken at), one per
        #: time point seen
        self.tracks: dict[str, collections.deque[tuple[int, float | None, float]]] = {}
        self._curves: dict[str, tuple[pg.PlotDataItem, pg.PlotDataItem]] = {}

    def add_status(self, status: dict[str, Any]) -> None:
        """Take one status reply's ``focus`` (absent: an older daemon, nothing drawn)."""
        focus = status.get("focus")
        if not isinstance(focus, dict):
            return
        changed = False
        for p, latest in focus.items():
            if not isinstance(latest, dict) or "t" not in latest:
                continue
            track = self.tracks.setdefault(str(p), collections.deque(maxlen=KEPT))
            t = int(latest["t"])
            if track and track[-1][0] == t:
                continue  # this time point is drawn already
            # the stack's own correction: its offset was measured from where it was taken
            correction = float(latest.get("taken_at_um", latest.get("correction_um")) or 0.0)
            offset = latest.get("offset_um")
            track.append((t, None if offset is None else correction + float(offset), correction))
            changed = True
        if changed:
            self._redraw()

    def _redraw(self) -> None:
        for i, (p, track) in enumerate(sorted(self.tracks.items(), key=lambda kv: int(kv[0]))):
            if p not in self._curves:
                color = pg.intColor(i, hues=9)
                sample = self.plot([], [], pen=pg.mkPen(color, width=2), name=f"p{int(p) + 1}")
                stage = self.plot([], [], pen=pg.mkPen(color, width=1, style=pg.QtCore.Qt.PenStyle.DashLine))
                self._curves[p] = (sample, stage)
            sample, stage = self._curves[p]
            found = [(t, z) for t, z, _ in track if z is not None]
            sample.setData([t + 1 for t, _ in found], [z for _, z in found])
            stage.setData([t + 1 for t, _, _ in track], [c for _, _, c in track])


class CheckPlot(pg.PlotWidget):
    """Live r of each check frame (prediction against real fluorescence) over time, per
    structure and position: the closed loop's evidence that the overlay is still right."""

    def __init__(self, parent=None) -> None:  # noqa: ANN001
        super().__init__(parent)
        self.setMinimumHeight(120)
        self.setLabel("left", "check r")
        self.setLabel("bottom", "time point")
        self.setTitle("check frames: Pearson r against real fluorescence")
        self.setYRange(0.0, 1.0)
        self.addLegend(offset=(5, 5))
        self.showGrid(x=True, y=True, alpha=0.3)
        #: (structure, position) -> (t, r), one per check frame seen
        self.scores: dict[tuple[str, str], collections.deque[tuple[int, float]]] = {}
        self._curves: dict[tuple[str, str], pg.PlotDataItem] = {}

    def add_status(self, status: dict[str, Any]) -> None:
        """Take one status reply's ``checks`` (the last score per structure)."""
        checks = status.get("checks")
        if not isinstance(checks, dict):
            return
        changed = False
        for structure, c in checks.items():
            last = c.get("last") if isinstance(c, dict) else None
            if not isinstance(last, dict):
                continue
            key = (str(structure), str(last.get("p", 0)))
            series = self.scores.setdefault(key, collections.deque(maxlen=KEPT))
            point = (int(last["t"]), float(last["pearson"]))
            if series and series[-1][0] == point[0]:
                continue
            series.append(point)
            changed = True
        if changed:
            self._redraw()

    def _redraw(self) -> None:
        from livestain.ui.colors import structure_color

        for key, series in self.scores.items():
            if key not in self._curves:
                structure, p = key
                self._curves[key] = self.plot([], [], pen=pg.mkPen(structure_color(structure), width=2),
                                              symbol="o", symbolSize=5, name=f"{structure} p{int(p) + 1}")
            self._curves[key].setData([t + 1 for t, _ in series], [r for _, r in series])

"""The image area: an XY view with orthogonal XZ (below) and YZ (right) views.

Each view holds a grey brightfield image and an RGBA overlay on top. All views work in
full-resolution pixel units of the stack (images drawn at a reduced resolution are
stretched back with ``setRect``), so the crosshair, the tests and the user all talk
about the same coordinates whatever the display stride. The XZ/YZ views are scaled by
the voxel aspect (z step / pixel size) so cells look as tall as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore

CROSS_PEN = pg.mkPen((255, 220, 0, 160), width=1, style=QtCore.Qt.PenStyle.DashLine)
Z_PEN = pg.mkPen((255, 220, 0, 110), width=1, style=QtCore.Qt.PenStyle.DotLine)


class Layer:
    """A grey base image and an RGBA overlay in one view box.

    ``refit`` is called when the image's extent changes (the XY view fits itself to
    the image; section views follow the XY view's scale).
    """

    def __init__(self, view: pg.ViewBox, refit: Callable[[], None] | None = None) -> None:
        self.view = view
        self.refit = refit or (lambda: view.autoRange(padding=0))
        self.base = pg.ImageItem(axisOrder="row-major")
        self.overlay = pg.ImageItem(axisOrder="row-major")
        self.overlay.setZValue(1)
        view.addItem(self.base)
        view.addItem(self.overlay)
        self.rect = QtCore.QRectF()

    def show(self, base: np.ndarray | None, levels: tuple[float, float], overlay: np.ndarray,
             rect: QtCore.QRectF) -> None:
        """Draw ``base`` (y, x) with grey ``levels`` and ``overlay`` (y, x, 4) in ``rect``."""
        if base is not None:
            self.base.setImage(base, levels=levels, autoLevels=False)
            self.base.setRect(rect)
        self.base.setVisible(base is not None)
        self.overlay.setImage(overlay, levels=(0, 255), autoLevels=False)
        self.overlay.setRect(rect)
        if rect != self.rect:
            self.rect = QtCore.QRectF(rect)
            self.refit()


class OrthoViews(pg.GraphicsLayoutWidget):
    """XY, XZ and YZ views with a crosshair (x, y) and a z marker."""

    #: The user moved the crosshair: full-resolution (x, y) pixel position.
    crosshair_moved = QtCore.Signal(int, int)

    def __init__(self) -> None:
        super().__init__()
        self.xy_box = self.addViewBox(row=0, col=0, lockAspect=True, invertY=True)
        self.yz_box = self.addViewBox(row=0, col=1, invertY=True, enableMouse=False)
        self.xz_box = self.addViewBox(row=1, col=0, invertY=True, enableMouse=False)
        layout = self.ci.layout
        layout.setColumnStretchFactor(0, 4)
        layout.setColumnStretchFactor(1, 1)
        layout.setRowStretchFactor(0, 4)
        layout.setRowStretchFactor(1, 1)
        self.xy = Layer(self.xy_box)
        self.xz = Layer(self.xz_box, self.sync_sections)
        self.yz = Layer(self.yz_box, self.sync_sections)
        # Sections follow the XY view's pan and zoom, one way, by hand: pyqtgraph's
        # setXLink/setYLink made the interpreter abort at exit (PySide6 6.12, a refcount
        # error during garbage collection), and a locked aspect would fight the link.
        self.xy_box.sigRangeChanged.connect(self.sync_sections)
        for box in (self.xy_box, self.xz_box, self.yz_box):
            box.sigResized.connect(self.sync_sections)
        self.vline = pg.InfiniteLine(angle=90, movable=True, pen=CROSS_PEN)
        self.hline = pg.InfiniteLine(angle=0, movable=True, pen=CROSS_PEN)
        for line in (self.vline, self.hline):
            line.setZValue(2)
            self.xy_box.addItem(line, ignoreBounds=True)
            line.sigPositionChanged.connect(self._lines_moved)
        self.xz_x = pg.InfiniteLine(angle=90, pen=CROSS_PEN)
        self.xz_z = pg.InfiniteLine(angle=0, pen=Z_PEN)
        self.yz_y = pg.InfiniteLine(angle=0, pen=CROSS_PEN)
        self.yz_z = pg.InfiniteLine(angle=90, pen=Z_PEN)
        for box, items in ((self.xz_box, (self.xz_x, self.xz_z)), (self.yz_box, (self.yz_y, self.yz_z))):
            for item in items:
                item.setZValue(2)
                box.addItem(item, ignoreBounds=True)
        self.scene().sigMouseClicked.connect(self._clicked)
        self._quiet = False
        self.cross = (0, 0)
        self.setToolTip("click or drag the dashed lines to choose the XZ / YZ sections")

    def set_crosshair(self, x: int, y: int, z_scaled: float) -> None:
        """Place the crosshair at full-resolution (x, y) and the z marker (scaled units)."""
        self.cross = (int(x), int(y))
        self._quiet = True
        try:
            self.vline.setValue(x + 0.5)
            self.hline.setValue(y + 0.5)
        finally:
            self._quiet = False
        self.xz_x.setValue(x + 0.5)
        self.yz_y.setValue(y + 0.5)
        self.xz_z.setValue(z_scaled)
        self.yz_z.setValue(z_scaled)

    def sync_sections(self, *_: object) -> None:
        """Give XZ the XY view's x range and YZ its y range, at the XY view's scale along
        z too (true proportions) unless the z extent would not fit; then z is squeezed."""
        (x0, x1), (y0, y1) = self.xy_box.viewRange()
        width, height = self.xy_box.width(), self.xy_box.height()
        if width <= 0 or height <= 0:
            return
        per_px = max((x1 - x0) / width, (y1 - y0) / height)  # view units per screen pixel
        xz, yz = self.xz.rect, self.yz.rect
        span = max(self.xz_box.height() * per_px, xz.height())
        self.xz_box.setRange(xRange=(x0, x1), yRange=(xz.center().y() - span / 2, xz.center().y() + span / 2),
                             padding=0)
        span = max(self.yz_box.width() * per_px, yz.width())
        self.yz_box.setRange(yRange=(y0, y1), xRange=(yz.center().x() - span / 2, yz.center().x() + span / 2),
                             padding=0)

    def scene_point(self, box: pg.ViewBox, x: float, y: float) -> QtCore.QPointF:
        """Widget coordinates of view point (x, y) of ``box`` (for tests and tools)."""
        return self.mapFromScene(box.mapViewToScene(QtCore.QPointF(x, y)))

    def _lines_moved(self) -> None:
        if not self._quiet:
            self.crosshair_moved.emit(int(np.floor(self.vline.value())), int(np.floor(self.hline.value())))

    def _clicked(self, event) -> None:  # noqa: ANN001 (pyqtgraph MouseClickEvent)
        if not self.xy_box.sceneBoundingRect().contains(event.scenePos()):
            return
        pt = self.xy_box.mapSceneToView(event.scenePos())
        self.crosshair_moved.emit(int(np.floor(pt.x())), int(np.floor(pt.y())))

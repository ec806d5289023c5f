"""pymmcore-plus's runner on a thread of its own, its frames on a queue.

The MDA thread drives the hardware and does nothing else: our ``frameReady`` handler
only reads what the core knew when the frame was taken (pixel size, the camera's light
ledger at a stack's last plane) and puts ``(event, image, time)`` on a queue, so
acquisition never waits for disk, network or inference. A `Doorbell` wakes the daemon
loop from its socket poll the moment a frame is queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import useq

from .doorbell import Doorbell
from .light_dose import LightDose
from .plan_events import stack_key

log = logging.getLogger(__name__)

Frame = tuple[useq.MDAEvent, np.ndarray, float]


class MdaFrames:
    """Runs the plan's events on ``core`` and hands their frames to the daemon loop.

    Parameters
    ----------
    core : CMMCorePlus
        The scope.
    n_z : int
        Planes per stack (the ledger is read at a stack's last one).
    dose : LightDose
        Where the camera's light ledger goes, per stack.
    """

    def __init__(self, core: Any, n_z: int, dose: LightDose) -> None:
        self.core, self.n_z, self.dose = core, n_z, dose
        self.queue: queue.Queue[Frame] = queue.Queue()
        self.doorbell = Doorbell()
        self.done = threading.Event()
        self.error: BaseException | None = None  # what ended the plan early, if anything
        self.pixel_size_um = float(core.getPixelSizeUm() or 1.0)  # before the MDA starts

    def start(self, events: Iterable[useq.MDAEvent]) -> None:
        """Run ``events`` on the MDA thread (nothing to run: done at once)."""
        mda = self.core.mda
        mda.events.frameReady.connect(self._on_frame)
        mda.events.sequenceFinished.connect(self._on_finished)
        if isinstance(events, list) and not events:
            self.done.set()
            return
        threading.Thread(target=self._run, args=(events,), name="livestain-mda", daemon=True).start()

    @property
    def finished(self) -> bool:
        """The plan has ended and every frame it made has been taken."""
        return self.done.is_set() and self.queue.empty()

    def take(self, budget_s: float = 0.05) -> Iterator[Frame]:
        """Frames waiting, for at most ``budget_s`` (so sockets are served during a burst)."""
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            try:
                yield self.queue.get_nowait()
            except queue.Empty:
                return

    def halt(self) -> None:
        """Cancel the runner (if still running) and wait a little for it to stop."""
        if not self.done.is_set():
            self.core.mda.cancel()
            self.done.wait(10)

    def close(self) -> None:
        self.halt()
        mda = self.core.mda
        mda.events.frameReady.disconnect(self._on_frame)
        mda.events.sequenceFinished.disconnect(self._on_finished)
        self.doorbell.close()

    # -- on the MDA thread ---------------------------------------------------------------
    def _on_frame(self, image: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        arrived = time.time()
        # what the core knew when the frame was taken, read here on the MDA thread so the
        # daemon loop never talks to the hardware while the runner does; before the frame
        # is queued, so the stack it completes finds them
        px = meta.get("pixel_size_um") if isinstance(meta, dict) else None
        if px:
            self.pixel_size_um = float(px)
        if event.index.get("z", 0) == self.n_z - 1:
            self.dose.read(self.core, stack_key(event))
        self.queue.put((event, image, arrived))
        self.doorbell.ring()

    def _on_finished(self, *_: Any) -> None:
        self.done.set()

    def _run(self, events: Iterable[useq.MDAEvent]) -> None:
        """pymmcore-plus's runner, with its failure kept for the summary.

        ``core.run_mda`` would let an exception (a preset the scope lacks, a stage
        error) end the thread with a traceback and the run "complete"; a failing MDA
        must never look like a success.
        """
        try:
            self.core.mda.run(events)
        except Exception as e:  # any hardware or plan error ends the plan; the loop reports it
            self.error = e
            log.error("the MDA stopped with an error: %s", e, exc_info=True)
        finally:
            self.done.set()

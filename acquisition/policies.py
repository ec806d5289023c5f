"""What the daemon does when things are not ideal: the run's policies, in one model.

Every choice a microscopist might want to make differently for a three-day run lives
here with a safe default, is set from the run config's ``policies:`` section, and is
recorded in ``run.json``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .checks import CheckPolicy


class Policies(BaseModel):
    """Run policies.

    Attributes
    ----------
    min_free_gb : float
        Stop the run cleanly (everything written so far intact) when the data disk has
        less free space than this, checked before every stack.
    storage : "zarr" | "tiff"
        How stacks are kept (`livestain.store`): ``zarr``, one OME-Zarr image per position
        for raw data and one for predictions (napari and Fiji open each as one movie), or
        ``tiff``, one OME-TIFF file per stack. A resumed run keeps the storage it began with.
    storage_compression : "none" | "zstd"
        Compression of Zarr chunks (``bench/store.py`` measures what it saves).
    live_backlog : int
        Stacks that may wait for a free worker. Beyond this, the oldest leave the live
        queue (they are on disk) and are predicted later, when workers have caught up.
        Live mode always predicts the newest stack first.
    resend_after_s : float
        A stack sent to a worker this long ago without a prediction is presumed lost (a
        hung or vanished worker): it is sent again and a local worker is restarted.
    drain_timeout_s : float
        After the plan ends, how long to wait for outstanding predictions.
    stream_channels : list[str]
        Channels sent for prediction; other channels (paired fluorescence) are only
        written to disk.
    snap_retries : int
        Retries of a failed snap before the plane is recorded as a gap.
    equivalent_fluorescence_exposure_ms : float
        Exposure per plane and structure that the same run with real fluorescence would
        use; the status reports the light dose livestain avoided with it.
    track_focus : bool
        Re-centre each position's next stacks on its cells, found in the brightfield
        stack itself (`acquisition.focus_tracking`). Off: the focus is only recorded.
    focus_max_step_um : float
        Largest z move per time point of a position when tracking.
    focus_deadband_um : float
        Offsets of the cells from the stack's centre smaller than this are left alone.
    checks : CheckPolicy | None
        Check frames: real fluorescence of some structures every few time points,
        scored against the predictions (`acquisition.checks`). None: no checks.
    adapt : bool
        Fine-tune the model on the check frames during the run and swap the workers to
        it when it validates better (`acquisition.adaptation`). Needs ``checks``.
    adapt_after_checks : int
        New check frames that start a fine-tuning round.
    adapt_steps : int
        Fine-tuning steps per round.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_free_gb: float = Field(1.0, ge=0)
    storage: Literal["zarr", "tiff"] = "zarr"
    storage_compression: Literal["none", "zstd"] = "none"
    live_backlog: int = Field(8, ge=1)
    resend_after_s: float = Field(300.0, gt=0)
    drain_timeout_s: float = Field(120.0, ge=0)
    stream_channels: tuple[str, ...] = ("Brightfield",)
    snap_retries: int = Field(2, ge=0, le=10)
    equivalent_fluorescence_exposure_ms: float = Field(50.0, ge=0)
    track_focus: bool = False
    focus_max_step_um: float = Field(2.0, gt=0)
    focus_deadband_um: float = Field(0.5, ge=0)
    checks: CheckPolicy | None = None
    adapt: bool = False
    adapt_after_checks: int = Field(2, ge=2)
    adapt_steps: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _adapt_needs_checks(self) -> Policies:
        if self.adapt and self.checks is None:
            raise ValueError("policies.adapt learns from check frames: add policies.checks "
                             "(e.g. checks: {every: 10, structures: [dna]})")
        return self

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_gb * 1e9)

"""The soak's daemon process: `livestain run` on the small simulated scope, with the
faults that must happen inside the daemon (a camera failing snaps, a slow disk).

``bench/days.py`` starts it, kills it with SIGKILL once and starts it again with
``--resume``, exactly as a user would restart ``livestain run CONFIG --resume``: it goes
through `livestain.launch.run_session` (worker supervision, hung-worker kills, the
rotating log file, signal handling). Only the core differs: `_small_run.small_scope`.

Faults come from a JSON schedule keyed by stack sequence number (the journal's, so it
holds across a resume)::

    {"slow_disk": [[first_seq, last_seq, delay_s]], "failing_camera": [[at_seq, snaps]]}

    .venv/bin/python bench/_days_daemon.py OUT --stacks N --port P --schedule S.json [--resume]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _small_run import days_sequence, small_scope  # noqa: E402

import livestain.store as store_module  # noqa: E402
import livestain.acquisition.streaming as streaming  # noqa: E402
from livestain.acquisition.policies import Policies  # noqa: E402
from livestain.devices.simulated import build_simulated_core  # noqa: E402
from livestain.launch import SessionOptions, exit_code, run_session  # noqa: E402


class Faults:
    """Applies the schedule from inside the daemon's own write path.

    Wrapping the run store's writes (`livestain.store`, whichever storage) sees every
    stack's ``seq`` as it is written: the slow disk delays raw and prediction writes in
    its window, and a failing camera window starts at the first raw stack written at or
    after its ``at_seq``.
    """

    def __init__(self, schedule: dict, scope) -> None:  # noqa: ANN001
        self.slow = [tuple(w) for w in schedule.get("slow_disk", [])]
        self.camera = sorted(tuple(w) for w in schedule.get("failing_camera", []))
        self.scope = scope
        for cls in (store_module.ZarrStore, store_module.TiffStore):
            for name in ("write_raw", "write_prediction"):
                setattr(cls, name, self._wrapped(getattr(cls, name)))

    def _wrapped(self, write):  # noqa: ANN001, ANN202
        def wrapper(store, *args, info, **kwargs):  # noqa: ANN001, ANN202
            self.before_write(info)
            return write(store, *args, info=info, **kwargs)
        return wrapper

    def before_write(self, info: dict) -> None:
        seq = info.get("source_seq") if info.get("kind") == "prediction" else info.get("seq")
        if seq is None:
            return
        for first, last, delay in self.slow:
            if first <= seq <= last:
                time.sleep(delay)
        if info.get("kind") == "stack":
            while self.camera and seq >= self.camera[0][0]:
                _, snaps = self.camera.pop(0)
                start = self.scope.snap_count + 1
                # a new set, not a change of the one the MDA thread reads
                self.scope.failing_snaps = set(range(start, start + int(snaps)))
                print(f"FAULT failing_camera from seq {seq}: snaps {start}..{start + snaps - 1}",
                      flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--stacks", type=int, required=True)
    ap.add_argument("--positions", type=int, default=96)
    ap.add_argument("--yx", type=int, default=32)
    ap.add_argument("--interval", type=float, default=0.0, help="seconds per time point")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--schedule", type=Path, default=None)
    ap.add_argument("--resend-after", type=float, default=3.0)
    ap.add_argument("--drain", type=float, default=120.0)
    ap.add_argument("--shm", action="store_true", help="small stacks through shared memory too")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    if args.shm:
        streaming.MIN_SHM_BYTES = 0  # exercise the pool's lend/give-back/taint on every stack
    scope = small_scope(args.yx)
    core = build_simulated_core(scope)
    if args.schedule is not None:
        Faults(json.loads(args.schedule.read_text()), scope)
    policies = Policies(min_free_gb=0.5, resend_after_s=args.resend_after, drain_timeout_s=args.drain,
                        live_backlog=8)
    opts = SessionOptions(out_dir=args.out, base_port=args.port, device="cpu", policies=policies,
                          resume=args.resume)

    def report(line: str) -> None:  # per-stack lines go to the dataset's log file only
        if not line.startswith("[t "):
            print(line, flush=True)

    summary = run_session(core, days_sequence(args.stacks, args.positions, yx=args.yx,
                                              interval_s=args.interval), opts, report=report)
    for line in summary.lines():
        print(line, flush=True)
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())

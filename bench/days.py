"""Three days unattended, in well under an hour: the accelerated soak with faults.

A three-day run is many stacks, not big ones: 96 positions, 4-plane 32x32 stacks,
acquired back to back (``--rate`` paces the plan to what the worker can predict), end to
end through the daemon (`_days_daemon.py`: `livestain run` on the small simulated scope,
its own process), the disk, a supervised worker process and a viewer (a plain ZeroMQ SUB
client on the display socket, in this process, attached part of the time). Every
``--report-every`` stacks it samples daemon and worker RSS, open descriptors, threads,
the journal's size and query times, the log's size, ``status`` response time and
/dev/shm segments. With ``--faults`` (default) it kills the worker, hangs it (SIGSTOP
past ``resend_after_s``), fails the camera, slows the disk, detaches the viewer and
kills the daemon once (SIGKILL, then ``--resume``), each at a stack index, and says
whether the run survived it. At the end it audits the dataset (0 missing, 0 unreadable).

    .venv/bin/python bench/days.py --stacks 50000 --report-every 5000 --json days.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from _days_probe import folder_mb, journal_timings, open_fds, rss_mb, shm_segments, status_s, threads

from livestain import wire

HERE = Path(__file__).resolve().parent


@dataclass
class Fault:
    """One injected fault: what, at which stack, and whether the run got over it."""

    kind: str
    at_stack: int
    detail: str = ""
    survived: bool | None = None
    note: str = ""


@dataclass
class Plan:
    """When each fault happens, in stacks (scaled to ``--stacks``)."""

    worker_kills: list[int] = field(default_factory=list)
    worker_hangs: list[int] = field(default_factory=list)
    daemon_kill: int | None = None
    camera: list[tuple[int, int]] = field(default_factory=list)  # (at seq, failing snaps)
    slow_disk: list[tuple[int, int, float]] = field(default_factory=list)  # (first, last, delay s)
    viewer_windows: list[tuple[int, int]] = field(default_factory=list)  # attached between

    @classmethod
    def scaled(cls, n: int, faults: bool) -> Plan:
        f = lambda x: int(n * x)  # noqa: E731
        if not faults:
            return cls(viewer_windows=[(f(0.1), f(0.4)), (f(0.6), f(0.9))])
        kills = [f(x) for x in (0.12, 0.33, 0.62, 0.85)]
        return cls(worker_kills=kills, worker_hangs=[f(0.22), f(0.72)], daemon_kill=f(0.5),
                   camera=[(f(0.27), 6), (f(0.78), 6)],  # 2 planes: gaps (see the report on whole stacks)
                   slow_disk=[(f(0.4), f(0.4) + 150, 0.05)],
                   viewer_windows=[(f(0.1), f(0.4)), (f(0.6), f(0.9))])


class Viewer:
    """A display subscriber (what ``livestain view`` listens to, without Qt): it counts
    stacks and predictions it could decode while attached."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.received = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def attached(self) -> bool:
        return self._thread is not None

    def attach(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True)
        self._thread.start()

    def detach(self) -> None:
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join(5)
        self._stop = self._thread = None

    def _run(self, stop: threading.Event) -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        try:
            while not stop.is_set():
                if sock.poll(200):
                    wire.decode(sock.recv_multipart(copy=False))
                    self.received += 1
        finally:
            sock.close()


class Soak:
    """Runs the daemon process, applies the fault plan and samples resources."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.dir or tempfile.mkdtemp(prefix="livestain-days-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.out = self.root / "run"
        self.eps = wire.endpoints(base_port=args.port)
        self.plan = Plan.scaled(args.stacks, args.faults)
        self.faults: list[Fault] = []
        self.samples: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self.base = 0  # journal seq at the daemon's (re)start: status counts this session only
        self.viewer = Viewer(self.eps["display"])
        self.schedule = self.root / "schedule.json"
        self.schedule.write_text(json.dumps({"slow_disk": self.plan.slow_disk,
                                             "failing_camera": self.plan.camera}))
        for at, snaps in self.plan.camera:
            self.faults.append(Fault("failing_camera", at, f"{snaps} snaps fail (3 tries/plane)"))
        for first, last, delay in self.plan.slow_disk:
            self.faults.append(Fault("slow_disk", first, f"+{delay * 1e3:.0f} ms per write, stacks {first}-{last}"))

    # -- the daemon process -----------------------------------------------------------
    def start_daemon(self, resume: bool) -> None:
        cmd = [sys.executable, str(HERE / "_days_daemon.py"), str(self.out), "--stacks", str(self.args.stacks),
               "--port", str(self.args.port), "--interval", str(96 / self.args.rate if self.args.rate else 0),
               "--resend-after", str(self.args.resend_after), "--yx", str(self.args.yx)]
        if self.args.faults:
            cmd += ["--schedule", str(self.schedule)]
        if self.args.shm:
            cmd.append("--shm")
        if resume:
            cmd.append("--resume")
        log = (self.root / "daemon.out").open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        self.started_at = time.monotonic()

    def progress(self) -> tuple[int, int, dict | None, float | None]:
        """(stacks acquired, predicted in the whole run so far, status, status seconds)."""
        took, st = status_s(self.eps["control"])
        if st is None:
            return self.base, self.base, None, None
        return self.base + st["stacks_acquired"], st["stacks_predicted"], st, took

    # -- one sample -------------------------------------------------------------------
    def sample(self, acquired: int, status: dict | None, took: float | None, full: bool) -> dict:
        wpid = status.get("worker_pid") if status else None
        segs, shm_mb = shm_segments()
        s = {"t_s": round(time.monotonic() - self.t0, 1), "stacks": acquired,
             "predicted_session": status.get("stacks_predicted") if status else None,
             "daemon_rss_mb": rss_mb(self.proc.pid), "worker_rss_mb": rss_mb(wpid),
             "daemon_fds": open_fds(self.proc.pid), "worker_fds": open_fds(wpid),
             "daemon_threads": threads(self.proc.pid), "worker_threads": threads(wpid),
             "status_ms": None if took is None else round(took * 1e3, 1),
             "log_mb": folder_mb(self.out, "livestain.log*"), "shm_segments": segs, "shm_mb": shm_mb,
             "late": status.get("stacks_late") if status else None,
             "worker_restarts": status.get("worker_restarts") if status else None,
             } | journal_timings(self.out, full)
        self.samples.append(s)
        print(_row(s), flush=True)
        return s

    # -- faults -----------------------------------------------------------------------
    def kill_worker(self, acquired: int, status: dict, hang: bool) -> None:
        pid = status.get("worker_pid")
        restarts = status.get("worker_restarts", 0)
        fault = Fault("hung_worker" if hang else "worker_kill", acquired,
                      f"pid {pid}: " + (f"SIGSTOP {self.args.resend_after * 2:.0f} s" if hang else "SIGKILL"))
        self.faults.append(fault)
        try:
            os.kill(pid, signal.SIGSTOP if hang else signal.SIGKILL)
        except (OSError, TypeError) as e:
            fault.survived, fault.note = False, f"could not signal: {e}"
            return
        if hang:
            time.sleep(self.args.resend_after * 2)
            try:
                os.kill(pid, signal.SIGCONT)  # the daemon should have killed it by now
                fault.note = "still alive after the hang: sent SIGCONT; "
            except OSError:
                fault.note = "the daemon killed it as hung; "
        # survived: a working worker (a new one; or, for a hang that caught the worker idle,
        # holding no stack, so nothing to detect, the same one after SIGCONT), and
        # predictions continue, or nothing is left for them to do
        continued = fault.note.startswith("still alive")
        deadline = time.monotonic() + 90
        back: dict | None = None  # the status that showed a working worker again
        while time.monotonic() < deadline:
            _, _, st, _ = self.progress()
            if st and st.get("worker_alive") and (st.get("worker_restarts", 0) > restarts or continued):
                back = st
                before = st["stacks_predicted"]
                time.sleep(3)
                _, _, st2, _ = self.progress()
                idle = st2 is not None and not (st2.get("backlog") or st2.get("stacks_in_flight")
                                                or st2.get("stacks_late"))
                if st2 and (st2["stacks_predicted"] > before or idle):
                    fault.survived = True
                    fault.note += (f"restarted (restart #{st2['worker_restarts']})"
                                   if st2.get("worker_restarts", 0) > restarts else "the same worker")
                    fault.note += ", predicting again" if st2["stacks_predicted"] > before else \
                        ", nothing left to predict"
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        if back is not None and self.proc.poll() == 0:
            # the worker was back, and the run finished cleanly before its predictions could
            # be watched rising (a fault near the end of a fast run): the audit checks the rest
            fault.survived = True
            fault.note += f"restarted (restart #{back.get('worker_restarts')}), then the run finished"
            return
        fault.survived, fault.note = False, fault.note + "no working worker within 90 s"

    def kill_daemon(self, acquired: int) -> None:
        fault = Fault("daemon_kill", acquired, f"pid {self.proc.pid}: SIGKILL, then --resume")
        self.faults.append(fault)
        self.proc.kill()
        self.proc.wait()
        time.sleep(2)  # the orphaned worker notices its parent is gone and exits
        from livestain.acquisition.journal import Journal

        j = Journal(self.out)
        self.base = j.next_seq()
        j.close()
        t = time.monotonic()
        self.start_daemon(resume=True)
        while time.monotonic() - t < 120:
            now, _, st, _ = self.progress()
            if st is not None and now > self.base + 10:
                fault.survived = True
                fault.note = (f"resumed at stack {self.base}, acquiring again after "
                              f"{time.monotonic() - t:.1f} s")
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        fault.survived, fault.note = False, "the resumed daemon did not acquire within 120 s"

    # -- the run ----------------------------------------------------------------------
    def run(self) -> dict:
        print(f"soak: {self.args.stacks} stacks (96 positions, 4 x {self.args.yx} x {self.args.yx}), "
              f"data {self.out}, faults {'on' if self.args.faults else 'off'}", flush=True)
        print(_header(), flush=True)
        self.t0 = time.monotonic()
        self.start_daemon(resume=False)
        pending_kills = sorted(self.plan.worker_kills)
        pending_hangs = sorted(self.plan.worker_hangs)
        windows = list(self.plan.viewer_windows)
        next_report = 0
        daemon_killed = self.plan.daemon_kill is None
        viewer_mark = 0
        while self.proc.poll() is None:
            time.sleep(0.5)
            acquired, _, st, took = self.progress()
            if st is None:
                continue
            if acquired >= next_report:
                self.sample(acquired, st, took, full=True)
                next_report += self.args.report_every
            if windows and not self.viewer.attached and acquired >= windows[0][0]:
                self.viewer.attach()
                viewer_mark = self.viewer.received
                self.faults.append(Fault("viewer_attach", acquired))
            elif windows and self.viewer.attached and acquired >= windows[0][1]:
                got = self.viewer.received - viewer_mark
                self.viewer.detach()
                windows.pop(0)
                self.faults.append(Fault("viewer_detach", acquired, f"{got} messages while attached",
                                         survived=got > 0))
            if self.args.faults:
                if pending_kills and acquired >= pending_kills[0]:
                    pending_kills.pop(0)
                    self.kill_worker(acquired, st, hang=False)
                elif pending_hangs and acquired >= pending_hangs[0]:
                    pending_hangs.pop(0)
                    self.kill_worker(acquired, st, hang=True)
                elif not daemon_killed and acquired >= self.plan.daemon_kill:
                    daemon_killed = True
                    self.kill_daemon(acquired)
        wall = time.monotonic() - self.t0
        self.viewer.detach()
        rc = self.proc.returncode
        return self.finish(wall, rc)

    def finish(self, wall: float, rc: int) -> dict:
        from livestain.acquisition.journal import Journal

        j = Journal(self.out)
        rows = j.rows()
        j.close()
        acquired = len(rows)
        predicted = sum(1 for r in rows if r.predicted_path)
        audit = run_audit(self.out)
        for f in self.faults:  # data-path faults: survived when the audit finds nothing lost
            if f.kind in ("failing_camera", "slow_disk"):
                f.survived = audit.get("missing") == 0 and audit.get("unreadable") == 0
                f.note = f"run went on; audit: {audit.get('missing')} missing, {audit.get('unreadable')} unreadable"
        out_tail = (self.root / "daemon.out").read_text().splitlines()[-6:]
        gaps = sum(1 for r in rows if r.gaps)
        result = {
            "stacks_planned": self.args.stacks, "stacks_acquired": acquired, "stacks_predicted": predicted,
            "stacks_with_gaps": gaps, "wall_s": round(wall, 1), "stacks_per_s": round(acquired / wall, 2),
            "daemon_exit_code": rc, "audit": audit, "faults": [asdict(f) for f in self.faults],
            "samples": self.samples, "bounds": bounds(self.samples), "data": str(self.out),
            "daemon_tail": out_tail,
        }
        print_summary(result)
        return result


def run_audit(out: Path) -> dict:
    """The lead's ``livestain audit``: the library call if it is there, else the CLI."""
    try:
        from livestain.acquisition.audit import audit_run

        report = audit_run(out)
        return {"ok": report.ok, "missing": report.missing, "unreadable": report.unreadable,
                "lines": report.lines()}
    except ImportError:
        proc = subprocess.run([str(Path(sys.executable).with_name("livestain")), "audit", str(out), "--json"],
                              capture_output=True, text=True)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return {"ok": False, "missing": None, "unreadable": None, "error": proc.stderr[-500:]}


def bounds(samples: list[dict]) -> dict:
    """Each resource's range after warm-up (the first quarter of the run left out)."""
    if not samples:
        return {}
    last = samples[-1]["stacks"]
    warm = [s for s in samples if s["stacks"] >= last / 4] or samples
    keys = ["daemon_rss_mb", "worker_rss_mb", "daemon_fds", "worker_fds", "daemon_threads",
            "worker_threads", "status_ms", "shm_segments", "log_mb", "next_seq_ms", "rows_ms", "journal_mb"]
    out = {}
    for k in keys:
        vals = [s[k] for s in warm if s.get(k) is not None]
        if vals:
            out[k] = [min(vals), max(vals)]
    return out


COLUMNS = [("stacks", 7), ("t_s", 7), ("daemon_rss_mb", 8), ("worker_rss_mb", 8), ("daemon_fds", 5),
           ("worker_fds", 5), ("daemon_threads", 4), ("worker_threads", 4), ("journal_mb", 7),
           ("next_seq_ms", 7), ("rows_ms", 7), ("status_ms", 7), ("log_mb", 6), ("shm_segments", 4),
           ("late", 5)]
_SHORT = {"daemon_rss_mb": "dRSS", "worker_rss_mb": "wRSS", "daemon_fds": "dFD", "worker_fds": "wFD",
          "daemon_threads": "dT", "worker_threads": "wT", "journal_mb": "jMB", "next_seq_ms": "nseq",
          "rows_ms": "rows", "status_ms": "stat", "log_mb": "logMB", "shm_segments": "shm"}


def _header() -> str:
    return " ".join(f"{_SHORT.get(k, k):>{w}}" for k, w in COLUMNS)


def _row(s: dict) -> str:
    return " ".join(f"{'-' if s.get(k) is None else s[k]!s:>{w}}" for k, w in COLUMNS)


def print_summary(result: dict) -> None:
    samples = result["samples"]
    picks = [samples[0], samples[len(samples) // 2], samples[-1]] if samples else []
    print("\nstart / middle / end:\n" + _header())
    for s in picks:
        print(_row(s))
    print(f"\nbounds after warm-up (min, max): {json.dumps(result['bounds'])}")
    print(f"{result['stacks_acquired']} stacks acquired, {result['stacks_predicted']} predicted, "
          f"{result['stacks_with_gaps']} with gaps, {result['wall_s']} s, {result['stacks_per_s']} stacks/s; "
          f"daemon exit {result['daemon_exit_code']}")
    print("faults:")
    for f in result["faults"]:
        print(f"  stack {f['at_stack']:>6}  {f['kind']:<15} survived={f['survived']}  {f['detail']}  {f['note']}")
    print(f"audit: {json.dumps({k: v for k, v in result['audit'].items() if k != 'lines'})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", type=int, default=50_000)
    ap.add_argument("--report-every", type=int, default=5_000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--rate", type=float, default=0.0, help="stacks/s the plan paces to (0: full speed)")
    ap.add_argument("--resend-after", type=float, default=3.0, help="policies.resend_after_s")
    ap.add_argument("--yx", type=int, default=32)
    ap.add_argument("--shm", action="store_true", help="send even small stacks through shared memory")
    ap.add_argument("--port", type=int, default=5790)
    ap.add_argument("--dir", type=Path, default=None, help="working folder (default: a new temporary one)")
    args = ap.parse_args()
    result = Soak(args).run()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    ok = result["audit"].get("missing") == 0 and result["audit"].get("unreadable") == 0 and all(
        f["survived"] is not False for f in result["faults"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

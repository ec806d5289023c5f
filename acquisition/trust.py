"""How far to trust what the window shows: each prediction's confidence and input flags.

The worker runs cheap input checks beside the network (`livestain.inference.ood`: blank,
saturated, a fluorescence stack fed as brightfield, an empty field, a stack out of
focus, a voxel size far from the model's) and puts a per-stack ``confidence`` (0..1)
and ``flags`` with human-readable ``flag_reasons`` in the prediction header. The daemon
keeps a bounded summary of them for ``status`` (and so the window) and says each new
kind of flag of a position once in the log, not on every stack of a three-day run.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

#: A stack below this confidence counts as low-confidence in status and the window.
LOW_CONFIDENCE = 0.5


@dataclass(frozen=True)
class StackTrust:
    """One prediction's confidence (None from workers that do not send it) and flags."""

    confidence: float | None
    flags: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    new_flags: tuple[str, ...] = ()  # flags this position had not shown before

    def line(self) -> str:
        """The tail of the daemon's per-stack console line."""
        if self.confidence is None:
            return ""
        text = f", confidence {self.confidence:.2f}"
        if self.new_flags:
            text += " FLAGGED: " + "; ".join(r for f, r in zip(self.flags, self.reasons) if f in self.new_flags)
        elif self.flags:
            text += f" (flagged: {', '.join(self.flags)})"
        return text


@dataclass
class TrustLedger:
    """Bounded record of confidence over the run: counts, the last value per position,
    and the flags last seen, with their reasons."""

    max_positions: int = 1024
    stacks: int = 0
    low: int = 0
    flagged: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    per_position: OrderedDict[int, float] = field(default_factory=OrderedDict)
    seen_flags: OrderedDict[int, set[str]] = field(default_factory=OrderedDict)

    def add(self, t: int, p: int, extra: dict[str, Any]) -> StackTrust:
        """Record one prediction header's confidence fields (extras of the wire header)."""
        try:
            confidence = float(extra["confidence"])
        except (KeyError, TypeError, ValueError):
            return StackTrust(None)
        confidence = min(max(confidence, 0.0), 1.0)
        flags = tuple(str(f)[:40] for f in (extra.get("flags") or []) if isinstance(f, str))[:8]
        reasons = tuple(str(r)[:300] for r in (extra.get("flag_reasons") or []))[: len(flags)]
        seen = self.seen_flags.setdefault(p, set())
        new = tuple(f for f in flags if f not in seen)
        seen.update(flags)
        self.stacks += 1
        self.low += confidence < LOW_CONFIDENCE
        self.flagged += bool(flags)
        self.per_position[p] = confidence
        for memory in (self.per_position, self.seen_flags):
            memory.move_to_end(p)
            while len(memory) > self.max_positions:
                memory.popitem(last=False)
        self.last = {"t": t, "p": p, "confidence": round(confidence, 3), "flags": list(flags),
                     "reasons": list(reasons)}
        return StackTrust(confidence, flags, reasons, new)

    def status(self) -> dict[str, Any]:
        """Fields of the daemon's status reply (docs/wire.md)."""
        return {
            "last_confidence": self.last or None,
            "low_confidence_stacks": self.low,
            "flagged_stacks": self.flagged,
            "confidence_by_position": {str(p): round(c, 3) for p, c in self.per_position.items()},
        }

"""Which points of a volume's history stay recoverable (docs/format.md §2.6). Pure logic.

Every committed transaction is a point, but old history is thinned the way
backup tools thin snapshots: everything younger than `keep_all`, then the
newest point of each of the last N hours, days, ISO weeks and months, plus
every named snapshot. Outside the keep-everything window the candidates are
the checkpoints (a point that a checkpoint alone recovers costs nothing but
the chunks it refers to); a snapshot without a checkpoint of its own keeps
the transactions between the newest checkpoint before it and itself.

Invariants the GC relies on (tests/test_retention.py checks them):
- the newest point (the head) is always recoverable;
- every point younger than `keep_all` is recoverable;
- every snapshot's LSN is recoverable;
- a checkpoint is dropped only if no retained point or range starts from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vaultsync.config import RetentionConfig


@dataclass(frozen=True, order=True)
class Point:
    lsn: int
    time_ns: int


@dataclass(frozen=True)
class ReplayRange:
    """Every point in (base, upto] recoverable: the checkpoint at `base` (none if its
    LSN is 0) plus the transactions after it. `upto` None means up to the head."""

    base: Point
    upto: int | None

    def covers(self, lsn: int) -> bool:
        return (self.base.lsn <= lsn or (self.base.lsn == 0 and lsn >= 1)) and (
            self.upto is None or lsn <= self.upto
        )


@dataclass
class Retained:
    points: list[Point] = field(default_factory=list)  # checkpoints kept (each recovers alone)
    ranges: list[ReplayRange] = field(default_factory=list)
    drop: list[Point] = field(default_factory=list)  # checkpoints no retained point needs

    def covers(self, lsn: int) -> bool:
        return any(p.lsn == lsn for p in self.points) or any(r.covers(lsn) for r in self.ranges)

    def to_json(self, now_ns: int) -> dict[str, Any]:
        """The body of `retained.json` (§2.6)."""
        return {
            "gc_ns": now_ns,
            "points": [{"lsn": p.lsn, "time_ns": p.time_ns} for p in self.points],
            "ranges": [
                {"from_lsn": r.base.lsn, "from_ns": r.base.time_ns, "to_lsn": r.upto}
                for r in self.ranges
            ],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Retained:
        return cls(
            points=[Point(int(p["lsn"]), int(p["time_ns"])) for p in doc.get("points", [])],
            ranges=[
                ReplayRange(
                    Point(int(r["from_lsn"]), int(r["from_ns"])),
                    None if r.get("to_lsn") is None else int(r["to_lsn"]),
                )
                for r in doc.get("ranges", [])
            ],
        )

    def oldest_lsn(self) -> int:
        """The oldest recoverable LSN (1 when history is whole from the start)."""
        firsts = [p.lsn for p in self.points] + [max(r.base.lsn, 1) for r in self.ranges]
        return min(firsts, default=1)

    def newest_at_or_before(self, time_ns: int) -> Point | None:
        """The newest retained checkpoint point at or before a time (for `--at TIME`)."""
        fit = [p for p in self.points if p.time_ns <= time_ns]
        return max(fit, default=None, key=lambda p: p.lsn)


_NS = 1_000_000_000


def _buckets() -> list[tuple[str, Callable[[datetime], object]]]:
    return [
        ("hourly", lambda d: (d.year, d.month, d.day, d.hour)),
        ("daily", lambda d: (d.year, d.month, d.day)),
        ("weekly", lambda d: d.isocalendar()[:2]),
        ("monthly", lambda d: (d.year, d.month)),
    ]


def thin(points: Iterable[Point], policy: RetentionConfig) -> set[Point]:
    """The newest point of each of the last N hours/days/weeks/months (restic's rule)."""
    newest_first = sorted(points, key=lambda p: p.lsn, reverse=True)
    keep: set[Point] = set()
    for name, key in _buckets():
        want: int = getattr(policy, name)
        seen: set[object] = set()
        for p in newest_first:
            if len(seen) >= want:
                break
            k = key(datetime.fromtimestamp(p.time_ns / _NS, UTC))
            if k not in seen:
                seen.add(k)
                keep.add(p)
    return keep


def plan_retention(
    checkpoints: Iterable[Point],
    snapshots: Iterable[Point],
    now_ns: int,
    policy: RetentionConfig,
) -> Retained:
    """What stays recoverable, given the checkpoints every target holds and the snapshots.

    Snapshot points carry the snapshot's LSN; their time is not used.
    """
    ckpts = sorted(set(checkpoints))
    window_start = now_ns - int(policy.keep_all * _NS)
    before = [c for c in ckpts if c.time_ns <= window_start]
    base_w = before[-1] if before else Point(0, 0)
    keep: set[Point] = {c for c in ckpts if c.lsn >= base_w.lsn} | thin(before, policy)
    ranges = [ReplayRange(base_w, None)]
    for s in sorted(set(snapshots)):
        if ranges[0].covers(s.lsn):
            continue
        under = [c for c in ckpts if c.lsn <= s.lsn]
        base = under[-1] if under else Point(0, 0)
        if base.lsn == s.lsn:
            keep.add(base)
            continue
        if base.lsn:
            keep.add(base)
        ranges.append(ReplayRange(base, s.lsn))
    kept = sorted(c for c in keep if c.lsn)
    return Retained(points=kept, ranges=ranges, drop=[c for c in ckpts if c not in keep])

"""Which segments garbage collection may delete or compact. Pure logic.

Invariants (docs/format.md §2.6), each kept by `plan_segments`:
- a segment holding a transaction of a retained replay range is kept whole:
  recovery replays it record by record;
- a segment not yet at every target is never touched: a lagging target still
  needs it to stay a consistent prefix;
- of the other sealed segments, one with no live chunk is deleted, one whose
  live chunks fill less than `compact_below` of it is compacted (its live
  chunks are stored again at the head, then it is deleted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vaultsync.points.retention import ReplayRange


@dataclass(frozen=True)
class SegmentRow:
    segno: int
    first_lsn: int | None
    last_lsn: int | None
    size: int


@dataclass
class SegmentPlan:
    whole: set[int] = field(default_factory=set)  # kept as they are: replay needs them
    delete: list[int] = field(default_factory=list)
    compact: list[int] = field(default_factory=list)


def replay_segments(segments: Iterable[SegmentRow], ranges: Iterable[ReplayRange]) -> set[int]:
    """Segments holding a transaction some retained range replays."""
    rows = list(segments)
    out: set[int] = set()
    for r in ranges:
        for s in rows:
            if s.last_lsn is None or s.first_lsn is None:
                continue
            if s.last_lsn > r.base.lsn and (r.upto is None or s.first_lsn <= r.upto):
                out.add(s.segno)
    return out


def plan_segments(
    sealed: Iterable[SegmentRow],
    ranges: Iterable[ReplayRange],
    shipped_upto: int,
    live_bytes: Mapping[int, int],
    compact_below: float,
) -> SegmentPlan:
    rows = sorted(sealed, key=lambda s: s.segno)
    plan = SegmentPlan(whole=replay_segments(rows, ranges))
    for s in rows:
        if s.segno in plan.whole or s.segno > shipped_upto:
            continue
        live = live_bytes.get(s.segno, 0)
        if live <= 0:
            plan.delete.append(s.segno)
        elif live < compact_below * s.size:
            plan.compact.append(s.segno)
    return plan

"""The retention policy and the segment plan: pure logic, checked against their invariants."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.config import RetentionConfig, parse_duration
from vaultsync.points.gcplan import SegmentRow, plan_segments, replay_segments
from vaultsync.points.retention import Point, ReplayRange, Retained, plan_retention, thin

H = 3600 * 10**9
NOW = 1_800_000_000 * 10**9


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Point], list[Point], RetentionConfig]:
    gaps = draw(st.lists(st.integers(1, 40 * 24 * H // 100), min_size=0, max_size=40))
    t = NOW - sum(gaps) - 1
    lsn = 0
    ckpts = []
    for g in gaps:
        t += g
        lsn += draw(st.integers(1, 50))
        ckpts.append(Point(lsn, t))
    snaps = [
        Point(draw(st.integers(1, max(lsn, 1) + 10)), 0) for _ in range(draw(st.integers(0, 3)))
    ]
    policy = RetentionConfig(
        keep_all=draw(st.sampled_from([0, 3600, 86400, 7 * 86400])),
        hourly=draw(st.integers(0, 30)),
        daily=draw(st.integers(0, 10)),
        weekly=draw(st.integers(0, 5)),
        monthly=draw(st.integers(0, 3)),
    )
    return ckpts, snaps, policy


@settings(max_examples=300, deadline=None)
@given(histories())
def test_retention_invariants(h: tuple[list[Point], list[Point], RetentionConfig]) -> None:
    ckpts, snaps, policy = h
    kept = plan_retention(ckpts, snaps, NOW, policy)
    head = max([c.lsn for c in ckpts] + [s.lsn for s in snaps] + [1]) + 5
    assert kept.covers(head), "the head is always recoverable"
    window_start = NOW - int(policy.keep_all * 1e9)
    for c in ckpts:
        if c.time_ns > window_start:
            assert kept.covers(c.lsn), "every point in the keep-everything window"
    for s in snaps:
        assert kept.covers(s.lsn), "every snapshot"
    for p in thin([c for c in ckpts if c.time_ns <= window_start], policy):
        assert kept.covers(p.lsn), "the policy's hourly/daily/... points"
    held = {c.lsn for c in ckpts}
    for r in kept.ranges:
        assert r.base.lsn == 0 or r.base.lsn in held, "a range starts at a checkpoint"
        assert r.base not in kept.drop
    assert not set(kept.drop) & set(kept.points)
    assert set(kept.drop) | set(kept.points) == set(ckpts)
    # The document readers get says the same.
    again = Retained.from_json(kept.to_json(NOW))
    assert all(again.covers(x) == kept.covers(x) for x in range(0, head + 2))


def test_thin_keeps_newest_of_each_hour_and_day() -> None:
    pts = [Point(i + 1, NOW - (10 - i) * H // 2) for i in range(10)]  # every 30 minutes
    kept = thin(pts, RetentionConfig(hourly=2, daily=0, weekly=0, monthly=0))
    assert len(kept) == 2 and max(pts) in kept
    # All ten lie within one UTC day (NOW is 08:00 UTC): one daily point, the newest.
    assert thin(pts, RetentionConfig(hourly=0, daily=1, weekly=0, monthly=0)) == {max(pts)}


def test_durations_parse() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90s") == 90
    assert parse_duration(3600) == 3600


@st.composite
def segment_tables(draw: st.DrawFn) -> tuple[list[SegmentRow], list[ReplayRange], int]:
    n = draw(st.integers(1, 30))
    rows, lsn = [], 0
    for segno in range(1, n + 1):
        k = draw(st.integers(0, 5))
        rows.append(SegmentRow(segno, lsn + 1 if k else None, lsn + k if k else None, 1000))
        lsn += k
    base = draw(st.integers(0, lsn))
    ranges = [ReplayRange(Point(base, 0), None)]
    if base > 1:
        b = draw(st.integers(0, base - 1))
        ranges.append(ReplayRange(Point(b, 0), draw(st.integers(b + 1, base))))
    return rows, ranges, draw(st.integers(0, n))


@settings(max_examples=300, deadline=None)
@given(segment_tables(), st.dictionaries(st.integers(1, 30), st.integers(0, 1000)))
def test_segment_plan_never_touches_what_replay_or_a_lagging_target_needs(
    t: tuple[list[SegmentRow], list[ReplayRange], int], live: dict[int, int]
) -> None:
    rows, ranges, shipped = t
    plan = plan_segments(rows, ranges, shipped, live, 0.5)
    touched = set(plan.delete) | set(plan.compact)
    assert not touched & plan.whole
    assert all(n <= shipped for n in touched)
    assert all(live.get(n, 0) == 0 for n in plan.delete)
    assert all(0 < live[n] < 500 for n in plan.compact)
    for r in ranges:
        for s in rows:
            if s.first_lsn is not None and s.last_lsn is not None:
                txns = range(s.first_lsn, s.last_lsn + 1)
                if any(r.covers(x) and x > r.base.lsn for x in txns):
                    assert s.segno in replay_segments(rows, ranges)

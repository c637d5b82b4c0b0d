"""The timing rules of automatic failover (docs/format.md §2.7): pure logic, no I/O.

Three parties keep them, each on its own clock (`lease_clock`, which advances at
the rate of real time and keeps advancing while the machine sleeps):

- the writer's `WriterGate` decides whether it may acknowledge anything now:
  only while a majority of the voters are *held* by renewals of its heartbeat
  that a lease check found unopposed;
- a standby's `HeartbeatWatch` decides whether the writer's heartbeat has made
  no progress at a majority of the voters for `failover_after`;
- `takeover_wait` tells a standby that took the next lease how long it must
  wait before it acts as the writer.

The argument that two sites never acknowledge in overlapping epochs is in
§2.7; the invariants below are the pieces of it each class keeps. No method
here reads a clock: every time is passed in, so tests drive them with any
interleaving of delays, pauses and partitions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Part of the contract (§2.7): the clocks of two sites advance at rates that differ
# by less than this factor, the same assumption §2.4 makes for the lease window.
CLOCK_FACTOR = 2.0

# The shortest hold a writer may use: a renewal is a PUT and a LIST, and a hold
# must leave room for two of them.
MIN_HOLD = 2.0


@dataclass(frozen=True)
class Timing:
    """The intervals of one volume's automatic failover, in seconds.

    `failover_after` (F) is the standby's: how long the heartbeat must make no
    progress at a majority. The writer's hold (T), heartbeat interval (H) and
    probation (P) follow from it and are announced in every heartbeat, so a
    standby with another configuration judges the writer by the writer's values.
    """

    failover_after: float
    hold: float
    heartbeat_every: float
    probation: float
    # A standby that took the next lease within this long after its last stale
    # reading acts as the writer at once; later than this, it waits out a hold.
    takeover_limit: float

    @classmethod
    def for_failover_after(cls, failover_after: float) -> Timing:
        hold = failover_after / 3
        limit = 1.5
        return cls(
            failover_after=failover_after,
            hold=hold,
            heartbeat_every=hold / 2,
            probation=CLOCK_FACTOR * limit + 1.0,
            takeover_limit=limit,
        )

    @staticmethod
    def minimum_failover_after() -> float:
        return 3 * MIN_HOLD

    def judging(self, hold: float, probation: float, heartbeat_every: float) -> Timing:
        """This standby's timing for a writer that announced `hold`, `probation` and
        `heartbeat_every`: the writer's values where the rules depend on them, and a
        longer wait or no fast path where this site's own values would break them."""
        return Timing(
            failover_after=max(self.failover_after, CLOCK_FACTOR * hold + heartbeat_every),
            hold=hold,
            heartbeat_every=heartbeat_every,
            probation=probation,
            takeover_limit=min(self.takeover_limit, probation / CLOCK_FACTOR * 0.9),
        )

    def check(self) -> None:
        """The inequalities §2.7 relies on; ValueError names the first that fails."""
        if self.hold < MIN_HOLD:
            raise ValueError(f"the hold ({self.hold:g} s) is below {MIN_HOLD:g} s")
        if self.heartbeat_every * 2 > self.hold:
            raise ValueError("the heartbeat must be renewed at least twice per hold")
        if self.failover_after <= CLOCK_FACTOR * self.hold:
            raise ValueError("failover_after must exceed twice the hold")
        if self.probation <= CLOCK_FACTOR * self.takeover_limit:
            raise ValueError("the probation must exceed twice the takeover limit")


def majority(voters: int) -> int:
    return voters // 2 + 1


@dataclass
class _Run:
    """An unbroken run of renewals at one voter (module docstring of WriterGate)."""

    first_acked: float  # when the run's first renewal was acknowledged by the voter
    last_began: float  # when the newest counted renewal of the run began
    confirmed: bool = False


@dataclass
class WriterGate:
    """The writer's right to acknowledge: a majority of voters held, right now.

    A renewal at a voter is a PUT of the heartbeat (it began at `began` and the
    voter acknowledged it at `acked`) followed by a lease check (a listing that
    began at `checked` >= `acked` and showed no newer epoch). Renewals at a
    voter form a *run* while each is acknowledged within `hold` of the start of
    the one before; a renewal acknowledged later starts a new run.

    INVARIANT (§2.7): a voter is held until `last_began + hold`, and only once
    its run is confirmed: a lease check that began at least `probation` after
    the run's first renewal was acknowledged found no newer epoch. A standby
    that saw no progress at a voter for `failover_after` > 2 x hold and then
    took the next lease within `takeover_limit` has its lease there before any
    such confirming check can begin, so a run started after its last reading
    never holds that voter; a run that ended before it stopped holding before
    that reading.
    """

    voters: tuple[str, ...]
    timing: Timing
    _runs: dict[str, _Run] = field(default_factory=dict)

    @property
    def needed(self) -> int:
        return majority(len(self.voters))

    def renewed(self, voter: str, began: float, acked: float, checked: float) -> None:
        """Record a renewal whose lease check found no newer epoch."""
        if not began <= acked <= checked:
            raise ValueError("a renewal is a PUT that completed, then a lease check")
        run = self._runs.get(voter)
        if run is None or acked - run.last_began > self.timing.hold:
            run = self._runs[voter] = _Run(first_acked=acked, last_began=began)
        else:
            run.last_began = max(run.last_began, began)
        if checked - run.first_acked >= self.timing.probation:
            run.confirmed = True

    def checked(self, voter: str, checked: float) -> None:
        """A lease check alone (no PUT) that found no newer epoch: it can confirm a run."""
        run = self._runs.get(voter)
        if run is not None and checked - run.first_acked >= self.timing.probation:
            run.confirmed = True

    def confirm_due(self, voter: str) -> float | None:
        """When a lease check at `voter` could first confirm its current run (None: the
        run is confirmed, or there is none): the writer checks then, not a whole
        renewal interval later."""
        run = self._runs.get(voter)
        if run is None or run.confirmed:
            return None
        return run.first_acked + self.timing.probation

    def held_until(self, voter: str) -> float:
        run = self._runs.get(voter)
        if run is None or not run.confirmed:
            return float("-inf")
        return run.last_began + self.timing.hold

    def open_until(self) -> float:
        """Until when (writer's clock) acknowledging is allowed; -inf: not now."""
        ends = sorted((self.held_until(v) for v in self.voters), reverse=True)
        return ends[self.needed - 1] if len(ends) >= self.needed else float("-inf")

    def is_open(self, now: float) -> bool:
        return now < self.open_until()

    def held(self, now: float) -> list[str]:
        return [v for v in self.voters if now < self.held_until(v)]


@dataclass
class _Seen:
    body: bytes | None
    since: float  # end of the first reading that returned `body`
    last: float  # beginning of the newest reading that returned `body`


@dataclass
class HeartbeatWatch:
    """A standby's view of the writer's heartbeat at each voter, on its own clock.

    INVARIANT (§2.7): a voter is *stale* when two readings returned the same
    heartbeat and the second began at least `failover_after` after the first
    ended; no renewal was then acknowledged by that voter in between (a reading
    that begins after a PUT was acknowledged returns that PUT or a later one,
    and every renewal writes a body never written before). A failed reading
    proves nothing and changes nothing.
    """

    voters: tuple[str, ...]
    failover_after: float
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def observed(self, voter: str, began: float, ended: float, body: bytes | None) -> bool:
        """Record a reading; True when it showed progress (a body not seen before)."""
        seen = self._seen.get(voter)
        if seen is None or seen.body != body:
            self._seen[voter] = _Seen(body, since=ended, last=began)
            return seen is not None
        seen.last = max(seen.last, began)
        return False

    def forget(self) -> None:
        """Start over (the epoch changed: another heartbeat object is watched)."""
        self._seen.clear()

    def quiet_for(self, voter: str) -> float:
        """How long the voter has shown the same heartbeat, as far as readings prove."""
        seen = self._seen.get(voter)
        return max(0.0, seen.last - seen.since) if seen is not None else 0.0

    def stale(self) -> list[str]:
        return [v for v in self.voters if self.quiet_for(v) >= self.failover_after]

    def writer_gone(self) -> bool:
        return len(self.stale()) >= majority(len(self.voters))

    def decisive_reading(self, stale: Iterable[str]) -> float:
        """The earliest start of the newest stale readings: the takeover limit runs from it."""
        return min(self._seen[v].last for v in stale)


def takeover_wait(
    timing: Timing, watch: HeartbeatWatch, leased_at: Iterable[str], leased: float
) -> float:
    """Seconds a standby that won the next lease must still wait before it acts as writer.

    `leased_at` are the voters where it created the lease, `leased` the moment
    the last of those creations completed (its clock). No wait is needed (§2.7)
    when a majority of the voters are both stale and leased, and the lease
    existed at them within the takeover limit of the newest stale readings
    there: the old writer then holds none of them. Otherwise it may have
    confirmed a run at a voter just before the lease landed there, and may hold
    that voter for one more hold, measured on its clock.
    """
    both = set(watch.stale()) & set(leased_at)
    enough = len(both) >= majority(len(watch.voters))
    if enough and leased - watch.decisive_reading(both) <= timing.takeover_limit:
        return 0.0
    return CLOCK_FACTOR * timing.hold

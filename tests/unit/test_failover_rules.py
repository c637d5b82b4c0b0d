"""A model of automatic failover under random delays, pauses and partitions: never two writers.

A discrete-event simulation in real time. The voters are linearizable
registers (the heartbeat object, and lease objects created at most once);
every request takes effect at one instant and answers later, or is lost
before or after it took effect, or is held back for many seconds by a
partition. The writer renews its heartbeat and acknowledges whenever its
`WriterGate` allows; standbys read the heartbeat into a `HeartbeatWatch`, take
the next lease when it says the writer is gone, wait what `takeover_wait`
says, then acknowledge as the new writer. Each party reads its own clock,
running at its own rate, and may be paused (SIGSTOP) or killed.

What must hold: every acknowledgement of the old writer precedes, in real
time, the first of any new writer's; and at most one standby wins an epoch.
The last tests weaken one rule at a time and check that the model catches it,
so that the model is known to be able to fail.
"""

from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaultsync.config import MIN_FAILOVER_AFTER
from vaultsync.control.failover_rules import (
    HeartbeatWatch,
    Timing,
    WriterGate,
    majority,
    takeover_wait,
)

TIMING = Timing.for_failover_after(15.0)
TIMEOUT = 5.0  # a request that gets no answer fails after this long


@dataclass
class Voter:
    heartbeat: bytes | None = None
    leases: dict[int, str] = field(default_factory=dict)  # epoch -> site, created once


@dataclass
class Faults:
    """What goes wrong, drawn by hypothesis."""

    seed: int
    voters: int
    # (party, voter or -1 for all, start, length): requests sent in the window are lost
    # or held back until it ends.
    partitions: list[tuple[str, int, float, float]]
    pauses: list[tuple[str, float, float]]  # (party, start, length)
    writer_dies: float | None  # real time of a kill -9 of the writer
    rates: dict[str, float]  # clock rate per party
    slow: float  # upper bound of an ordinary one-way delay
    # How often the writer renews: any rate is allowed (at most every heartbeat
    # interval); frequent renewals make the races the rules must close more likely.
    renew_every: float = 2.5
    # A party whose requests are slower than `slow` (a standby on a distant link).
    slower: dict[str, float] = field(default_factory=dict)


class Sim:
    def __init__(self, f: Faults, timing: Timing = TIMING, standbys: int = 2) -> None:
        self.f = f
        self.t = 0.0
        self.rng = random.Random(f.seed)
        self.timing = timing
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.voters = [Voter() for _ in range(f.voters)]
        self.names = tuple(str(i) for i in range(f.voters))
        self.old_acks: list[float] = []
        self.new_acks: dict[str, float] = {}  # standby -> real time of its first ack
        self.winners: dict[int, list[str]] = {}
        self.standbys = [f"s{i}" for i in range(standbys)]

    # -- time -----------------------------------------------------------------------
    def clock(self, party: str) -> float:
        return 1000.0 + self.t * self.f.rates.get(party, 1.0)

    def real_after(self, party: str, seconds: float) -> float:
        """Real time at which `seconds` have passed on `party`'s clock."""
        return self.t + seconds / self.f.rates.get(party, 1.0)

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, fn))

    def paused_until(self, party: str, when: float) -> float:
        """When a step due at `when` really runs: after any pause covering it."""
        for p, start, length in self.f.pauses:
            if p == party and start <= when < start + length:
                return start + length
        return when

    def dead(self, party: str) -> bool:
        return party == "w" and self.f.writer_dies is not None and self.t >= self.f.writer_dies

    def step(self, party: str, when: float, fn: Callable[[], None]) -> None:
        """Schedule a step of `party`: it runs only when the party is not paused."""

        def run() -> None:
            real = self.paused_until(party, self.t)
            if real > self.t:
                self.at(real, run)
            elif not self.dead(party):
                fn()

        self.at(when, run)

    # -- requests -----------------------------------------------------------------------
    def request(
        self,
        party: str,
        voter: int,
        effect: Callable[[Voter], object],
        answer: Callable[[object | None], None],
    ) -> None:
        """Send a request: it takes effect once (or never) and is answered once (or fails)."""
        sent = self.t
        slow = self.f.slower.get(party, self.f.slow)
        d1 = self.rng.uniform(0.001, slow)
        d2 = self.rng.uniform(0.001, slow)
        cut = next(
            (
                (s, s + n)
                for p, v, s, n in self.f.partitions
                if p == party and v in (voter, -1) and s <= sent < s + n
            ),
            None,
        )
        fate = self.rng.random()
        if cut is not None:
            if fate < 0.4:  # lost on the way there
                self.step(party, sent + TIMEOUT, lambda: answer(None))
                return
            # held back until the partition ends (then maybe its answer is lost)
            d1 = cut[1] - sent + self.rng.uniform(0, 2.0)
        elif fate < 0.03:
            self.step(party, sent + TIMEOUT, lambda: answer(None))
            return
        result: list[object] = []

        def take_effect() -> None:
            result.append(effect(self.voters[voter]))

        self.at(sent + d1, take_effect)
        if sent + d1 + d2 > sent + TIMEOUT or (cut is not None and fate < 0.7):
            self.step(party, max(sent + TIMEOUT, sent + d1), lambda: answer(None))
        else:
            self.step(party, sent + d1 + d2, lambda: answer(result[0]))

    # -- the writer (epoch 1) -------------------------------------------------------
    def writer(self) -> None:
        gate = WriterGate(self.names, self.timing)
        fenced = [False]
        counter = [0]

        def renew(v: int) -> None:
            """One renewal at voter v; the next starts one interval later whatever this one
            does, so slow renewals overlap (more adversarial than a real writer)."""
            if fenced[0]:
                return
            self.step("w", self.real_after("w", self.f.renew_every), lambda: renew(v))
            counter[0] += 1
            body = f"w:{counter[0]}".encode()
            began = self.clock("w")

            def put(vo: Voter) -> object:
                vo.heartbeat = body
                return True

            def put_answered(ok: object | None) -> None:
                if ok is None:
                    return
                acked = self.clock("w")
                checked = self.clock("w")

                def listing(vo: Voter) -> object:
                    return max(vo.leases, default=1)

                def listed(top: object | None) -> None:
                    if isinstance(top, int) and top > 1:
                        fenced[0] = True
                    elif top is not None:
                        gate.renewed(self.names[v], began, acked, checked)

                self.request("w", v, listing, listed)

            self.request("w", v, put, put_answered)

        def acknowledge() -> None:
            if not fenced[0] and gate.is_open(self.clock("w")):
                self.old_acks.append(self.t)
            self.step("w", self.t + self.rng.uniform(0.01, 0.3), acknowledge)

        for v in range(len(self.voters)):
            self.step("w", self.rng.uniform(0, 0.5), functools.partial(renew, v))
        self.step("w", 0.0, acknowledge)

    # -- a standby -----------------------------------------------------------------------
    def standby(self, me: str) -> None:
        watch = HeartbeatWatch(self.names, self.timing.failover_after)
        state = {"confirming": False, "done": False}

        def read(v: int, then: Callable[[], None] | None = None) -> None:
            began = self.clock(me)

            def get(vo: Voter) -> object:
                return ("hb", vo.heartbeat)

            def got(res: object | None) -> None:
                if isinstance(res, tuple):
                    watch.observed(self.names[v], began, self.clock(me), res[1])
                if then is not None:
                    then()
                    return
                if not state["done"] and not state["confirming"] and watch.writer_gone():
                    confirm()
                self.step(
                    me, self.real_after(me, self.timing.heartbeat_every), lambda: watch_loop(v)
                )

            self.request(me, v, get, got)

        def watch_loop(v: int) -> None:
            if not state["done"]:
                read(v)

        def confirm() -> None:
            """The writer looks gone: read every voter once more, then decide on fresh readings."""
            state["confirming"] = True
            left = [len(self.voters)]

            def one_done() -> None:
                left[0] -= 1
                if left[0]:
                    return
                state["confirming"] = False
                if not state["done"] and watch.writer_gone():
                    state["done"] = True
                    self.take_over(me, watch)

            for v in range(len(self.voters)):
                read(v, then=one_done)

        for v in range(len(self.voters)):
            self.step(me, self.rng.uniform(0, 1.0), functools.partial(watch_loop, v))

    def take_over(self, me: str, watch: HeartbeatWatch) -> None:
        created: list[str] = []
        answers = [0]

        def create(vo: Voter) -> object:
            if 2 in vo.leases:
                return False
            vo.leases[2] = me
            return True

        def answered(v: int, ok: object | None) -> None:
            answers[0] += 1
            if ok is True:
                created.append(self.names[v])
            if answers[0] < len(self.voters):
                return
            if len(created) < majority(len(self.voters)):
                return  # lost the race: stays a standby
            self.winners.setdefault(2, []).append(me)
            wait = takeover_wait(self.timing, watch, created, self.clock(me))
            self.step(me, self.real_after(me, wait), lambda: self.first_ack(me))

        for v in range(len(self.voters)):
            self.request(me, v, create, functools.partial(answered, v))

    def first_ack(self, standby: str) -> None:
        self.new_acks.setdefault(standby, self.t)

    def run(self, until: float = 150.0) -> None:
        self.writer()
        for s in self.standbys:
            self.standby(s)
        while self.events and self.events[0][0] <= until:
            self.t, _, fn = heapq.heappop(self.events)
            fn()

    def violations(self) -> list[str]:
        out = []
        if len(self.winners.get(2, [])) > 1:
            out.append(f"two winners of epoch 2: {self.winners[2]}")
        for who, first in self.new_acks.items():
            late = [a for a in self.old_acks if a >= first]
            if late:
                out.append(
                    f"old writer acknowledged at {late[0]:.3f} after {who} began at {first:.3f}"
                )
        return out


@st.composite
def faults(draw: st.DrawFn) -> Faults:
    voters = draw(st.sampled_from([3, 5]))
    parties = ["w", "s0", "s1"]
    window = st.tuples(
        st.sampled_from(parties),
        st.integers(-1, voters - 1),
        st.floats(0, 120),
        st.floats(0.5, 40),
    )
    pause = st.tuples(st.sampled_from(parties), st.floats(0, 120), st.floats(0.1, 40))
    partitions = draw(st.lists(window, max_size=6))
    if draw(st.booleans()):  # a flap: cut off for about failover_after, back briefly, cut again
        who = draw(st.sampled_from(parties))
        start, cut = draw(st.floats(0, 60)), draw(st.floats(12, 22))
        gap = draw(st.floats(0.05, 1.5))
        partitions += [(who, -1, start, cut), (who, -1, start + cut + gap, draw(st.floats(1, 40)))]
    return Faults(
        seed=draw(st.integers(0, 2**32)),
        voters=voters,
        partitions=partitions,
        pauses=draw(st.lists(pause, max_size=3)),
        writer_dies=draw(st.none() | st.floats(5, 100)),
        rates={p: draw(st.floats(0.75, 1.4)) for p in parties},
        slow=draw(st.sampled_from([0.05, 0.5, 2.0])),
        renew_every=draw(st.sampled_from([0.1, 0.5, TIMING.heartbeat_every])),
        slower={p: draw(st.sampled_from([0.05, 0.4, 1.0])) for p in parties if draw(st.booleans())},
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(faults())
def test_never_two_writers(f: Faults) -> None:
    sim = Sim(f)
    sim.run()
    assert not sim.violations(), sim.violations()


def test_a_dead_writer_is_replaced_in_failover_after_plus_seconds() -> None:
    f = Faults(1, 3, [], [], writer_dies=20.0, rates={}, slow=0.05)
    sim = Sim(f)
    sim.run()
    assert sim.old_acks and max(sim.old_acks) < 20.0
    assert len(sim.new_acks) == 1
    # The last heartbeat may have come up to one interval before the kill.
    took = min(sim.new_acks.values()) - 20.0
    assert TIMING.failover_after - TIMING.heartbeat_every < took < TIMING.failover_after + 5, took


def test_an_idle_healthy_writer_is_never_replaced() -> None:
    for seed in range(20):
        sim = Sim(Faults(seed, 3, [], [], None, {}, slow=0.5))
        sim.run(until=300.0)
        assert not sim.new_acks and sim.old_acks


def test_one_target_of_three_down_changes_nothing() -> None:
    sim = Sim(
        Faults(
            3,
            3,
            [("w", 0, 10, 200), ("s0", 0, 10, 200), ("s1", 0, 10, 200)],
            [],
            None,
            {},
            slow=0.05,
        )
    )
    sim.run()
    assert not sim.new_acks
    assert max(sim.old_acks) > 140  # the writer kept acknowledging


def test_a_writer_cut_off_stops_before_the_standby_starts() -> None:
    f = Faults(5, 3, [("w", -1, 30, 200)], [], None, {"w": 1.4, "s0": 0.75}, slow=0.05)
    sim = Sim(f)
    sim.run()
    assert sim.new_acks and not sim.violations()
    assert max(sim.old_acks) < min(sim.new_acks.values())


# -- the narrow races, aimed at ----------------------------------------------------------


def _flaps() -> list[Faults]:
    """The writer cut off from every voter for about `failover_after`, back for a moment
    just as a standby takes over (fast renewals, a slower standby), then cut off again:
    the race that the probation closes. A grid, not random, so it always runs the same."""
    return [
        Faults(
            seed,
            3,
            [("w", -1, 10.0, cut), ("w", -1, 10.0 + cut + 0.2, 30.0)],
            [],
            None,
            # seed 0: the writer's clock slow and the standbys' fast, as far as allowed
            {"w": 0.75, "s0": 1.4, "s1": 1.4} if seed == 0 else {},
            slow=0.02,
            renew_every=0.1,
            slower={"s0": 0.4, "s1": 0.4},
        )
        for cut in (18.0 + i * 0.1 for i in range(30))
        for seed in range(3)
    ]


def _violated(timing: Timing) -> bool:
    for f in _flaps():
        sim = Sim(f, timing)
        sim.run(until=f.partitions[0][3] + 30)
        if sim.violations():
            return True
    return False


def test_the_rules_survive_a_writer_that_flaps_during_a_takeover() -> None:
    assert not _violated(TIMING)


# -- the model can fail: each weakened rule is caught ------------------------------------


def test_the_model_catches_a_writer_without_probation() -> None:
    assert _violated(Timing(15.0, 5.0, 2.5, probation=0.0, takeover_limit=2.0))


def test_the_model_catches_a_hold_as_long_as_failover_after() -> None:
    assert _violated(Timing(15.0, 15.0, 2.5, probation=5.0, takeover_limit=2.0))


@pytest.mark.parametrize("rule", ["probation", "hold"])
def test_the_timing_check_refuses_the_weakened_rules(rule: str) -> None:
    weak = {
        "probation": Timing(15.0, 5.0, 2.5, probation=0.0, takeover_limit=2.0),
        "hold": Timing(15.0, 15.0, 2.5, probation=5.0, takeover_limit=2.0),
    }[rule]
    with pytest.raises(ValueError):
        weak.check()
    TIMING.check()


def test_the_shortest_failover_after_the_config_allows_keeps_the_rules() -> None:
    Timing.for_failover_after(MIN_FAILOVER_AFTER).check()
    with pytest.raises(ValueError):
        Timing.for_failover_after(MIN_FAILOVER_AFTER * 0.9).check()


def test_a_standby_judges_a_writer_by_the_writers_announced_timing() -> None:
    mine = Timing.for_failover_after(6.0)
    # A writer configured with failover_after = 60 holds for 20 s: a standby with 6 s
    # must wait more than twice that, and never take the fast path on a short probation.
    judged = mine.judging(hold=20.0, probation=3.0, heartbeat_every=10.0)
    judged.check()
    assert judged.failover_after > 2 * 20.0
    assert judged.probation > 2 * judged.takeover_limit
    assert mine.judging(mine.hold, mine.probation, mine.heartbeat_every) == mine

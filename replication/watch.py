"""A standby's watch over the writer, and the taking of the next lease (docs/format.md §2.7).

The standby reads `heartbeat/<E>.json` at every voter each `heartbeat_every`
seconds, E being the highest epoch leased at any voter it reaches, into a
`HeartbeatWatch` (control/failover_rules.py), which judges progress on this
site's clock only. When a majority of the voters are stale it reads all of
them once more and, if they still are, creates `lease/<E+1>.json` at every
voter with a conditional create. A majority of creations wins the epoch;
`takeover_wait` then says how long the winner must wait before it writes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from vaultsync.control.failover_rules import HeartbeatWatch, Timing, majority, takeover_wait
from vaultsync.control.lease import current_epoch, lease_clock, lease_doc, lease_window, take_lease
from vaultsync.errors import FormatError
from vaultsync.format.bucket_layout import heartbeat_key
from vaultsync.format.heartbeat import Heartbeat
from vaultsync.store.objectstore import ObjectMissingError, ObjectStore, StoreError

log = logging.getLogger("vaultsync.failover")

READ_EVERY = 1.0  # seconds between a standby's readings of each voter, at most


@dataclass(frozen=True)
class Won:
    epoch: int
    leased_at: list[str]  # the voters where this site created the lease
    wait: float  # seconds to wait before acting as the writer (§2.7)
    writer: Heartbeat | None  # the old writer's last heartbeat, if it ever wrote one


@dataclass
class Watch:
    """What this standby knows of the writer, from its own readings."""

    voters: list[ObjectStore]
    timing: Timing  # this site's own; the writer's announced values refine it
    epoch: int = 0
    writer: Heartbeat | None = None  # the newest heartbeat read for `epoch`
    reached: set[str] = field(default_factory=set)  # voters the last round reached
    seen_progress_at: float = float("-inf")  # lease_clock() of the newest progress seen
    _watch: HeartbeatWatch = field(init=False)

    def __post_init__(self) -> None:
        self._watch = HeartbeatWatch(tuple(v.name for v in self.voters), self.timing.failover_after)

    @property
    def judged_by(self) -> Timing:
        """The timing this standby applies to the current writer."""
        w = self.writer
        if w is None:
            return self.timing
        return self.timing.judging(w.hold, w.probation, w.heartbeat_every)

    def quiet_for(self) -> dict[str, float]:
        return {v.name: self._watch.quiet_for(v.name) for v in self.voters}

    def writer_gone(self) -> bool:
        return self._watch.writer_gone()

    async def _read(self, store: ObjectStore) -> None:
        """One reading of `store`: its newest lease, then the heartbeat of that epoch."""
        epoch = await current_epoch(store)
        if epoch > self.epoch:
            if self.epoch:
                log.info("epoch %d is leased at voter %s: watching its writer", epoch, store.name)
            self.epoch, self.writer = epoch, None
            self._watch.forget()
        elif epoch < self.epoch:
            return  # this voter has not seen the newest lease yet: its heartbeat is stale news
        began = lease_clock()
        try:
            raw: bytes | None = await store.get(heartbeat_key(self.epoch))
        except ObjectMissingError:
            raw = None
        ended = lease_clock()
        if raw is not None:
            try:
                hb = Heartbeat.from_bytes(raw, f"voter {store.name!r} {heartbeat_key(self.epoch)}")
            except FormatError as e:
                log.warning("%s; counting it as no progress", e)
            else:
                if hb.epoch == self.epoch:
                    self.writer = hb
        self._watch.failover_after = self.judged_by.failover_after
        if self._watch.observed(store.name, began, ended, raw):
            self.seen_progress_at = ended

    async def read_all(self) -> None:
        """One reading of every voter at once; failures prove nothing and are skipped."""
        every = self.timing.heartbeat_every

        async def one(store: ObjectStore) -> bool:
            try:
                async with asyncio.timeout(every * 2):
                    await self._read(store)
                return True
            except (StoreError, TimeoutError) as e:
                log.debug("reading voter %s failed: %s", store.name, e)
                return False

        results = await asyncio.gather(*(one(v) for v in self.voters))
        self.reached = {v.name for v, ok in zip(self.voters, results, strict=True) if ok}

    async def until_gone(self) -> None:
        """Return once the writer's heartbeat made no progress at a majority for
        failover_after, confirmed by a fresh reading of every voter. Readings come at
        least every READ_EVERY seconds, so that a takeover follows the last moment of
        progress closely."""
        every = min(self.timing.heartbeat_every, READ_EVERY)
        while True:
            t0 = lease_clock()
            await self.read_all()
            if self.writer_gone():
                await self.read_all()  # decide on fresh readings: the takeover limit runs from them
                if self.writer_gone():
                    return
            await asyncio.sleep(max(0.0, every - (lease_clock() - t0)))

    async def take_lease(self, site: str, source: str) -> Won | None:
        """Create lease E+1 at every voter; a Won if this site got a majority of them.

        Creations are attempted at every voter, reached or not, so that a
        partitioned old writer finds the newer lease wherever it looks first.
        """
        epoch = self.epoch + 1
        doc = lease_doc(epoch, 0, source, site=site)

        async def one(store: ObjectStore) -> bool:
            try:
                async with asyncio.timeout(self.timing.heartbeat_every * 2):
                    return await take_lease(store, doc)
            except (StoreError, TimeoutError) as e:
                log.warning(
                    "could not create the lease of epoch %d at %s: %s", epoch, store.name, e
                )
                return False

        results = await asyncio.gather(*(one(v) for v in self.voters))
        leased = lease_clock()
        created = [v.name for v, ok in zip(self.voters, results, strict=True) if ok]
        if len(created) < majority(len(self.voters)):
            log.warning(
                "another site won epoch %d (this site created its lease at %s only)",
                epoch,
                ", ".join(created) or "no voter",
            )
            return None
        wait = takeover_wait(self.judged_by, self._watch, created, leased)
        if self.writer is None:
            # The writer never announced an auto-mode heartbeat: it may be a manual-mode
            # writer that keeps no gate, whose acknowledged uploads §2.4's wait protects.
            wait = max(wait, 2 * lease_window())
        return Won(epoch, created, wait, self.writer)


async def unfit_voters(stores: list[ObjectStore]) -> list[str]:
    """The voters whose server answers but does not honour conditional creates: two
    sites could both create the same lease there (§2.7), so they cannot vote.
    An unreachable voter is not judged: it may vote once it answers."""

    async def one(store: ObjectStore) -> bool:
        try:
            return await store.supports_conditional_create()
        except StoreError:
            return True

    ok = await asyncio.gather(*(one(s) for s in stores))
    return [s.name for s, fit in zip(stores, ok, strict=True) if not fit]

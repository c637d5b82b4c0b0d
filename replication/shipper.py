"""One target's shipper: sealed segments in order, then tails of the open one.

Invariant (docs/format.md §2.1): the target always holds a prefix of history.
`segments/N.seg` is uploaded only after `segments/N-1.seg` was acknowledged,
and a tail piece of segment N only after N-1 is there and only with bytes that
are durable in the local journal, so metadata never reaches a target before
the chunks it refers to (they precede it in the journal).

Invariant (docs/format.md §2.4, time-bounded leases): what a sync target holds
counts for fsync (`holds`) only once a lease check vouches for it: a listing of
`lease/` that found no newer epoch and that began either after the upload
completed (rule B, needed for whole segments, for the first tail piece of each
segment this process counts, and for what `resume` found), or, for later tail
pieces, at most LEASE_WINDOW before the moment the upload is counted (rule A).
A promoter waits 2 x LEASE_WINDOW after taking its lease before it reads the
target (and skips the wait only when it sees no tail piece past the last whole
segment, which rule B makes safe): everything a fenced writer counted was
therefore at the target before the promoter looked. No request is added to an
fsync while the health monitor keeps the check fresh (every LEASE_WINDOW/3).

The watermark (the newest whole segment the target holds, with its last LSN)
is persisted in the catalog after each acknowledged segment upload. After a
restart the shipper trusts it, then looks one segment further (an upload
acknowledged just before a crash) and lists the tail pieces of the next, so it
neither re-uploads history nor leaves a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from vaultsync.config import TargetConfig
from vaultsync.control.lease import FencedError, check_lease, lease_clock, lease_window
from vaultsync.engine.catalog import SealedSegment
from vaultsync.engine.lowprio import in_background
from vaultsync.engine.replicated import ReplicatedVolume
from vaultsync.format.bucket_layout import (
    contiguous_end,
    parse_tail_key,
    segment_key,
    tail_key,
    tail_prefix,
)
from vaultsync.format.segment import HEADER_SIZE
from vaultsync.replication.health import Health
from vaultsync.store.objectstore import ObjectStore, StoreError, ThrottledError, md5_hex

log = logging.getLogger("vaultsync.replication")


@dataclass
class ShipperStats:
    uploaded_bytes: int = 0
    uploaded_objects: int = 0
    retries: int = 0
    last_upload_at: float = 0.0


@dataclass
class Shipper:
    target: TargetConfig
    store: ObjectStore
    vol: ReplicatedVolume
    health: Health = field(default_factory=Health)
    sealed_wm: int = 0  # every segment up to this number is at the target
    acked_lsn: int = 0  # newest LSN the target holds (whole segments or tails)
    tail_off: int = 0  # bytes of segment sealed_wm+1 held as tail pieces
    in_sync: bool = True  # a sync target that has caught up and counts for fsync
    stats: ShipperStats = field(default_factory=ShipperStats)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    on_progress: Any = None  # callable() -> None, set by the replicator
    on_fenced: Any = None  # callable(reason) -> None, set by the replicator
    # The furthest journal position (and its LSN) an fsync waits for: may be ahead
    # of what is durable locally, because the local fsync runs in parallel.
    requested: tuple[tuple[int, int], int] = ((0, 0), 0)
    # lease_clock() time at which the newest successful lease check of this target
    # began (the health monitor's, every LEASE_WINDOW/3, or one of our own).
    lease_checked_at: float = float("-inf")
    # The open segment one of whose tail pieces this process counted under rule B:
    # later pieces of it may count under rule A (module docstring).
    _anchor: int = 0
    # A sync target's positions count for fsync only after `resume` had what it
    # found vouched for by a lease check (rule B).
    _vouched: bool = False
    _stopped: bool = False
    _cleanup: set[asyncio.Future[None]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def is_sync(self) -> bool:
        return self.target.mode == "sync"

    # -- position ------------------------------------------------------------------
    def holds(self, pos: tuple[int, int]) -> bool:
        """Does the target hold the journal up to `pos` = (segment, byte offset)?"""
        if self.is_sync and not self._vouched:
            return False
        segno, size = pos
        if self.sealed_wm >= segno or (size <= HEADER_SIZE and self.sealed_wm >= segno - 1):
            return True
        return self.sealed_wm + 1 == segno and self.tail_off >= size

    def lag(self) -> dict[str, Any]:
        """How far behind the target is: LSNs, bytes of journal, and seconds since the
        oldest transaction it lacks was committed."""
        segs = [s for s in self.vol.sealed_segments() if s.segno > self.sealed_wm]
        jseg, jsize = self.vol.journal_pos
        open_start = self.tail_off if jseg == self.sealed_wm + 1 else HEADER_SIZE
        lag_lsn = max(0, self.vol.last_lsn - self.acked_lsn)
        lag_bytes = sum(s.size for s in segs) + max(0, jsize - max(open_start, HEADER_SIZE))
        since = self.vol.committed_at(self.acked_lsn + 1) if lag_lsn else None
        return {
            "lag_lsn": lag_lsn,
            "lag_bytes": lag_bytes if lag_lsn else 0,
            "lag_seconds": round(max(0.0, (time.time_ns() - since) / 1e9), 3) if since else 0.0,
            "queue_segments": len(segs),
        }

    def request(self, pos: tuple[int, int], lsn: int) -> None:
        self.requested = max(self.requested, (pos, lsn))
        self.wake.set()

    # -- the loop --------------------------------------------------------------------
    async def resume(self) -> None:
        wm = self.vol.watermarks().get(self.name)
        if wm is not None:
            self.sealed_wm, self.acked_lsn = wm[0], wm[1]
        # GC deleted the oldest segments everywhere: a new target starts after them.
        first = next((s.segno for s in self.vol.sealed_segments()), None)
        if first is not None and self.sealed_wm < first - 1:
            self.sealed_wm = first - 1
        # An upload acknowledged just before a crash is not in the catalog yet.
        while self._sealed_row(self.sealed_wm + 1) is not None:
            info = await self.store.head(segment_key(self.sealed_wm + 1))
            row = self._sealed_row(self.sealed_wm + 1)
            if info is None or row is None or info.size != row.size:
                break
            self._advance_sealed(self.sealed_wm + 1, row.last_lsn or self.acked_lsn)
        pieces = []
        damaged = []
        async for o in self.store.list(tail_prefix(self.sealed_wm + 1)):
            parsed = parse_tail_key(o.key)
            if parsed and parsed[0] == self.sealed_wm + 1:
                # A piece shorter than its name says was cut in transit: it holds nothing.
                if o.size != parsed[2] - parsed[1]:
                    damaged.append(o.key)
                else:
                    pieces.append((parsed[1], parsed[2]))
        if damaged:
            await self.store.delete_many(damaged)
        # Pieces may run past what survived here (uploaded in parallel with an fsync
        # that a power cut undid); the journal will write other bytes there, so they go.
        jseg, jsize = self.vol.journal_pos
        beyond = [(a, b) for a, b in pieces if jseg != self.sealed_wm + 1 or b > jsize]
        for a, b in beyond:
            await self.store.delete(tail_key(self.sealed_wm + 1, a, b))
        self.tail_off = contiguous_end([p for p in pieces if p not in beyond])
        if self.is_sync:
            # Rule B for everything found above: a check begun after the HEADs and the
            # listing shows it was all there before any newer lease was taken.
            await self.check_lease()
            self._anchor = self.sealed_wm + 1 if self.tail_off else 0
            self._vouched = True

    # -- the lease ---------------------------------------------------------------------
    def lease_checked(self, began: float) -> None:
        """A lease check of this target that began at `began` (lease_clock) found no
        newer epoch."""
        self.lease_checked_at = max(self.lease_checked_at, began)

    async def check_lease(self) -> None:
        """Check now (FencedError if another site holds a newer lease)."""
        self.lease_checked(await check_lease(self.store, self.vol.epoch))

    async def _vouch(self, done: float, *, rule_a: bool) -> None:
        """Return once an upload that completed at `done` (lease_clock) may count as
        held; FencedError if a newer lease says it may not.

        INVARIANT (docs/format.md §2.4): it counts only if a lease check that found
        no newer epoch began after `done` (rule B: the upload landed before any newer
        lease existed, so a promoter, who lists after taking its lease, sees it), or,
        with `rule_a`, began at most LEASE_WINDOW before now (rule A: a promoter
        waits 2 x LEASE_WINDOW after its lease before it lists, and our check
        began before its lease existed, so `done` < now <= lease + LEASE_WINDOW
        comes before its listing). Otherwise we check inline, which is rule B.
        """
        if self.lease_checked_at > done:
            return
        if rule_a and lease_clock() - self.lease_checked_at <= lease_window():
            return
        await self.check_lease()

    def _sealed_row(self, segno: int) -> SealedSegment | None:
        return self.vol.sealed_segment(segno)

    def _advance_sealed(self, segno: int, last_lsn: int) -> None:
        self.sealed_wm = segno
        self.acked_lsn = max(self.acked_lsn, last_lsn)
        self.vol.set_watermark(self.name, segno, self.acked_lsn)

    async def _read_async(self, segno: int, start: int, end: int | None) -> bytes:
        # A small tail is in the page cache: a thread hop would cost more than the read.
        read = self.vol.read_segment
        if end is not None and end - start <= 256 * 1024:
            return read(segno, start, end)
        return await in_background(read, segno, start, end)

    async def step(self) -> bool:
        """Ship the next thing; False when there is nothing to do."""
        nxt = self.sealed_wm + 1
        row = self._sealed_row(nxt)
        if row is not None:
            data = await self._read_async(nxt, 0, None)
            t0 = time.monotonic()
            if not await self.store.put_new(segment_key(nxt), data):
                # A writer that finds N sealed by someone else (a promoter sealed it from
                # our tail pieces) is fenced here: the cheap place to notice it.
                await self._same_or_fenced(nxt, data)
            latency = time.monotonic() - t0
            if self.is_sync:
                # Rule B for whole segments: a promoter that sees no tail piece past
                # the last whole segment does not wait (format §2.4).
                await self._vouch(lease_clock(), rule_a=False)
            self._uploaded(len(data), latency)
            had_tail = self.tail_off > 0
            self._advance_sealed(nxt, row.last_lsn or self.acked_lsn)
            self.tail_off = 0
            if had_tail:
                # Redundant now (format §2.2); deleting them must not hold up the next fsync.
                # Only now that N is vouched for: a promoter that skips its wait relies on
                # our first counted piece of N staying until N is whole (format §2.4).
                task = asyncio.ensure_future(self._drop_tails(nxt))
                self._cleanup.add(task)
                task.add_done_callback(self._cleanup.discard)
            return True
        if self.is_sync:
            (dseg, dsize), dlsn = max((self.vol.durable_pos, self.vol.durable_lsn), self.requested)
            # A segment holding only its header says nothing yet; wait for records.
            if dseg == nxt and dsize > max(self.tail_off, HEADER_SIZE):
                start = self.tail_off
                data = await self._read_async(nxt, start, dsize)
                t0 = time.monotonic()
                await self.store.put(tail_key(nxt, start, dsize), data)
                latency = time.monotonic() - t0
                # No HEAD of segments/N to learn whether a promoter sealed N: the lease
                # rule covers it (a promoter seals N only after its wait, when no check
                # of ours can vouch for a piece any more). Rule A for a piece of a
                # segment already anchored by a rule-B piece, rule B for the first.
                await self._vouch(lease_clock(), rule_a=self._anchor == nxt)
                self._anchor = nxt
                self.tail_off = dsize
                self.acked_lsn = max(self.acked_lsn, dlsn)
                self._uploaded(len(data), latency)
                await asyncio.sleep(0)  # the fsyncs waiting for this piece answer first
                return True
        return False

    async def _same_or_fenced(self, segno: int, data: bytes) -> None:
        """The segment exists already: ours (a resumed upload) or a newer writer's?"""
        info = await self.store.head(segment_key(segno))
        if info is not None and info.etag == md5_hex(data):
            return
        if info is not None and "-" not in info.etag and info.size != len(data):
            same = False
        else:
            same = await self.store.get(segment_key(segno)) == data
        if not same:
            raise FencedError(
                f"segment {segno} at target {self.name!r} holds another writer's history"
            )

    async def _drop_tails(self, segno: int) -> None:
        with contextlib.suppress(StoreError):
            keys = [o.key async for o in self.store.list(tail_prefix(segno))]
            await self.store.delete_many(keys)

    def _uploaded(self, n: int, latency: float) -> None:
        self.stats.uploaded_bytes += n
        self.stats.uploaded_objects += 1
        self.stats.last_upload_at = time.time()
        self.health.ok(latency)
        self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    async def run(self) -> None:
        backoff = 0.5
        resumed = False
        while not self._stopped:
            try:
                if not resumed:
                    await self.resume()
                    resumed = True
                    self._progress()
                while await self.step():
                    backoff = 0.5
                self._check_in_sync()
            except FencedError as e:
                log.error("target %s: %s; this writer is fenced", self.name, e)
                if self.on_fenced is not None:
                    self.on_fenced(str(e))
                return
            except StoreError as e:
                self.stats.retries += 1
                if self.health.failed(e.reason):
                    log.warning("target %s is %s: %s", self.name, self.health.state, e.reason)
                self._progress()
                slow = 4.0 if isinstance(e, ThrottledError) else 1.0
                backoff = min(30.0, backoff * 2 * slow)
                # Back off, but wake early when the monitor sees the target come back.
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(random.uniform(backoff / 2, backoff)):
                        await self.wake.wait()
                continue
            self.wake.clear()
            # asyncio.timeout, not wait_for: no task per wait (a sync fsync wakes us each time).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.wake.wait()

    def _check_in_sync(self) -> None:
        if (
            self.is_sync
            and not self.in_sync
            and self.health.state != "down"
            and self.holds(self.vol.durable_pos)
        ):
            self.in_sync = True
            log.warning("target %s caught up; it counts for fsync again", self.name)
            self._progress()

    def stop(self) -> None:
        self._stopped = True
        self.wake.set()

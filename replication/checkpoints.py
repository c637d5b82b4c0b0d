"""Checkpoints of a mounted volume: when one is built, and which target gets which.

A checkpoint as of LSN L is the catalog with every transaction up to L applied
(docs/format.md §2.5), so recovery from it replays only what follows. The
volume builds one (`Volume.build_checkpoint`; the image itself is made in
engine/catalog_image.py); this module decides when, keeps those not yet at
every target, gives each target the newest it can take, and at a clean
unmount leaves one of the last LSN at every target that holds it.

INVARIANT: a checkpoint at a target never references an LSN that target does
not hold (`Checkpoints._send`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from vaultsync.config import Config
from vaultsync.engine.replicated import ReplicatedVolume
from vaultsync.format.bucket_layout import checkpoint_key
from vaultsync.replication.shipper import Shipper
from vaultsync.store.objectstore import StoreError

log = logging.getLogger("vaultsync.replication")

# Checkpoints kept for targets that have not caught up to them yet.
MAX_PENDING_CHECKPOINTS = 3
# Seconds a clean unmount spends on its final checkpoint before giving up on a target.
FINAL_CHECKPOINT_TIMEOUT = 20.0


@dataclass(frozen=True)
class Checkpoint:
    lsn: int
    time_ns: int
    body: bytes
    # The image's segment table lists every segment holding an LSN up to `lsn` as
    # sealed. Not so when transactions committed while the image was read were still
    # in the open segment: recovery from it then reads that segment once more (it
    # applies nothing from it); a clean unmount replaces such an image.
    complete: bool = True


class Checkpoints:
    """The checkpoint policy of one replicator. It shares the replicator's list of
    shippers, which `Replicator.reload` changes in place, so targets added later get
    checkpoints too."""

    def __init__(self, cfg: Config, vol: ReplicatedVolume, shippers: list[Shipper]) -> None:
        self.cfg = cfg
        self.vol = vol
        self.shippers = shippers
        # Checkpoints built and not yet at every target, oldest first; and per target
        # the LSN of the newest checkpoint uploaded there by this process.
        self._pending: list[Checkpoint] = []
        self._sent: dict[str, int] = {}
        self._incomplete: dict[str, int] = {}  # target -> LSN of an incomplete image sent
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one builder or sender at a time

    def resume(self) -> None:
        """At start: every target has the newest checkpoint that reached all of them."""
        at_all = self.vol.checkpoint_lsn
        self._sent = {s.name: at_all for s in self.shippers}

    def progress(self) -> None:
        """A shipper moved: a target may now hold a pending checkpoint's LSN (without one
        pending, the loop's own timer is enough)."""
        if self._pending:
            self._wake.set()

    def forget(self, target: str) -> None:
        """`target` was removed from the config."""
        self._sent.pop(target, None)

    def _held_lsn(self, sh: Shipper) -> int:
        """The newest LSN `sh`'s target holds in whole segments (tails do not count)."""
        row = self.vol.sealed_segment(sh.sealed_wm)
        return int(row.last_lsn or 0) if row is not None else 0

    async def _build(self) -> Checkpoint | None:
        """An image of the catalog as it is now, its LSNs sealed so they ship at once.

        Sealing first means the image's last LSN is in a sealed segment that the
        shippers are already sending, so each target can take the checkpoint as
        soon as it has that segment, not after the open one fills or ages out.
        """
        await self.vol.maybe_seal(force=True)
        await self.vol.sync(replicate=False)  # every sealed segment noted in the catalog
        sealed_to = self.vol.last_lsn if self.vol.everything_sealed else 0
        built = await self.vol.build_checkpoint()
        if built is None:
            return None
        lsn, when, body = built
        return Checkpoint(lsn, when, body, complete=lsn <= sealed_to)

    async def _send(self, deadline: float | None = None) -> None:
        """Upload to each target the newest pending checkpoint it can take now.

        INVARIANT: a checkpoint at a target never references an LSN that target
        does not hold. A checkpoint of LSN L goes to a target only once the
        target has acknowledged whole segments up to one whose last LSN is >= L
        (`_held_lsn`); with the prefix rule (docs/format.md §2.1) the target then
        holds every transaction up to L and every chunk they refer to. A target
        that is down or behind is skipped and gets a newer checkpoint later; it
        never holds up the others.
        """
        jobs = []
        for sh in self.shippers:
            if sh.health.state == "down":
                continue
            held, sent = self._held_lsn(sh), self._sent.get(sh.name, 0)
            fit = [c for c in self._pending if sent < c.lsn <= held]
            if fit:
                jobs.append(self._send_one(sh, fit[-1], deadline))
        if jobs:
            await asyncio.gather(*jobs)
        # What every target has (or has something newer than) is needed no more.
        floor = min((self._sent.get(s.name, 0) for s in self.shippers), default=0)
        self._pending = [c for c in self._pending if c.lsn > floor]
        if self.vol.advance_checkpoint_lsn(floor):
            log.info("checkpoint at LSN %d is at every target", floor)

    async def _send_one(self, sh: Shipper, c: Checkpoint, deadline: float | None) -> None:
        put = sh.store.put_new(checkpoint_key(c.lsn, c.time_ns), c.body)
        try:
            if deadline is None:
                await put
            else:
                await asyncio.wait_for(put, max(0.0, deadline - time.monotonic()))
        except (StoreError, TimeoutError) as e:
            log.warning("checkpoint at LSN %d did not reach target %s: %s", c.lsn, sh.name, e)
            return
        self._sent[sh.name] = c.lsn
        if not c.complete:
            self._incomplete[sh.name] = c.lsn

    async def run(self) -> None:
        """Build a checkpoint every `checkpoint_every` transactions (or `checkpoint_interval`
        seconds), deciding every `checkpoint_check` seconds (an image copies the whole
        catalog); hand pending ones to the targets as soon as they hold their LSN: the
        loop also wakes on every shipper's progress."""
        every = self.cfg.replication.checkpoint_every
        interval = self.cfg.replication.checkpoint_interval
        check = self.cfg.replication.checkpoint_check
        built = self.vol.checkpoint_lsn
        last_built = time.monotonic()
        next_check = time.monotonic() + check
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_check - time.monotonic()))
            self._wake.clear()
            if self.vol.fenced:
                return
            try:
                async with self._lock:
                    now = time.monotonic()
                    if now >= next_check:
                        next_check = now + check
                        news = self.vol.last_lsn - built
                        if news >= every or (
                            interval and news > 0 and now - last_built >= interval
                        ):
                            c = await self._build()
                            last_built = time.monotonic()
                            if c is not None:
                                built = c.lsn
                                self._add_pending(c)
                    if self._pending:
                        await self._send()
            except Exception:
                log.exception("checkpoint failed; will retry")

    async def _replace_incomplete(self, stale: list[Shipper], lsn: int, deadline: float) -> None:
        """The targets' checkpoint of the last LSN was taken with its segment still open:
        the same point again, now that nothing moves, under the same key (both images
        are the catalog as of that LSN, so a reader gets a valid one either way)."""
        c = await self._build()
        if c is None or c.lsn != lsn or not c.complete:
            return

        async def one(sh: Shipper) -> None:
            put = sh.store.put(checkpoint_key(c.lsn, c.time_ns), c.body)
            try:
                await asyncio.wait_for(put, max(0.0, deadline - time.monotonic()))
            except (StoreError, TimeoutError) as e:
                log.warning("checkpoint at LSN %d not refreshed at %s: %s", lsn, sh.name, e)
                return
            self._incomplete.pop(sh.name, None)

        await asyncio.gather(*(one(sh) for sh in stale))

    def _add_pending(self, c: Checkpoint) -> None:
        # A target far behind keeps an older one to catch up to; at most a few are kept.
        self._pending = [*self._pending, c][-MAX_PENDING_CHECKPOINTS:]

    async def final(self, timeout: float = FINAL_CHECKPOINT_TIMEOUT) -> list[str]:
        """At clean unmount, after the final shipping: a checkpoint of the last LSN at every
        target that holds it, so recovery from there replays nothing. Bounded by
        `timeout` (a dead or slow target is skipped, never waited for); returns the
        names of the targets that have a checkpoint of the last LSN."""
        if not self.cfg.replication.checkpoint_every or not self.shippers or self.vol.fenced:
            return []
        deadline = time.monotonic() + timeout
        lsn = self.vol.last_lsn

        async def go() -> None:
            async with self._lock:
                owed = any(self._sent.get(s.name, 0) < lsn for s in self.shippers)
                if lsn and owed and not any(c.lsn == lsn for c in self._pending):
                    c = await self._build()
                    if c is not None:
                        self._add_pending(c)
                if self._pending:
                    await self._send(deadline)
                stale = [s for s in self.shippers if self._incomplete.get(s.name) == lsn]
                if stale:
                    await self._replace_incomplete(stale, lsn, deadline)

        try:
            await asyncio.wait_for(go(), timeout)
        except TimeoutError:
            log.warning("final checkpoint: gave up after %.0fs", timeout)
        except Exception:
            log.exception("final checkpoint failed")
        done = [s.name for s in self.shippers if self._sent.get(s.name, 0) >= lsn]
        late = [s.name for s in self.shippers if s.name not in done]
        if late:
            log.warning(
                "no final checkpoint at target(s) %s (down or behind); recovery there "
                "replays the segments after their newest checkpoint",
                ", ".join(late),
            )
        return done

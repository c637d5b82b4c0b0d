"""All targets of a mounted volume: shippers, health probes, the fsync barrier, status.

The barrier is what makes a synchronous target synchronous: `Volume.sync()`
calls it after the local fsync, and it returns once `quorum` of the sync
targets that count hold the durable journal position. A sync target counts
unless its policy is `degrade` and it is down or still catching up; with
`block` it always counts, and fsync fails with EIO after `block_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from vaultsync.config import Config, TargetConfig
from vaultsync.control.lease import FencedError, check_lease, lease_window
from vaultsync.engine.journal import Location
from vaultsync.engine.posix import FsError
from vaultsync.engine.volume import Volume
from vaultsync.format.bucket_layout import checkpoint_key
from vaultsync.format.header import HEADER_KEY
from vaultsync.format.state_layout import REPLICATION_STATUS, StateDir
from vaultsync.replication.checkpoint import build_checkpoint
from vaultsync.replication.fetch import fetch_chunk
from vaultsync.replication.gc import GarbageCollector, GcError, GcReport
from vaultsync.replication.health import Health
from vaultsync.replication.shipper import Shipper
from vaultsync.store.objectstore import ObjectStore, StoreError

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


class Replicator:
    def __init__(self, cfg: Config, vol: Volume) -> None:
        self.cfg = cfg
        self.vol = vol
        self.shippers: list[Shipper] = []
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._probe_stores: list[ObjectStore] = []
        self._degraded_logged: set[str] = set()
        self.gc: GarbageCollector | None = None
        self.gc_now = asyncio.Event()  # set by SIGUSR1 (`vaultsync gc` on a mounted volume)
        self.gc_last: dict[str, Any] | None = None
        # Checkpoints built and not yet at every target, oldest first; and per target
        # the LSN of the newest checkpoint uploaded there by this process.
        self._ckpt_pending: list[Checkpoint] = []
        self._ckpt_sent: dict[str, int] = {}
        self._ckpt_incomplete: dict[str, int] = {}  # target -> LSN of an incomplete image sent
        self._ckpt_wake = asyncio.Event()
        self._ckpt_lock = asyncio.Lock()  # one builder or sender at a time

    async def _open_target(self, t: TargetConfig) -> None:
        """A shipper (and its health probe) for one target; started by `_launch`."""
        store = await self._stack.enter_async_context(
            ObjectStore(t, connect_timeout=3, read_timeout=30, max_attempts=3)
        )
        probe = await self._stack.enter_async_context(
            ObjectStore(t, connect_timeout=2, read_timeout=5, max_attempts=1)
        )
        sh = Shipper(t, store, self.vol, Health())
        sh.on_progress = self._progress
        sh.on_fenced = self._fenced
        self.shippers.append(sh)
        self._probe_stores.append(probe)

    def _launch(self, sh: Shipper, probe: ObjectStore) -> None:
        self._tasks.append(asyncio.create_task(sh.run(), name=f"ship-{sh.name}"))
        self._tasks.append(asyncio.create_task(self._monitor(sh, probe), name=f"probe-{sh.name}"))

    def _wire_volume(self) -> None:
        """Point the volume's fsync barrier and remote reads at the current targets."""
        has_sync = any(s.is_sync for s in self.shippers)
        self.vol.replicate = self.barrier if has_sync else None
        self.vol.replicate_soon = self._request_sync if has_sync else None
        if self.shippers and self.vol.fetch_remote is None:
            shippers = self.shippers  # the live list: targets added later are used too

            async def fetch(loc: Location, cid: bytes) -> bytes:
                data: bytes = await fetch_chunk(shippers, self.vol, loc, cid)
                return data

            self.vol.fetch_remote = fetch

    async def start(self) -> None:
        for t in self.cfg.targets:
            await self._open_target(t)
        self.vol.listeners.append(self._on_durable)
        self._wire_volume()
        for sh, probe in zip(self.shippers, self._probe_stores, strict=True):
            self._launch(sh, probe)
        self._tasks.append(asyncio.create_task(self._write_status_loop(), name="repl-status"))
        # Every target has the newest checkpoint that reached all of them (catalog meta).
        at_all = int(self.vol.catalog.get_meta("checkpoint_lsn") or 0)
        self._ckpt_sent = {s.name: at_all for s in self.shippers}
        if self.cfg.replication.checkpoint_every and self.shippers:
            self._tasks.append(asyncio.create_task(self._checkpoint_loop(), name="checkpoints"))
        self.gc = GarbageCollector(
            self.vol,
            self.cfg,
            [s.store for s in self.shippers],
            lambda: {s.name: s.sealed_wm for s in self.shippers},
            self.wait_shipped,
        )
        self._tasks.append(asyncio.create_task(self._gc_loop(), name="gc"))

    async def wait_shipped(self, segno: int, timeout: float) -> bool:
        """Wait until every target holds segment `segno` whole."""
        deadline = time.monotonic() + timeout
        while any(s.sealed_wm < segno for s in self.shippers):
            if time.monotonic() >= deadline:
                return False
            self._wake_all()
            await asyncio.sleep(0.1)
        return True

    async def _gc_loop(self) -> None:
        interval = self.cfg.retention.gc_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gc_now.wait(), interval or None)
            self.gc_now.clear()
            assert self.gc is not None
            try:
                report = await self.gc.run()
                self.gc_last = {"ok": True, **report.to_json()}
                log.info(
                    "gc: %d segment(s) deleted (%d bytes), %d compacted, %d checkpoint(s) dropped",
                    len(report.segments_deleted),
                    report.bytes_deleted,
                    len(report.segments_compacted),
                    report.checkpoints_dropped,
                )
            except (GcError, StoreError) as e:
                self.gc_last = {"ok": False, "error": str(e), "finished_ns": time.time_ns()}
                log.warning("gc did not run: %s", e)
            except Exception as e:
                self.gc_last = {"ok": False, "error": repr(e), "finished_ns": time.time_ns()}
                log.exception("gc failed")
            self._write_status()

    async def run_gc(self, dry_run: bool = False) -> GcReport:
        assert self.gc is not None
        return await self.gc.run(dry_run)

    async def reload(self, cfg: Config) -> tuple[list[str], list[str]]:
        """Adopt the targets of a re-read config (SIGHUP): start shippers for new ones,
        stop the ones removed. A new target's shipper resumes from what the bucket
        already holds (a migration seeded it), so nothing is uploaded twice.
        Returns (added, removed) target names."""
        old = {s.name for s in self.shippers}
        new = {t.name for t in cfg.targets}
        removed = sorted(old - new)
        for name in removed:
            sh = next(s for s in self.shippers if s.name == name)
            sh.stop()
            for task in [
                t for t in self._tasks if t.get_name() in (f"ship-{name}", f"probe-{name}")
            ]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                self._tasks.remove(task)
            self._ckpt_sent.pop(name, None)
            i = self.shippers.index(sh)
            del self.shippers[i]
            del self._probe_stores[i]
        added = [t for t in cfg.targets if t.name not in old]
        self.cfg = cfg
        for t in added:
            await self._open_target(t)
            self._launch(self.shippers[-1], self._probe_stores[-1])
        self._wire_volume()
        if self.gc is not None:  # GC decides over exactly the targets that are shipped to
            self.gc.cfg = cfg
            self.gc.stores = [s.store for s in self.shippers]
        self._write_status()
        return [t.name for t in added], removed

    async def drain(self, timeout: float = 30.0) -> None:
        """At unmount: give every healthy target a chance to receive what is sealed."""
        self._wake_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [
                s
                for s in self.shippers
                if s.health.state != "down" and s.lag()["queue_segments"] > 0
            ]
            if not pending:
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.vol.replicate = None
        self.vol.replicate_soon = None
        self.vol.fetch_remote = None
        with contextlib.suppress(ValueError):
            self.vol.listeners.remove(self._on_durable)
        for sh in self.shippers:
            sh.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        try:
            self._write_status()
        except OSError as e:  # a full disk, say: the status file is a view, never state
            log.warning("could not write %s at shutdown: %s", REPLICATION_STATUS, e)
        await self._stack.aclose()

    # -- events ------------------------------------------------------------------------
    def _wake_all(self) -> None:
        for sh in self.shippers:
            sh.wake.set()

    def _on_durable(self, sealed: bool) -> None:
        """A sync made journal data durable: sync shippers send its tail; others wait for seals.

        Waking an asynchronous shipper on every fsync would only have it find
        nothing sealed, at a cost per fsync of the same order as the fsync.
        """
        for sh in self.shippers:
            if sealed or sh.is_sync:
                sh.wake.set()

    def _progress(self) -> None:
        self._changed.set()
        if self._ckpt_pending:  # a target may now hold one; otherwise the loop's own timer
            self._ckpt_wake.set()

    def _fenced(self, reason: str) -> None:
        if not self.vol.fenced:
            log.error("FENCED: %s. Writes are refused from now on; nothing more is shipped", reason)
        self.vol.fence(reason)
        for sh in self.shippers:
            sh.stop()
        self._changed.set()

    # -- the fsync barrier ------------------------------------------------------------------
    def _counts(self, sh: Shipper) -> bool:
        if sh.target.on_failure == "block":
            return True
        if sh.health.state == "down":
            if sh.in_sync:
                sh.in_sync = False
                log.error(
                    "sync target %s is down (%s); fsync carries on without it (policy "
                    "degrade) until it has caught up",
                    sh.name,
                    sh.health.reason,
                )
            return False
        return bool(sh.in_sync)

    def _request_sync(self, pos: tuple[int, int], lsn: int) -> None:
        for s in self.shippers:
            if s.is_sync:
                s.request(pos, lsn)

    async def barrier(self, pos: tuple[int, int], lsn: int) -> None:
        if self.vol.fenced:
            raise FsError(errno.EROFS)
        sync = [s for s in self.shippers if s.is_sync]
        if not sync:
            return
        need = self.cfg.replication.quorum or len(sync)
        deadline = time.monotonic() + self.cfg.replication.block_timeout
        for s in sync:
            s.request(pos, lsn)
        while True:
            if self.vol.fenced:
                raise FsError(errno.EROFS)
            members = [s for s in sync if self._counts(s)]
            if sum(s.holds(pos) for s in members) >= min(need, len(members)):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                late = [s.name for s in members if not s.holds(pos)]
                log.error("fsync timed out waiting for sync target(s) %s", ", ".join(late))
                raise FsError(errno.EIO)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):  # no task per wait, as wait_for
                    await self._changed.wait()

    # -- health ------------------------------------------------------------------------
    async def _monitor(self, sh: Shipper, probe: ObjectStore) -> None:
        """Probe the target's health every `probe_interval` and check the writer lease
        there at least every LEASE_WINDOW/3, whatever `probe_interval` is.

        Each successful lease check tells the shipper when it began: while one began
        less than LEASE_WINDOW ago the shipper counts tail pieces for fsync without a
        request of its own (docs/format.md §2.4). Checking three times per window
        keeps that true through a slow or lost check.
        """
        next_probe = 0.0
        while True:
            t0 = time.monotonic()
            try:
                if t0 >= next_probe:
                    await probe.head(HEADER_KEY)
                    next_probe = t0 + self.cfg.replication.probe_interval
                sh.lease_checked(await check_lease(probe, self.vol.epoch))
                changed = sh.health.ok(time.monotonic() - t0)
            except FencedError as e:
                self._fenced(str(e))
                return
            except StoreError as e:
                changed = sh.health.failed(e.reason)
                next_probe = 0.0  # a failing target is probed at every turn
            if changed and sh.health.state != "down":
                sh.wake.set()  # back (or better): the shipper should not wait out its back-off
            if changed:
                log.warning(
                    "target %s is now %s%s",
                    sh.name,
                    sh.health.state,
                    f": {sh.health.reason}" if sh.health.reason else "",
                )
                self._progress()
                sh.wake.set()
            interval = self.cfg.replication.probe_interval
            pause = interval if sh.health.state == "healthy" else min(interval, 1.0)
            await asyncio.sleep(min(pause, lease_window() / 3))

    # -- checkpoints -------------------------------------------------------------------
    def _held_lsn(self, sh: Shipper) -> int:
        """The newest LSN `sh`'s target holds in whole segments (tails do not count)."""
        row = self.vol.catalog.sealed_segment(sh.sealed_wm)
        return int(row["last_lsn"] or 0) if row is not None else 0

    async def _build_checkpoint(self) -> Checkpoint | None:
        """An image of the catalog as it is now, its LSNs sealed so they ship at once.

        Sealing first means the image's last LSN is in a sealed segment that the
        shippers are already sending, so each target can take the checkpoint as
        soon as it has that segment, not after the open one fills or ages out.
        """
        await self.vol.maybe_seal(force=True)
        await self.vol.sync(replicate=False)  # every sealed segment noted in the catalog
        sealed_to = self.vol.last_lsn if not self.vol.journal.records else 0
        built = await build_checkpoint(self.vol)
        if built is None:
            return None
        lsn, when, body = built
        return Checkpoint(lsn, when, body, complete=lsn <= sealed_to)

    async def _send_checkpoints(self, deadline: float | None = None) -> None:
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
            held, sent = self._held_lsn(sh), self._ckpt_sent.get(sh.name, 0)
            fit = [c for c in self._ckpt_pending if sent < c.lsn <= held]
            if fit:
                jobs.append(self._send_one(sh, fit[-1], deadline))
        if jobs:
            await asyncio.gather(*jobs)
        # What every target has (or has something newer than) is needed no more.
        floor = min((self._ckpt_sent.get(s.name, 0) for s in self.shippers), default=0)
        self._ckpt_pending = [c for c in self._ckpt_pending if c.lsn > floor]
        if floor > int(self.vol.catalog.get_meta("checkpoint_lsn") or 0):
            self.vol.catalog.set_meta("checkpoint_lsn", floor)
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
        self._ckpt_sent[sh.name] = c.lsn
        if not c.complete:
            self._ckpt_incomplete[sh.name] = c.lsn

    async def _checkpoint_loop(self) -> None:
        """Build a checkpoint every `checkpoint_every` transactions (or `checkpoint_interval`
        seconds), deciding every `checkpoint_check` seconds (an image copies the whole
        catalog); hand pending ones to the targets as soon as they hold their LSN: the
        loop also wakes on every shipper's progress."""
        every = self.cfg.replication.checkpoint_every
        interval = self.cfg.replication.checkpoint_interval
        check = self.cfg.replication.checkpoint_check
        built = int(self.vol.catalog.get_meta("checkpoint_lsn") or 0)
        last_built = time.monotonic()
        next_check = time.monotonic() + check
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._ckpt_wake.wait(), max(0.0, next_check - time.monotonic())
                )
            self._ckpt_wake.clear()
            if self.vol.fenced:
                return
            try:
                async with self._ckpt_lock:
                    now = time.monotonic()
                    if now >= next_check:
                        next_check = now + check
                        news = self.vol.last_lsn - built
                        if news >= every or (
                            interval and news > 0 and now - last_built >= interval
                        ):
                            c = await self._build_checkpoint()
                            last_built = time.monotonic()
                            if c is not None:
                                built = c.lsn
                                self._add_pending(c)
                    if self._ckpt_pending:
                        await self._send_checkpoints()
            except Exception:
                log.exception("checkpoint failed; will retry")

    async def _replace_incomplete(self, stale: list[Shipper], lsn: int, deadline: float) -> None:
        """The targets' checkpoint of the last LSN was taken with its segment still open:
        the same point again, now that nothing moves, under the same key (both images
        are the catalog as of that LSN, so a reader gets a valid one either way)."""
        c = await self._build_checkpoint()
        if c is None or c.lsn != lsn or not c.complete:
            return

        async def one(sh: Shipper) -> None:
            put = sh.store.put(checkpoint_key(c.lsn, c.time_ns), c.body)
            try:
                await asyncio.wait_for(put, max(0.0, deadline - time.monotonic()))
            except (StoreError, TimeoutError) as e:
                log.warning("checkpoint at LSN %d not refreshed at %s: %s", lsn, sh.name, e)
                return
            self._ckpt_incomplete.pop(sh.name, None)

        await asyncio.gather(*(one(sh) for sh in stale))

    def _add_pending(self, c: Checkpoint) -> None:
        # A target far behind keeps an older one to catch up to; at most a few are kept.
        self._ckpt_pending = [*self._ckpt_pending, c][-MAX_PENDING_CHECKPOINTS:]

    async def final_checkpoint(self, timeout: float = FINAL_CHECKPOINT_TIMEOUT) -> list[str]:
        """At clean unmount, after the final shipping: a checkpoint of the last LSN at every
        target that holds it, so recovery from there replays nothing. Bounded by
        `timeout` (a dead or slow target is skipped, never waited for); returns the
        names of the targets that have a checkpoint of the last LSN."""
        if not self.cfg.replication.checkpoint_every or not self.shippers or self.vol.fenced:
            return []
        deadline = time.monotonic() + timeout
        lsn = self.vol.last_lsn

        async def go() -> None:
            async with self._ckpt_lock:
                owed = any(self._ckpt_sent.get(s.name, 0) < lsn for s in self.shippers)
                if lsn and owed and not any(c.lsn == lsn for c in self._ckpt_pending):
                    c = await self._build_checkpoint()
                    if c is not None:
                        self._add_pending(c)
                if self._ckpt_pending:
                    await self._send_checkpoints(deadline)
                stale = [s for s in self.shippers if self._ckpt_incomplete.get(s.name) == lsn]
                if stale:
                    await self._replace_incomplete(stale, lsn, deadline)

        try:
            await asyncio.wait_for(go(), timeout)
        except TimeoutError:
            log.warning("final checkpoint: gave up after %.0fs", timeout)
        except Exception:
            log.exception("final checkpoint failed")
        done = [s.name for s in self.shippers if self._ckpt_sent.get(s.name, 0) >= lsn]
        late = [s.name for s in self.shippers if s.name not in done]
        if late:
            log.warning(
                "no final checkpoint at target(s) %s (down or behind); recovery there "
                "replays the segments after their newest checkpoint",
                ", ".join(late),
            )
        return done

    # -- status --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        out = {}
        for sh in self.shippers:
            h = sh.health
            out[sh.name] = {
                "mode": sh.target.mode,
                "effective_mode": "sync" if sh.is_sync and self._counts(sh) else "async",
                "health": h.state,
                "reason": h.reason,
                "last_error": h.last_error,
                "last_error_at": h.last_error_at,
                "watermark_segment": sh.sealed_wm,
                "watermark_lsn": sh.acked_lsn,
                "uploaded_bytes": sh.stats.uploaded_bytes,
                "uploaded_objects": sh.stats.uploaded_objects,
                "retries": sh.stats.retries,
                **sh.lag(),
            }
        return {"updated_at": time.time(), "pid": os.getpid(), "targets": out, "gc": self.gc_last}

    def _write_status(self) -> None:
        path = StateDir(self.vol.state_dir).replication_status
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        os.replace(tmp, path)

    async def _write_status_loop(self) -> None:
        while True:
            try:
                self._write_status()
            except OSError as e:
                log.warning("could not write %s: %s", REPLICATION_STATUS, e)
            except Exception:
                log.exception("could not write %s", REPLICATION_STATUS)
            await asyncio.sleep(1.0)

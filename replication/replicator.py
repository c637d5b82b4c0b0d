"""All targets of a mounted volume: shippers, health probes, the fsync barrier, GC, status.

The barrier is what makes a synchronous target synchronous: `Volume.sync()`
calls it after the local fsync, and it returns once `quorum` of the sync
targets that count hold the durable journal position. A sync target counts
unless its policy is `degrade` and it is down or still catching up; with
`block` it always counts, and fsync fails with EIO after `block_timeout`.

The replicator wires the parts together; when checkpoints are built and where
they go is checkpoints.py's.
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
from typing import Any

from vaultsync.config import Config, TargetConfig
from vaultsync.control.lease import FencedError, check_lease, lease_window
from vaultsync.engine.journal import Location
from vaultsync.engine.posix import FsError
from vaultsync.engine.replicated import ReplicatedVolume
from vaultsync.format.header import HEADER_KEY
from vaultsync.format.state_layout import REPLICATION_STATUS, StateDir
from vaultsync.replication.checkpoints import FINAL_CHECKPOINT_TIMEOUT, Checkpoints
from vaultsync.replication.fetch import fetch_chunk
from vaultsync.replication.gc import GarbageCollector, GcError, GcReport
from vaultsync.replication.health import Health
from vaultsync.replication.shipper import Shipper
from vaultsync.store.objectstore import ObjectStore, StoreError

log = logging.getLogger("vaultsync.replication")


class Replicator:
    def __init__(self, cfg: Config, vol: ReplicatedVolume) -> None:
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
        self.checkpoints = Checkpoints(cfg, vol, self.shippers)

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
        sh.on_fenced = self.fence
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
        self.checkpoints.resume()
        if self.cfg.replication.checkpoint_every and self.shippers:
            self._tasks.append(asyncio.create_task(self.checkpoints.run(), name="checkpoints"))
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
            self.checkpoints.forget(name)
            i = self.shippers.index(sh)
            del self.shippers[i]
            del self._probe_stores[i]
        added = [t for t in cfg.targets if t.name not in old]
        self.cfg = cfg
        self.checkpoints.cfg = cfg
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

    async def final_checkpoint(self, timeout: float = FINAL_CHECKPOINT_TIMEOUT) -> list[str]:
        """At clean unmount, after `drain`: see `Checkpoints.final`."""
        return await self.checkpoints.final(timeout)

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
        self.checkpoints.progress()

    def fence(self, reason: str) -> None:
        """Another site holds a newer lease: refuse writes, ship nothing more."""
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
                self.fence(str(e))
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

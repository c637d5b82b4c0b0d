"""The mount daemon in automatic failover: one site of a volume, writer or standby.

`vaultsync mount CONFIG MOUNTPOINT` with `[failover] mode = "auto"` runs this
instead of writer.py's plain mount. The site decides its role from the voters
(docs/format.md §2.7) and keeps the same mountpoint through every change:

- **writer**: the volume as writer.py serves it, plus the heartbeat at every
  voter and the gate that lets FUSE acknowledge only while a majority is held;
- **standby**: a warm copy of the volume followed segment by segment
  (replication/follower.py), served read-only with the kernel's caches
  invalidated as it advances, while the writer's heartbeat is watched; when it
  stops at a majority of voters, the standby takes the next lease, continues
  the history (replication/takeover.py) and turns the same mount read-write;
- **fenced**: a former writer that another site replaced: its own last state,
  read-only; what it had not shipped stays in its journal for salvage.

Every role change is logged with its reason, runs the `on_promote` or
`on_demote` hook, and shows in `vaultsync status` through `failover.json`.
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
from pathlib import Path
from typing import Any

from vaultsync.config import Config
from vaultsync.control.failover_rules import Timing, majority
from vaultsync.control.hooks import run_hook
from vaultsync.control.lease import current_epoch, lease_clock, read_lease
from vaultsync.daemon.memory import tame_malloc
from vaultsync.daemon.writer import Writer, on_signals
from vaultsync.engine.catalog import read_only
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.posix import FsError
from vaultsync.engine.state_lock import take_lock
from vaultsync.engine.volume import Volume, has_volume
from vaultsync.errors import VaultsyncError
from vaultsync.format.heartbeat import voter_identity
from vaultsync.format.state_layout import StateDir
from vaultsync.fuse.mount import (
    MountError,
    StopSignal,
    check_mountpoint,
    clean_stale_mount,
    init_fuse,
)
from vaultsync.points.recovered import RecoveredVolume
from vaultsync.replication.follower import Follower, Touched
from vaultsync.replication.heartbeat import Heartbeats
from vaultsync.replication.takeover import take_over
from vaultsync.replication.watch import Watch, unfit_voters
from vaultsync.store.objectstore import ObjectStore, StoreError

log = logging.getLogger("vaultsync.failover")

STATUS_EVERY = 1.0  # seconds between rewrites of failover.json
FOLLOW_EVERY = 1.0  # seconds between a standby's looks for new segments, at most


class Gate:
    """The FUSE adapter's view of the writer's right to acknowledge (fuse/operations.py)."""

    def __init__(self, site: Site, heartbeats: Heartbeats, patience: float) -> None:
        self.site = site
        self.heartbeats = heartbeats
        self.patience = patience

    def is_open(self) -> bool:
        return self.site.role == "writer" and self.heartbeats.is_open()

    async def wait_open(self) -> None:
        deadline = lease_clock() + self.patience
        while True:
            if self.site.role == "fenced":
                raise FsError(errno.EROFS)
            if self.is_open():
                return
            if lease_clock() >= deadline:
                raise FsError(errno.EIO)
            await asyncio.sleep(0.05)


class Site:
    def __init__(
        self, cfg: Config, mountpoint: Path, passphrase: str | None, config_path: Path | None
    ) -> None:
        self.cfg = cfg
        self.mountpoint = mountpoint
        self.passphrase = passphrase
        self.config_path = config_path
        self.me = cfg.site.name
        self.timing = Timing.for_failover_after(cfg.failover.failover_after)
        self.dirs = StateDir(cfg.volume.state_dir)
        self.role = "starting"
        self.reason = ""
        self.since = time.time()
        self.epoch = 0
        self.writer: Writer | None = None
        self.heartbeats: Heartbeats | None = None
        self.watch: Watch | None = None
        self.follower: Follower | None = None
        self.copy_volume: RecoveredVolume | None = None
        self.source: ObjectStore | None = None
        self.voters: list[ObjectStore] = []
        self.data: list[ObjectStore] = []
        self.ops: Any = None
        self.behind = 0  # whole segments the standby's source held beyond its copy, last look
        self.takeover: dict[str, Any] | None = None
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._hooks: set[asyncio.Task[None]] = set()

    # -- role changes --------------------------------------------------------------
    def _become(self, role: str, reason: str) -> None:
        if role != self.role:
            log.warning("ROLE %s -> %s (epoch %d): %s", self.role, role, self.epoch, reason)
        self.role, self.reason, self.since = role, reason, time.time()
        self._write_status()

    def _hook(self, name: str, reason: str) -> None:
        command = (
            self.cfg.failover.on_promote if name == "on_promote" else self.cfg.failover.on_demote
        )
        if command is None:
            return
        task = asyncio.ensure_future(
            run_hook(
                name,
                command,
                site=self.me,
                epoch=self.epoch,
                mountpoint=str(self.mountpoint),
                reason=reason,
                timeout=self.cfg.failover.hook_timeout,
            )
        )
        self._hooks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._hooks.discard)  # type: ignore[arg-type]

    # -- starting --------------------------------------------------------------------
    async def _open_stores(self) -> None:
        every = self.timing.heartbeat_every
        for t in self.cfg.voters:
            self.voters.append(
                await self._stack.enter_async_context(
                    ObjectStore(
                        t, connect_timeout=min(2.0, every), read_timeout=every * 2, max_attempts=1
                    )
                )
            )
        for t in self.cfg.data_targets:
            self.data.append(
                await self._stack.enter_async_context(
                    ObjectStore(t, connect_timeout=3, read_timeout=30, max_attempts=3)
                )
            )
        unfit = await unfit_voters(self.voters)
        if unfit:
            raise MountError(
                f"target(s) {', '.join(unfit)} cannot vote on who writes: their server ignores "
                "conditional creates (If-None-Match), so two sites could both take a lease "
                "there; give them vote = false in [[targets]] (docs/format.md §2.7)"
            )
        if len(self.voters) % 2 == 0:
            log.warning(
                "%d voters: with an even number, a majority is %d and one voter down leaves "
                "none to spare; three voters (or two data targets and a witness) are better",
                len(self.voters),
                majority(len(self.voters)),
            )

    async def _current(self) -> tuple[int, str | None]:
        """The newest epoch leased at the voters this site reaches, and the site its lease
        names (None when none is leased, or it cannot be read)."""

        async def one(store: ObjectStore) -> int | None:
            try:
                return await current_epoch(store)
            except StoreError:
                return None

        while True:
            found = [
                e for e in await asyncio.gather(*(one(v) for v in self.voters)) if e is not None
            ]
            if found:
                break
            log.warning("no voter answers: waiting to learn who writes")
            await asyncio.sleep(self.timing.heartbeat_every)
        epoch = max(found)
        holder = None
        for v in self.voters:
            with contextlib.suppress(StoreError):
                doc = await read_lease(v, epoch)
                if doc is not None:
                    holder = str(doc.get("site") or "")
                    break
        return epoch, holder

    async def _first_role(self) -> str:
        epoch, holder = await self._current()
        self.epoch = epoch
        if not has_volume(self.dirs.root):
            return "standby"
        with read_only(self.dirs.catalog) as cat:
            mine = int(cat.get_meta("epoch") or 0)
        if mine == epoch and (epoch == 0 or holder == self.me):
            return "writer"
        if mine < epoch:
            self.reason = f"site {holder or '?'} holds epoch {epoch}; this site had {mine}"
            return "fenced"
        raise MountError(
            f"this site's journal is of epoch {mine} but the voters say {epoch} "
            f"(held by {holder!r}); two sites named {self.me!r}? Each site needs its own "
            "[site] name"
        )

    # -- the writer ------------------------------------------------------------------
    def _renew(self, epoch: int) -> Heartbeats:
        """Start renewing the heartbeat of `epoch` at every voter."""
        hb = self.heartbeats = Heartbeats(
            self.voters, epoch, self.me, self.timing, on_fenced=self._fenced
        )
        hb.start()
        return hb

    async def _start_writer(self, adopt: FileSystem | None, reason: str) -> None:
        self.writer = w = await Writer.open(self.cfg, self.passphrase, adopt=adopt)
        self.epoch = w.vol.epoch
        hb = self.heartbeats
        if hb is None or hb.epoch != self.epoch:
            hb = self._renew(self.epoch)
        if self.ops is not None:
            self.ops.fs = w.fs
            self.ops.gate = Gate(self, hb, self.cfg.failover.failover_after)
            self.ops.read_only = False
        self._become("writer", reason)

    def _fenced(self, reason: str) -> None:
        if self.role == "taking over":
            self._lost = reason  # another site took a newer epoch meanwhile
            return
        if self.role != "writer":
            return
        w = self.writer
        if w is not None:
            w.repl.fence(reason)
        if self.ops is not None:
            self.ops.read_only = True
        self._become("fenced", reason)
        task = asyncio.ensure_future(self._after_fence(reason))
        self._hooks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._hooks.discard)  # type: ignore[arg-type]

    async def _after_fence(self, reason: str) -> None:
        """Stop renewing, learn the epoch now in force, then tell the applications."""
        if self.heartbeats is not None:
            await self.heartbeats.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timing.heartbeat_every * 4):
                self.epoch, _holder = await self._current()
        self._write_status()
        self._hook("on_demote", reason)

    async def _as_writer(self) -> None:
        w = self.writer
        assert w is not None
        keeper = asyncio.ensure_future(w.housekeeping())
        try:
            while self.role == "writer":
                if w.vol.fenced:
                    self._fenced("a newer lease was found while shipping")
                await asyncio.sleep(0.25)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    # -- the standby ------------------------------------------------------------------
    def _on_applied(self, touched: Touched) -> None:
        if self._invalidator is not None:
            self._invalidator.changed(touched.inodes, touched.entries)

    _invalidator: Any = None
    _lost: str | None = None

    async def _start_standby(self) -> FileSystem:
        self.follower = f = Follower(
            self.dirs.root, self.passphrase, self.cfg.volume.name, on_applied=self._on_applied
        )
        while True:
            for store in self.data:
                try:
                    copy = await f.open(store)
                    self.source = store
                    break
                except (StoreError, VaultsyncError) as e:
                    log.warning("cannot follow the volume from %s yet: %s", store.name, e)
            else:
                await asyncio.sleep(self.timing.heartbeat_every)
                continue
            break
        assert self.source is not None
        self.copy_volume = RecoveredVolume(
            self.dirs.root, copy.rebuilt(), copy.keys, self.source, f.cache
        )
        self.watch = Watch(self.voters, self.timing)
        self._become("standby", self.reason or "this site does not hold the lease")
        return FileSystem(self.copy_volume)

    async def _follow(self) -> None:
        # Segments seal every segment_max_age seconds: looking more often than the
        # heartbeat keeps the standby's view (and a takeover's download) small.
        f, every = self.follower, min(self.timing.heartbeat_every, FOLLOW_EVERY)
        assert f is not None and f.copy is not None
        while True:
            sources = [self.source, *(s for s in self.data if s is not self.source)]
            for store in sources:
                if store is None:
                    continue
                try:
                    await f.step(store)
                    self.source = store
                    if self.copy_volume is not None:
                        self.copy_volume.last_lsn = f.copy.lsn
                    self.behind = 0
                    break
                except StoreError as e:
                    log.debug("following from %s failed: %s", store.name, e)
                except VaultsyncError as e:
                    log.error("the standby's copy cannot follow %s: %s", store.name, e)
            await asyncio.sleep(every)

    async def _enough_sync_targets(self) -> bool:
        """RPO zero (§2.7): with quorum q of s sync targets, every acknowledged fsync is
        at any s - q + 1 of them; a takeover must reach that many."""
        sync = [s for s in self.data if s.target.mode == "sync"]
        if not sync:
            return True
        q = self.cfg.replication.quorum or len(sync)
        need = len(sync) - q + 1

        async def up(store: ObjectStore) -> bool:
            try:
                await store.head("volume.json")
                return True
            except StoreError:
                return False

        reached = sum(await asyncio.gather(*(up(s) for s in sync)))
        if reached < need:
            log.error(
                "the writer looks gone, but only %d of the %d sync target(s) answer and %d are "
                "needed to hold every acknowledged fsync: not taking over yet",
                reached,
                len(sync),
                need,
            )
        return reached >= need

    def _mismatch(self, watch: Watch) -> str | None:
        """Why this site must not take over from the writer it watches, if it must not: a
        writer with this site's own name, or with other voters (another majority)."""
        hb = watch.writer
        if hb is None:
            return None
        if hb.site == self.me:
            return (
                f"the writer's heartbeat names this site ({self.me!r}): two sites share a "
                "[site] name; give each its own"
            )
        mine = sorted(voter_identity(v.target.bucket, v.target.prefix) for v in self.voters)
        if hb.voters and list(hb.voters) != mine:
            return (
                f"the writer counts voters {', '.join(hb.voters)} and this site "
                f"{', '.join(mine)}: every site of a volume needs the same voters"
            )
        return None

    async def _as_standby(self) -> None:
        watch = self.watch
        assert watch is not None and self.follower is not None
        follow = asyncio.ensure_future(self._follow())
        writer = "the writer"
        t0 = time.monotonic()
        try:
            while True:
                await watch.until_gone()
                self.epoch = watch.epoch
                if not await self._enough_sync_targets():
                    await asyncio.sleep(self.timing.heartbeat_every)
                    continue
                writer = watch.writer.site if watch.writer else "the writer"
                wrong = self._mismatch(watch)
                if wrong:
                    log.error("not taking over: %s", wrong)
                    await asyncio.sleep(self.cfg.failover.failover_after)
                    continue
                log.warning(
                    "%s made no heartbeat progress at a majority of voters for %.0fs: "
                    "taking the lease of epoch %d",
                    writer,
                    watch.judged_by.failover_after,
                    watch.epoch + 1,
                )
                t0 = time.monotonic()
                won = await watch.take_lease(self.me, self.source.name if self.source else "")
                if won is None:
                    await asyncio.sleep(self.timing.heartbeat_every)
                    continue
                break
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
        self.epoch = won.epoch
        self._become("taking over", f"won epoch {won.epoch}")
        # Renewing at once: the probation of the first runs (§2.7) passes while the
        # last moments are downloaded and the volume opened, not after.
        self._renew(won.epoch)
        if won.wait:
            log.warning("waiting %.0fs before writing (docs/format.md §2.7)", won.wait)
            await asyncio.sleep(won.wait)
        report = await take_over(self.follower, self.data, won.epoch)
        if self._lost is not None:
            raise VaultsyncError(f"a newer lease appeared while taking over: {self._lost}")
        old_fs = self.ops.fs
        reason = (
            f"took over from {writer} at epoch {won.epoch}: {report.segments} segment(s) and "
            f"{report.tail_bytes} tail byte(s) from {report.source}"
        )
        await self._start_writer(old_fs, reason)
        if self.copy_volume is not None:
            await self.copy_volume.close()
            self.copy_volume = None
        self.takeover = {
            "epoch": won.epoch,
            "seconds": round(time.monotonic() - t0, 3),
            "downloaded_bytes": report.downloaded,
            "source": report.source,
            "from_site": writer,
        }
        log.warning("ROLE writer: %s in %.1fs", reason, time.monotonic() - t0)
        self._hook("on_promote", reason)

    # -- status ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": "auto",
            "site": self.me,
            "role": self.role,
            "epoch": self.epoch,
            "reason": self.reason,
            "since": self.since,
            "failover_after": self.cfg.failover.failover_after,
            "voters": [v.name for v in self.voters],
            "updated_at": time.time(),
        }
        now = lease_clock()
        if self.role == "writer" and self.heartbeats is not None:
            hb = self.heartbeats
            out["writer_site"] = self.me
            out["acknowledging"] = hb.is_open()
            out["heartbeat"] = {
                name: {
                    "renewed_ago": round(now - st.renewed_at, 3) if st.renewed_at > -1e18 else None,
                    "error": st.error,
                }
                for name, st in hb.state.items()
            }
        if self.role in ("standby", "taking over") and self.watch is not None:
            w = self.watch
            out["writer_site"] = w.writer.site if w.writer else None
            out["heartbeat"] = {n: {"quiet_for": round(q, 3)} for n, q in w.quiet_for().items()}
            copy = self.follower.copy if self.follower else None
            if copy is not None:
                out["standby"] = {
                    "lsn": copy.lsn,
                    "segment": copy.segno,
                    "source": self.source.name if self.source else None,
                    "newest_applied_ns": copy.time_ns,
                }
        if self.takeover is not None:
            out["takeover"] = self.takeover
        return out

    def _write_status(self) -> None:
        path = self.dirs.failover_status
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, path)
        except OSError as e:
            log.debug("could not write %s: %s", path, e)

    async def _status_loop(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(STATUS_EVERY)

    # -- the whole life ------------------------------------------------------------------
    async def serve(self) -> None:
        import pyfuse3

        from vaultsync.fuse import loop as fuse_loop
        from vaultsync.fuse.invalidate import Invalidator
        from vaultsync.fuse.operations import Operations

        fuse_loop.enable(self.cfg.mount.busy_poll_us / 1e6)
        if self.cfg.api.enabled:
            log.warning("api.enabled: the embedded API is not served in auto failover mode yet")
        async with self._stack:
            await self._open_stores()
            role = await self._first_role()
            if role == "writer":
                await self._start_writer(None, "this site holds the lease")
                assert self.writer is not None
                fs = self.writer.fs
            elif role == "standby":
                fs = await self._start_standby()
            else:
                vol = await Volume.open(self.dirs.root, self.passphrase)
                vol.fence(self.reason)
                fs = FileSystem(vol)
                self._become("fenced", self.reason)
            self.ops = Operations(
                fs,
                sync_on_close=self.cfg.replication.sync_on_close,
                writeback_cache=self.cfg.mount.writeback_cache,
            )
            self.ops.read_only = self.role != "writer"
            if self.role == "writer" and self.heartbeats is not None:
                self.ops.gate = Gate(self, self.heartbeats, self.cfg.failover.failover_after)
            try:
                init_fuse(self.ops, self.mountpoint, self.cfg.volume.name, read_only=False)
            except RuntimeError as e:
                await self._shutdown()
                raise MountError(f"cannot mount at {self.mountpoint}: {e}") from None
            self._invalidator = Invalidator()
            stop = StopSignal()

            def gc_now() -> None:
                if self.writer is not None:
                    self.writer.repl.gc_now.set()

            async def reload() -> None:
                if self.writer is not None:
                    await self.writer.reload(self.config_path)

            on_signals(stop, gc_now, reload)
            self._tasks.append(asyncio.create_task(self._status_loop(), name="failover-status"))
            self._tasks.append(asyncio.create_task(self._roles(), name="failover-roles"))
            log.info(
                "volume %s mounted at %s as %s", self.cfg.volume.name, self.mountpoint, self.role
            )
            unmounted = False
            try:
                await pyfuse3.main()
                unmounted = not stop.signalled
            finally:
                for t in self._tasks:
                    t.cancel()
                for t in self._tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                unsaved: VaultsyncError | None = None
                try:
                    if self.writer is not None and self.role == "writer":
                        unsaved = await self.writer.save()
                finally:
                    pyfuse3.close(unmount=not unmounted)
                    self._invalidator.stop()
                    await self._shutdown()
                if unsaved is not None:
                    raise unsaved
            log.info("volume %s unmounted from %s", self.cfg.volume.name, self.mountpoint)

    async def _roles(self) -> None:
        try:
            while True:
                if self.role == "writer":
                    await self._as_writer()
                elif self.role == "standby":
                    await self._as_standby()
                else:
                    await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the failover loop failed; this site stays %s", self.role)

    async def _shutdown(self) -> None:
        if self.heartbeats is not None:
            await self.heartbeats.stop()
        if self.writer is not None:
            await self.writer.stop()
        if self.copy_volume is not None:
            await self.copy_volume.close()
        for t in list(self._hooks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, self.cfg.failover.hook_timeout)
        with contextlib.suppress(OSError):
            self.dirs.failover_status.unlink()


def run_site(
    cfg: Config, mountpoint: Path, passphrase: str | None, config_path: Path | None = None
) -> None:
    """`vaultsync mount` in automatic failover: this site's role, kept until unmounted."""
    tame_malloc()
    state_dir = cfg.volume.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    mountpoint = mountpoint.resolve()
    lock = take_lock(state_dir)
    try:
        clean_stale_mount(mountpoint)
        check_mountpoint(mountpoint)
        StateDir(state_dir).pid.write_text(f"{os.getpid()}\n{mountpoint}\n")
        try:
            asyncio.run(Site(cfg, mountpoint, passphrase, config_path).serve())
        finally:
            with contextlib.suppress(OSError):
                StateDir(state_dir).pid.unlink()
    finally:
        lock.close()

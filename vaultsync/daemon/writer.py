"""The writer's mount daemon: the volume, its replication, the FUSE mount and the API, wired.

`vaultsync mount CONFIG MOUNTPOINT` runs run_mount() in the foreground (with
--daemon, in a child process that process.start_daemon() starts). It holds the
state directory's lock for its whole life, serves until unmounted or
signalled, and then flushes, ships and checkpoints before it lets go.

Signals: SIGTERM and SIGINT unmount; SIGHUP re-reads the config's targets
(`vaultsync targets add|remove`, `migrate`); SIGUSR1 runs GC now (`vaultsync
gc` on a mounted volume).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vaultsync.config import Config, load_config
from vaultsync.daemon.memory import tame_malloc
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.state_lock import take_lock
from vaultsync.engine.volume import Volume, has_volume
from vaultsync.errors import VaultsyncError
from vaultsync.format.state_layout import StateDir
from vaultsync.fuse.mount import (
    MountError,
    StopSignal,
    check_mountpoint,
    clean_stale_mount,
    init_fuse,
)
from vaultsync.quietlog import Throttled
from vaultsync.replication.replicator import Replicator

log = logging.getLogger("vaultsync.mount")


@dataclass
class Writer:
    """The writer's parts, opened together and closed in the order that saves everything."""

    cfg: Config
    vol: Volume
    repl: Replicator
    fs: FileSystem
    failing: Throttled

    @classmethod
    async def open(
        cls, cfg: Config, passphrase: str | None, adopt: FileSystem | None = None
    ) -> Writer:
        """Open the volume and start shipping; `adopt`: the FileSystem this one replaces on
        the same mount (a standby taking over), whose kernel references it keeps."""
        v = cfg.volume
        vol = await Volume.open(
            v.state_dir, passphrase, segment_size=v.segment_size, segment_max_age=v.segment_max_age
        )
        repl = Replicator(cfg, vol)
        try:
            await repl.start()
        except BaseException:
            await repl.stop()
            await vol.close()
            raise
        fs = FileSystem(vol)
        if adopt is not None:
            fs.adopt(adopt)
        dropped = fs.drop_orphans()
        if dropped:
            log.info("dropped %d unlinked file(s) left open by a previous process", dropped)
        return cls(cfg, vol, repl, fs, Throttled(log))

    async def housekeeping(self) -> None:
        """Commit what writers left in buffers, seal segments by age: every quarter second."""
        while True:
            await asyncio.sleep(0.25)
            try:
                await self.fs.flush_old()
                await self.vol.maybe_seal()
            except OSError as e:  # a full disk: retried every round, reported now and then
                self.failing.warning("background flush failed, retrying: %s", e)
            except Exception:
                log.exception("background flush failed")

    async def reload(self, config_path: Path | None) -> None:
        """SIGHUP: re-read the config's targets (`vaultsync targets add|remove`)."""
        if config_path is None:
            log.warning("SIGHUP ignored: this mount was not started from a config file")
            return
        try:
            new_cfg = load_config(config_path)
            added, removed = await self.repl.reload(new_cfg)
        except Exception as e:
            log.error(
                "reloading targets from %s failed, keeping the current ones: %s", config_path, e
            )
            return
        log.info(
            "targets reloaded from %s: added %s, removed %s",
            config_path,
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )

    async def save(self) -> VaultsyncError | None:
        """Flush, seal, ship and checkpoint; the error that kept changes unsaved (a full
        disk), which the caller raises once the mount is gone. `stop` follows, always."""
        unsaved: VaultsyncError | None = None
        try:
            await self.fs.flush_all()
        except VaultsyncError as e:  # a full disk: ship what was saved all the same
            log.error("%s", e)
            unsaved = e
        try:
            # The kernel has let go of everything: unlinked-but-referenced inodes go.
            self.fs.drop_orphans()
            await self.vol.maybe_seal(force=True)
        except OSError as e:
            # No room to record it: the next mount drops the orphans and seals.
            log.error("could not seal the journal at unmount (%s); the next mount does", e)
        except VaultsyncError as e:  # fenced: nothing more is written or shipped
            log.info("%s", e)
        await self.repl.drain()
        # After the final shipping: recovery from each target then replays nothing.
        await self.repl.final_checkpoint()
        return unsaved

    async def stop(self) -> None:
        await self.repl.stop()
        await self.vol.close()


def on_signals(
    stop: StopSignal, gc_now: Callable[[], object], reload: Callable[[], Awaitable[None]]
) -> None:
    """SIGTERM/SIGINT unmount, SIGUSR1 runs GC, SIGHUP reloads the targets."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGUSR1, gc_now)  # `vaultsync gc`, mounted
    reloads: set[asyncio.Future[None]] = set()

    def on_hup() -> None:
        task = asyncio.ensure_future(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)


async def _serve(
    cfg: Config,
    mountpoint: Path,
    passphrase: str | None,
    ready: asyncio.Event | None,
    config_path: Path | None = None,
) -> None:
    import pyfuse3

    from vaultsync.fuse import loop as fuse_loop
    from vaultsync.fuse.operations import Operations

    fuse_loop.enable(cfg.mount.busy_poll_us / 1e6)
    v = cfg.volume
    w = await Writer.open(cfg, passphrase)
    ops = Operations(
        w.fs,
        sync_on_close=cfg.replication.sync_on_close,
        writeback_cache=cfg.mount.writeback_cache,
    )
    try:
        init_fuse(ops, mountpoint, v.name, read_only=False)
    except RuntimeError as e:
        await w.stop()
        raise MountError(f"cannot mount at {mountpoint}: {e}") from None
    stop = StopSignal()
    on_signals(stop, w.repl.gc_now.set, lambda: w.reload(config_path))
    keeper = asyncio.ensure_future(w.housekeeping())
    api = None
    if cfg.api.enabled:  # the REST API on this same event loop, reading the live FileSystem
        from vaultsync.api.server import start_embedded

        try:
            api = await start_embedded(cfg, w.fs, passphrase)
        except BaseException:
            keeper.cancel()
            pyfuse3.close(unmount=True)
            await w.stop()
            raise
    log.info("volume %s mounted at %s", v.name, mountpoint)
    if ready is not None:
        ready.set()
    unmounted = False
    try:
        await pyfuse3.main()
        unmounted = not stop.signalled  # else the mount is still there: close() unmounts
    finally:
        if api is not None:
            await api.stop()
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        try:
            unsaved = await w.save()
        finally:
            pyfuse3.close(unmount=not unmounted)
            await w.stop()
        if unsaved is not None:
            raise unsaved
        log.info("volume %s unmounted from %s; everything flushed", v.name, mountpoint)


def run_mount(
    cfg: Config, mountpoint: Path, passphrase: str | None, config_path: Path | None = None
) -> None:
    """Mount in the foreground until unmounted or signalled."""
    tame_malloc()
    state_dir = cfg.volume.state_dir
    if not has_volume(state_dir):
        raise MountError(f"{state_dir} holds no volume; run `vaultsync init CONFIG` first")
    mountpoint = mountpoint.resolve()
    lock = take_lock(state_dir)
    try:
        clean_stale_mount(mountpoint)
        check_mountpoint(mountpoint)
        StateDir(state_dir).pid.write_text(f"{os.getpid()}\n{mountpoint}\n")
        try:
            asyncio.run(_serve(cfg, mountpoint, passphrase, None, config_path))
        finally:
            with contextlib.suppress(OSError):
                StateDir(state_dir).pid.unlink()
    finally:
        lock.close()

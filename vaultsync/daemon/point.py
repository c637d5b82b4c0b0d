"""The read-only mount daemon: a volume as of a past point, rebuilt from one target.

`vaultsync mount CONFIG MOUNTPOINT --from TARGET [--at POINT]` runs
run_point_mount(): it needs nothing local but the config, keeps its segment
cache in a temporary directory, and removes it when unmounted. SIGTERM,
SIGINT and SIGHUP unmount.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from vaultsync.config import Config
from vaultsync.daemon.memory import tame_malloc
from vaultsync.engine.filesystem import FileSystem
from vaultsync.fuse.mount import (
    MountError,
    StopSignal,
    check_mountpoint,
    clean_stale_mount,
    init_fuse,
)

log = logging.getLogger("vaultsync.mount")


async def _serve_point(
    cfg: Config,
    target: str,
    point_text: str | None,
    mountpoint: Path,
    passphrase: str | None,
    cache_dir: Path,
    cache_limit: int,
) -> None:
    """Rebuild the volume as of a point from one target and serve it read-only."""
    import pyfuse3

    from vaultsync.fuse import loop as fuse_loop
    from vaultsync.fuse.operations import Operations
    from vaultsync.points.recovered import RecoveredVolume
    from vaultsync.points.recovery import SegmentCache, parse_point, rebuild
    from vaultsync.store.objectstore import ObjectStore

    fuse_loop.enable(cfg.mount.busy_poll_us / 1e6)
    point = parse_point(point_text)
    t0 = time.monotonic()
    async with ObjectStore(cfg.target(target)) as store:
        cache = SegmentCache(cache_dir / "segments", cache_limit)
        rebuilt, keys = await rebuild(
            store,
            cache_dir,
            passphrase,
            point,
            cache,
            durable=False,
            volume_name=cfg.volume.name,
        )
        vol = RecoveredVolume(cache_dir, rebuilt, keys, store, cache)
        log.info(
            "rebuilt %s from target %s as of %s (LSN %d) in %.1fs%s",
            cfg.volume.name,
            target,
            point.describe(),
            rebuilt.lsn,
            time.monotonic() - t0,
            f", from checkpoint {rebuilt.checkpoint}" if rebuilt.checkpoint else "",
        )
        fs = FileSystem(vol)
        ops = Operations(fs)
        try:
            init_fuse(ops, mountpoint, cfg.volume.name, read_only=True)
        except RuntimeError as e:
            await vol.close()
            raise MountError(f"cannot mount at {mountpoint}: {e}") from None
        loop = asyncio.get_running_loop()
        stop = StopSignal()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop)
        unmounted = False
        try:
            await pyfuse3.main()
            unmounted = not stop.signalled
        finally:
            pyfuse3.close(unmount=not unmounted)
            await vol.close()


def run_point_mount(
    cfg: Config,
    target: str,
    point_text: str | None,
    mountpoint: Path,
    passphrase: str | None,
    cache_limit: int = 2 << 30,
    pid_file: Path | None = None,
) -> None:
    """`mount --from TARGET --at POINT`: read-only, needs nothing local but the config.

    With `pid_file`, writes "PID\nMOUNTPOINT" there (as the writer's mount.pid)
    for the life of the mount, so scripts and `umount` can find the process.
    """
    import shutil
    import tempfile

    tame_malloc()
    mountpoint = mountpoint.resolve()
    clean_stale_mount(mountpoint)
    check_mountpoint(mountpoint)
    cache_dir = Path(tempfile.mkdtemp(prefix="vaultsync-point-"))
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n{mountpoint}\n")
    try:
        asyncio.run(
            _serve_point(cfg, target, point_text, mountpoint, passphrase, cache_dir, cache_limit)
        )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        if pid_file is not None:
            with contextlib.suppress(OSError):
                if pid_file.read_text().split()[0] == str(os.getpid()):
                    pid_file.unlink()

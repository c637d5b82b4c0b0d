"""Mount lifecycle: lock, stale-mount cleanup, the FUSE loop, signals, daemon mode.

One process owns a state directory at a time: `mount.lock` is held with
flock() for the life of the mount (the kernel drops it when the process dies,
so a kill -9 never leaves a lock that blocks the next mount). `mount.pid`
names the owner for `umount` and `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from vaultsync.config import Config
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.volume import Volume, has_volume
from vaultsync.errors import OUT_OF_SPACE, VaultsyncError
from vaultsync.format.state_layout import StateDir
from vaultsync.quietlog import Throttled

if TYPE_CHECKING:
    from vaultsync.fuse.operations import Operations

log = logging.getLogger("vaultsync.mount")


class MountError(VaultsyncError):
    pass


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounted_at(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at `mountpoint`, if any (from mountinfo)."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) > 4 and _unescape(parts[4]) == target:
                found = right.split()[0]
    return found


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        for d in [*os.environ.get("PATH", "/usr/bin:/bin").split(":"), "/usr/bin", "/bin"]:
            p = os.path.join(d, name)
            if os.access(p, os.X_OK):
                return p
    raise MountError("fusermount3 not found; install the fuse3 package (apt-get install fuse3)")


def lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(
        [_fusermount(), "-u", "-z", str(mountpoint)],
        check=False,
        capture_output=True,
        timeout=30,
    )


def clean_stale_mount(mountpoint: Path) -> bool:
    """A FUSE mount whose daemon died answers ENOTCONN: detach it. True if one was cleaned."""
    if mounted_at(mountpoint) is None:
        return False
    try:
        os.stat(mountpoint)
        return False  # alive: someone serves it
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            raise
    log.warning("cleaning up a stale mount at %s left by a dead process", mountpoint)
    lazy_unmount(mountpoint)
    return True


def take_lock(state_dir: Path) -> IO[str]:
    """Hold the state directory for this process, or say who holds it."""
    f = open(StateDir(state_dir).lock, "a+")  # noqa: SIM115 - held for the whole mount
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        pid = read_pid(state_dir)
        who = f" by process {pid}" if pid else ""
        raise MountError(
            f"the volume in {state_dir} is already mounted{who}; "
            "unmount it first (vaultsync umount MOUNTPOINT)"
        ) from None
    return f


def read_pid(state_dir: Path) -> int | None:
    try:
        text = StateDir(state_dir).pid.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise MountError(f"mount point {mountpoint} does not exist; create it with mkdir")
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory")
    if mounted_at(mountpoint) is not None:
        raise MountError(
            f"something is already mounted at {mountpoint}; unmount it or choose another directory"
        )


def _fuse_options(name: str, *, read_only: bool) -> set[str]:
    """Mounted by root, the volume serves every user with the kernel's permission checks."""
    options = {"fsname=vaultsync", f"subtype=vaultsync.{name}", "default_permissions"}
    if read_only:
        options.add("ro")
    if os.getuid() == 0:
        options.add("allow_other")
    return options


# The kernel's read-ahead for a FUSE mount starts at 128 KiB, so a sequential reader
# is served in 128 KiB requests, each a full round trip through this process. With
# 1 MiB the kernel asks for up to 1 MiB at once (max_pages allows it).
READ_AHEAD_KB = 1024


def _init_fuse(ops: Operations, mountpoint: Path, name: str, *, read_only: bool) -> None:
    """Mount (pyfuse3.init; RuntimeError if the kernel refuses), then tune the mount."""
    import pyfuse3

    # Resolved first: once mounted, any lookup of the mountpoint (realpath's lstat,
    # stat) waits for this process, which does not answer requests yet.
    target = os.path.realpath(mountpoint)
    pyfuse3.init(ops, str(mountpoint), _fuse_options(name, read_only=read_only))
    threading.Thread(
        target=_raise_read_ahead, args=(target,), name="read-ahead", daemon=True
    ).start()


def _raise_read_ahead(target: str) -> None:
    """Best effort (needs root): the mount works the same, only slower, without it.

    Runs in a thread: its stat() of the mountpoint returns only once the event
    loop serves requests, which is after the kernel's INIT, and INIT sets the
    read-ahead back to at most what it negotiated. Only then does a raise stick.
    """
    try:
        dev = os.stat(target).st_dev
        ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        ra.write_text(f"{READ_AHEAD_KB}\n")
    except OSError as e:
        log.debug("read-ahead left at the kernel's default for %s: %s", target, e)


class _Stop:
    """A signal handler that ends the FUSE loop and remembers it did.

    pyfuse3.main() returns the same way after the kernel unmounted us (umount,
    fusermount) and after pyfuse3.terminate(); only in the second case is the
    mount still there for close() to remove. (Looking at the mount point to find
    out would be a request to this very filesystem, whose loop just ended.)
    """

    signalled = False

    def __call__(self) -> None:
        import pyfuse3

        self.signalled = True
        pyfuse3.terminate()


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
    vol = await Volume.open(
        v.state_dir, passphrase, segment_size=v.segment_size, segment_max_age=v.segment_max_age
    )
    from vaultsync.replication.replicator import Replicator

    repl = Replicator(cfg, vol)
    try:
        await repl.start()
    except BaseException:
        await repl.stop()
        await vol.close()
        raise
    fs = FileSystem(vol)
    dropped = fs.drop_orphans()
    if dropped:
        log.info("dropped %d unlinked file(s) left open by a previous process", dropped)
    ops = Operations(
        fs,
        sync_on_close=cfg.replication.sync_on_close,
        writeback_cache=cfg.mount.writeback_cache,
    )
    try:
        _init_fuse(ops, mountpoint, v.name, read_only=False)
    except RuntimeError as e:
        await repl.stop()
        await vol.close()
        raise MountError(f"cannot mount at {mountpoint}: {e}") from None
    loop = asyncio.get_running_loop()
    stop = _Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGUSR1, repl.gc_now.set)  # `vaultsync gc`, mounted
    reloads: set[asyncio.Future[None]] = set()

    async def reload_targets() -> None:
        """SIGHUP: re-read the config's targets (`vaultsync targets add|remove`)."""
        from vaultsync.config import load_config

        if config_path is None:
            log.warning("SIGHUP ignored: this mount was not started from a config file")
            return
        try:
            new_cfg = load_config(config_path)
            added, removed = await repl.reload(new_cfg)
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

    def on_hup() -> None:
        task = asyncio.ensure_future(reload_targets())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    failing = Throttled(log)

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                await fs.flush_old()
                await vol.maybe_seal()
            except OSError as e:  # a full disk: retried every round, reported now and then
                failing.warning("background flush failed, retrying: %s", e)
            except Exception:
                log.exception("background flush failed")

    keeper = asyncio.ensure_future(housekeeping())
    api = None
    if cfg.api.enabled:  # the REST API on this same event loop, reading the live FileSystem
        from vaultsync.api.server import start_embedded

        try:
            api = await start_embedded(cfg, fs, passphrase)
        except BaseException:
            keeper.cancel()
            pyfuse3.close(unmount=True)
            await repl.stop()
            await vol.close()
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
        unsaved: VaultsyncError | None = None
        try:
            try:
                await fs.flush_all()
            except VaultsyncError as e:  # a full disk: ship what was saved all the same
                log.error("%s", e)
                unsaved = e
            try:
                # The kernel has let go of everything: unlinked-but-referenced inodes go.
                fs.drop_orphans()
                await vol.maybe_seal(force=True)
            except OSError as e:
                # No room to record it: the next mount drops the orphans and seals.
                log.error("could not seal the journal at unmount (%s); the next mount does", e)
            await repl.drain()
            # After the final shipping: recovery from each target then replays nothing.
            await repl.final_checkpoint()
        finally:
            pyfuse3.close(unmount=not unmounted)
            await repl.stop()
            await vol.close()
        if unsaved is not None:
            raise unsaved
        log.info("volume %s unmounted from %s; everything flushed", v.name, mountpoint)


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
    from vaultsync.points.recovery import RecoveredVolume, SegmentCache, parse_point, rebuild
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
        fs = FileSystem(vol)  # type: ignore[arg-type]
        ops = Operations(fs)
        try:
            _init_fuse(ops, mountpoint, cfg.volume.name, read_only=True)
        except RuntimeError as e:
            await vol.close()
            raise MountError(f"cannot mount at {mountpoint}: {e}") from None
        loop = asyncio.get_running_loop()
        stop = _Stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop)
        unmounted = False
        try:
            await pyfuse3.main()
            unmounted = not stop.signalled
        finally:
            pyfuse3.close(unmount=not unmounted)
            await vol.close()


def point_runtime_file(mountpoint: Path, suffix: str) -> Path:
    """Default log or PID file of a point-in-time mount daemon: it has no state
    directory, so a file in the temp directory named after the mount point."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"vaultsync-point-{digest}.{suffix}"


# glibc's malloc keeps memory it was given back when it can reuse it: after a freed
# buffer of a segment's size it serves every allocation below that size from its
# heaps (the threshold adapts up to 32 MiB), and each worker thread gets a heap of
# its own. A daemon that briefly holds a segment or a flush batch then stays that
# big. Fixed: allocations of 4 MiB or more are mapped, and unmapped when freed;
# two heaps for all threads. Smaller buffers (FUSE requests of 1 MiB) still reuse heap.
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def _tame_malloc() -> None:
    """Best effort: only glibc has mallopt, and the daemon works the same without it."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError) as e:
        log.debug("malloc left as it is: %s", e)


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

    _tame_malloc()
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


def run_mount(
    cfg: Config, mountpoint: Path, passphrase: str | None, config_path: Path | None = None
) -> None:
    """Mount in the foreground until unmounted or signalled."""
    _tame_malloc()
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


def start_daemon(
    config_path: Path,
    mountpoint: Path,
    log_file: Path,
    timeout: float = 60,
    extra_args: list[str] | None = None,
) -> int:
    """Start the mount as a background process; return its PID once the mount answers.

    `extra_args` go between the config and the mount point (which stays last on
    the command line: that is how `umount` finds the daemon to wait for).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "vaultsync", "mount", str(config_path), *(extra_args or [])]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            [*args, str(mountpoint.resolve())],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
            raise MountError(
                f"the mount process exited with code {proc.returncode}: "
                + (" | ".join(tail) or f"see {log_file}")
            )
        if mounted_at(mountpoint) is not None:
            try:
                os.stat(mountpoint)
                return proc.pid
            except OSError:
                pass
        time.sleep(0.05)
    proc.terminate()
    raise MountError(f"the mount did not come up within {timeout:.0f}s; see {log_file}")


def _daemon_pids(mountpoint: Path) -> list[int]:
    """Processes running `vaultsync mount ... MOUNTPOINT` (how umount finds whom to wait for)."""
    me, want = os.getpid(), str(mountpoint)
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if "mount" in args and any("vaultsync" in a for a in args[:3]):
            # The mount point is the last argument, or (`mount CONFIG MNT --from T`)
            # the one after the config.
            after = args[args.index("mount") + 1 :]
            with contextlib.suppress(OSError):
                if any(os.path.realpath(a) == want for a in [*after[1:2], *after[-1:]]):
                    out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a daemon whose parent has not reaped it has finished)."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] != "Z"


def unmount(mountpoint: Path, timeout: float = 120, force: bool = False) -> None:
    """Flush, unmount, and wait for the daemon to finish and exit.

    When the daemon cannot save what it buffers (its disk is full), nothing is
    unmounted unless `force`: the operator can free space and retry, losing nothing.
    """
    import pyfuse3

    mountpoint = mountpoint.resolve()
    fstype = mounted_at(mountpoint)
    if fstype is None:
        raise MountError(f"nothing is mounted at {mountpoint}")
    if not fstype.startswith("fuse.vaultsync"):
        raise MountError(f"{mountpoint} is a {fstype} mount, not vaultsync; not touching it")
    pids = _daemon_pids(mountpoint)
    try:
        pyfuse3.syncfs(str(mountpoint))  # the kernel's cached writes, to the daemon
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # the daemon's buffers, to the journal (fsyncdir on the root)
        finally:
            os.close(fd)
    except OSError as e:
        # EROFS and the like: nothing to save (a point-in-time mount). These mean loss:
        if not force and e.errno in (*OUT_OF_SPACE, errno.EIO):
            raise MountError(
                f"the daemon could not save the changes it holds ({e.strerror}); "
                f"{mountpoint} stays mounted and nothing was lost. Its log says why (a full "
                "disk under the state directory, say): fix that and run umount again, or "
                "`vaultsync umount --force` to unmount and give up the changes no fsync saved"
            ) from None
    res = subprocess.run(
        [_fusermount(), "-u", str(mountpoint)], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "unknown error"
        raise MountError(f"cannot unmount {mountpoint}: {msg}; close files open there and retry")
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            if not _running(pid):
                break
            time.sleep(0.05)
        else:
            raise MountError(
                f"unmounted, but the daemon (pid {pid}) is still flushing after {timeout:.0f}s"
            )


def signal_reload(state_dir: Path) -> int | None:
    """Ask the mount daemon of `state_dir` to reload its targets; its PID, or None if none runs.

    The daemon holds `mount.lock` for its whole life, so a free lock means no
    daemon, whatever a stale `mount.pid` says.
    """
    try:
        f = open(StateDir(state_dir).lock)  # noqa: SIM115 - closed below
    except OSError:
        return None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_pid(state_dir)
            if pid is None or not _running(pid):
                return None
            os.kill(pid, signal.SIGHUP)
            return pid
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
    finally:
        f.close()

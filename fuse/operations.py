"""pyfuse3 glue: requests in, `FileSystem` calls, attributes and errnos out.

Nothing here decides semantics; that is `vaultsync.engine.filesystem`. File handles
are the inode number: every open file of one inode shares one buffer, which is
what makes reads see writes made through another descriptor.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3

from vaultsync.engine.catalog import Inode
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.posix import FsError, without_privs
from vaultsync.errors import OUT_OF_SPACE, ReadOnlyVolumeError, VaultsyncError
from vaultsync.fuse.loop import running
from vaultsync.quietlog import Throttled

log = logging.getLogger("vaultsync.fuse")
full = Throttled(log)

P = ParamSpec("P")
R = TypeVar("R")

# The daemon is the only writer, so the kernel may cache what we told it.
ATTR_TIMEOUT = 30.0
ENTRY_TIMEOUT = 30.0


def _errors(
    fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """FsError becomes its errno, a full disk ENOSPC; anything else is a bug, logged, and EIO
    for the caller."""

    @wraps(fn)
    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        running.count += 1
        try:
            if self.fs.cat.stale:
                # The catalog lost changes the journal has (a full disk): any answer
                # could be stale. The next mount replays them.
                full.warning("%s refused: the catalog must be rebuilt; remount", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO)
            return await fn(self, *args, **kwargs)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except VaultsyncError as e:  # e.g. fenced, or the journal's disk failed
            log.error("%s: %s", fn.__name__, e)
            ro = isinstance(e, ReadOnlyVolumeError)
            raise pyfuse3.FUSEError(errno.EROFS if ro else errno.EIO) from None
        except OSError as e:
            if e.errno not in OUT_OF_SPACE:
                log.exception("%s failed", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            # The application is told what ext4 would tell it; what was fsynced is safe.
            full.warning("%s: %s: the state directory's disk is full", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            running.count -= 1

    return wrapper


class AckGate(Protocol):
    """The writer's right to acknowledge (automatic failover, docs/format.md §2.7)."""

    def is_open(self) -> bool: ...

    async def wait_open(self) -> None:
        """Return once acknowledging is allowed again; FsError(EROFS) once another site
        writes, FsError(EIO) when it stays closed too long."""


def _changes(
    fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """A request that changes the volume, or reports a change as stored.

    Refused on a read-only mount (a standby, a fenced writer). Under automatic
    failover it waits for the gate before it starts and again before it
    answers: INVARIANT (§2.7) no success reaches the kernel while this writer
    holds fewer than a majority of the voters. A change that was made and then
    finds the gate shut is answered with an error; it stays in the journal.
    """

    @wraps(fn)
    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.read_only:
            raise FsError(errno.EROFS)
        gate = self.gate
        if gate is not None and not gate.is_open():
            await gate.wait_open()
        result = await fn(self, *args, **kwargs)
        if gate is not None and not gate.is_open():
            await gate.wait_open()
        return result

    return wrapper


class Operations(pyfuse3.Operations):  # type: ignore[misc]
    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(
        self, fs: FileSystem, sync_on_close: bool = False, writeback_cache: bool = True
    ) -> None:
        super().__init__()
        self.fs = fs
        # A standby serves the volume read-only until it takes over; a fenced writer
        # from then on. Either way the mount stays, and open files stay valid.
        self.read_only = False
        self.gate: AckGate | None = None
        self.sync_on_close = sync_on_close
        self.enable_writeback_cache = writeback_cache  # pyfuse3 reads it at init
        # The writeback cache makes the kernel the owner of regular files' mtime/ctime.
        fs.kernel_cmtime = self.enable_writeback_cache

    def attrs(self, i: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = i.ino
        e.generation = 0
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = i.mode
        e.st_nlink = i.nlink
        e.st_uid = i.uid
        e.st_gid = i.gid
        e.st_rdev = i.rdev
        e.st_size = i.size
        e.st_blksize = 4096
        e.st_blocks = (i.size + 511) // 512
        e.st_atime_ns = i.atime_ns
        e.st_mtime_ns = i.mtime_ns
        e.st_ctime_ns = i.ctime_ns
        return e

    # -- names ------------------------------------------------------------------------
    def entry(self, i: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a reference (its lookup count)."""
        self.fs.remember(i.ino)
        return self.attrs(i)

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self.entry(self.fs.lookup(parent_inode, name))

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self.attrs(self.fs.getattr(inode))

    @_errors
    @_changes
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        # chown(f, -1, -1) reaches us as a SETATTR with nothing in it (the kernel
        # sends ctime only when it owns the times): Linux still stamps ctime.
        empty = not any(
            getattr(fields, f"update_{k}")
            for k in ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")
        )
        now = time.time_ns() if empty else None
        i = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else now,
        )
        return self.attrs(i)

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        target = self.fs.readlink(inode)
        self.fs.touch_atime(inode)  # following a link reads it: relatime, as ext4
        return target

    @_errors
    @_changes
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        return self.entry(self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_errors
    @_changes
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self.entry(self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errors
    @_changes
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.unlink(parent_inode, name)

    @_errors
    @_changes
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.rmdir(parent_inode, name)

    @_errors
    @_changes
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return self.entry(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errors
    @_changes
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(
            parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx.uid, ctx.gid
        )

    @_errors
    @_changes
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        return self.entry(self.fs.link(inode, new_parent_inode, new_name))

    # -- files ----------------------------------------------------------------------------
    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if flags & (os.O_ACCMODE | os.O_TRUNC) != os.O_RDONLY:
            return await self._open_to_write(inode, flags, ctx)
        self.fs.open(inode)
        return pyfuse3.FileInfo(fh=inode)

    @_changes
    async def _open_to_write(self, inode: int, flags: int, ctx: Any) -> Any:
        i = self.fs.open(inode)
        if flags & os.O_TRUNC:  # stamps mtime and ctime even when already empty, as ext4
            # By anyone but root it also drops setuid/setgid, as truncate() does: with
            # atomic O_TRUNC the kernel sends no SETATTR of its own, so that is ours to do.
            mode = without_privs(i.mode) if ctx.uid != 0 and stat.S_ISREG(i.mode) else i.mode
            await self.fs.setattr(inode, size=0, mode=mode if mode != i.mode else None)
        return pyfuse3.FileInfo(fh=inode)

    @_errors
    @_changes
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        i = self.fs.mknod(parent_inode, name, stat.S_IFREG | (mode & 0o7777), 0, ctx.uid, ctx.gid)
        self.fs.open(i.ino)
        return pyfuse3.FileInfo(fh=i.ino), self.entry(i)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = await self.fs.read(fh, off, size)
        self.fs.touch_atime(fh)
        return data

    @_errors
    @_changes
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_errors
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)
        if self.sync_on_close:  # replication.sync_on_close: close() waits as fsync does
            await self.fs.vol.sync()
            if self.gate is not None and not self.gate.is_open():
                await self.gate.wait_open()
            return
        # Nothing else needs close() to wait for us: release (the last close) commits
        # the buffer, and the flush timer a file kept open elsewhere. ENOSYS, answered
        # once this close's data is committed, makes the kernel stop sending FLUSH on
        # this mount: one round trip less on every close (a create-write-fsync-close
        # is eight of them).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_errors
    @_changes
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    # -- directories ------------------------------------------------------------------------
    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        i = self.fs.getattr(inode)
        if not stat.S_ISDIR(i.mode):
            raise FsError(errno.ENOTDIR)
        return inode

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        self.fs.touch_atime(fh)  # listing reads the directory: relatime, as ext4
        offset = start_id
        while True:
            entries = self.fs.readdir(fh, offset)
            if not entries:
                return
            for name, i, next_off in entries:
                if not pyfuse3.readdir_reply(token, name, self.attrs(i), next_off):
                    return
                if name not in (b".", b".."):  # readdirplus: the kernel now holds it
                    self.fs.remember(i.ino)
                offset = next_off

    @_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if fh == pyfuse3.ROOT_INODE:
            await self.fs.flush_all()  # `vaultsync umount` uses this to drain the buffers
        else:
            await self.fs.sync_dir()
        if self.gate is not None and not self.gate.is_open():
            await self.gate.wait_open()

    # -- the rest --------------------------------------------------------------------------
    @_errors
    async def statfs(self, ctx: Any) -> Any:
        s = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s["bsize"]
        out.f_frsize = s["frsize"]
        out.f_blocks = s["blocks"]
        out.f_bfree = s["bfree"]
        out.f_bavail = s["bavail"]
        out.f_files = s["files"]
        out.f_ffree = s["ffree"]
        out.f_favail = s["favail"]
        out.f_namemax = s["namemax"]
        return out

    @_errors
    @_changes
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.fs.setxattr(inode, name, value)

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.fs.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.fs.listxattr(inode, privileged=ctx.uid == 0)

    @_errors
    @_changes
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.fs.removexattr(inode, name)

    async def forget(self, inode_list: Any) -> None:
        # Must not raise: no request to answer. An unlinked inode the kernel no longer
        # knows (and nobody has open) is dropped here.
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, n)

"""POSIX semantics over the volume: what the FUSE adapter asks, answered with errnos.

This module knows nothing of pyfuse3; `fuse/operations.py` translates. It is
the namespace: inodes and their attributes, directory entries, extended
attributes, and which inodes are open or known to the kernel. Every namespace
change is one transaction, committed at once (not durable until an fsync).

File contents are the layers under `FileSystem`: filewrites.py (the
`filedata.FileData` write buffers, committed on flush, fsync, close, a timer,
or memory pressure) over filereads.py (read, stream, read-ahead, the chunk
cache); posix.py holds the errno exception and the limits all three use.
They are base classes of the one `FileSystem`, not objects it holds: a
request reaches its method with no hop through another object, and all
share the state set in `__init__`.

Invariants kept here:

- Every inode in the catalog with nlink > 0 is named by at least one entry;
  an inode with nlink == 0 (a file or directory removed while in use) exists
  only while it is open (`_open`) or the kernel still knows it (`_lookups`, the
  FUSE lookup count), and is dropped when both are gone, or at the next mount
  if the process died. An open directory or a process's removed cwd must still
  answer fstat, as on any Linux filesystem.
- A directory's nlink is 2 plus its number of subdirectories.
- Catalog attributes plus the dirty overlay in `FileData` are the truth for
  getattr: size and times of a file with unflushed writes live in its buffer.
- Inode numbers are never reused (`_next_ino` only grows), so a kernel holding
  a stale inode number can never reach a different file.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
import weakref
from dataclasses import replace

from vaultsync.engine.catalog import Inode
from vaultsync.engine.filedata import FileData
from vaultsync.engine.filereads import ChunkCache
from vaultsync.engine.filewrites import FileWrites
from vaultsync.engine.posix import (
    DOT_OFFSETS,
    MAX_FILE_SIZE,
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    XATTR_CREATE,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    FsError,
    check_name,
    check_xattr_name,
    clamp_time,
    set_inode,
)
from vaultsync.engine.served import ServedVolume
from vaultsync.engine.volume import catalog_reserve
from vaultsync.format.txn import ROOT_INO, DropDirent, DropInode, Op, SetDirent, SetXattr


class FileSystem(FileWrites):
    """The one object the FUSE adapter, the API, restore and salvage use."""

    def __init__(
        self,
        vol: ServedVolume,
        *,
        dirty_limit: int = 64 << 20,
        cache_limit: int = 64 << 20,
        flush_after: float = 1.0,
        flush_bytes: int = 8 << 20,
    ) -> None:
        self.vol = vol
        # A file with this much unflushed data is flushed at once, not after
        # `flush_after`: steady writers then reach the journal (and targets) promptly.
        self.flush_bytes = flush_bytes
        self._background: set[asyncio.Future[None]] = set()
        # Closed files whose buffers are still to be committed (insertion-ordered), and
        # whether a task to commit them is under way (see release).
        self._closed: dict[int, None] = {}
        self._closed_task = False
        # One commit_closed() at a time: one that returns has seen every earlier one's
        # files committed (a rename relies on it), not merely taken.
        self._closed_lock = asyncio.Lock()
        self._read_end: dict[int, int] = {}  # ino -> where the last read ended
        # chunk id -> done when the fetch bringing it into the cache ends (_warm)
        self._fetching: dict[bytes, asyncio.Future[None]] = {}
        self._prefetching: set[int] = set()
        self.cat = vol.catalog
        self.block_size = vol.header.chunk_size
        self.dirty_limit = dirty_limit
        self.flush_after = flush_after
        self.cache = ChunkCache(cache_limit)
        self.files: dict[int, FileData] = {}
        self.dirty_bytes = 0
        self._open: dict[int, int] = {}  # ino -> open handles
        self._lookups: dict[int, int] = {}  # ino -> the kernel's lookup count
        # Weak: a lock lives as long as someone holds or awaits it, then goes by itself.
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._next_ino = max(self.cat.max_ino(), ROOT_INO) + 1
        # With the kernel's writeback cache, the kernel owns a regular file's mtime and
        # ctime: it stamps them on write() and O_TRUNC with its own (coarse) clock and
        # sends them in a setattr. Stamping them here as well, with another clock, would
        # make a file's times change across a remount. The FUSE adapter sets this.
        self.kernel_cmtime = False

    # -- startup -----------------------------------------------------------------
    def adopt(self, older: FileSystem) -> None:
        """Serve the kernel's references that `older` served, on the same mount: a standby
        that takes over swaps its read-only FileSystem for a writable one, and the files
        the kernel holds (by inode number, the same in both) must stay valid."""
        self._lookups = dict(older._lookups)
        self._open = dict(older._open)

    def drop_orphans(self) -> int:
        """Inodes unlinked while open when the last process died: nobody can reach them now
        (except through references this process holds, which `adopt` may have given it)."""
        orphans = [ino for ino in self.cat.orphans() if not self._in_use(ino)]
        if orphans:
            self.vol.commit_nowait([DropInode(ino) for ino in orphans])
        return len(orphans)

    # -- attributes -----------------------------------------------------------------
    def _inode(self, ino: int) -> Inode:
        i = self.cat.inode(ino)
        if i is None:
            raise FsError(errno.ENOENT)
        return i

    def getattr(self, ino: int) -> Inode:
        i = self._inode(ino)
        buf = self.files.get(ino)
        if buf is not None:
            i = replace(
                i, size=buf.size, mtime_ns=buf.mtime_ns or i.mtime_ns, ctime_ns=self._ctime(buf, i)
            )
        return i

    def _dir(self, ino: int) -> Inode:
        i = self._inode(ino)
        if not stat.S_ISDIR(i.mode):
            raise FsError(errno.ENOTDIR)
        return i

    def _live_dir(self, ino: int) -> Inode:
        """A directory that may get new entries: not one removed while in use."""
        i = self._dir(ino)
        if i.nlink == 0:
            raise FsError(errno.ENOENT)
        return i

    def lookup(self, parent: int, name: bytes) -> Inode:
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            return self.getattr(self.cat.parent_of(parent) or ROOT_INO)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        ino = self.cat.lookup(parent, name)
        if ino is None:
            self._dir(parent)
            raise FsError(errno.ENOENT)
        return self.getattr(ino)

    # -- creating -------------------------------------------------------------------
    def _new_entry(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        check_name(name)
        p = self._live_dir(parent)
        if self.cat.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        now = time.time_ns()
        if p.mode & stat.S_ISGID:
            gid = p.gid  # BSD group semantics in a setgid directory, as on Linux
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        is_dir = stat.S_ISDIR(mode)
        node = self._fresh_inode(mode, uid, gid, now, rdev=rdev, target=target)
        p = replace(p, mtime_ns=now, ctime_ns=now, nlink=p.nlink + (1 if is_dir else 0))
        self.vol.commit_nowait([set_inode(node), SetDirent(parent, name, node.ino), set_inode(p)])
        return node

    def _fresh_inode(
        self, mode: int, uid: int, gid: int, now: int, *, rdev: int = 0, target: bytes | None = None
    ) -> Inode:
        """A new inode under the next number, not yet committed; the caller commits it."""
        ino = self._next_ino
        self._next_ino += 1
        return Inode(
            ino=ino,
            mode=mode,
            uid=uid,
            gid=gid,
            size=len(target) if target is not None else 0,
            nlink=2 if stat.S_ISDIR(mode) else 1,
            rdev=rdev,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            target=target,
        )

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Inode:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FsError(errno.EINVAL)
        return self._new_entry(parent, name, mode, uid, gid, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new_entry(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        return self._new_entry(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        i = self._inode(ino)
        if not stat.S_ISLNK(i.mode) or i.target is None:
            raise FsError(errno.EINVAL)
        return i.target

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        check_name(name)
        i = self._inode(ino)
        if stat.S_ISDIR(i.mode):
            raise FsError(errno.EPERM)
        p = self._live_dir(parent)
        if self.cat.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        if i.nlink == 0:
            raise FsError(errno.ENOENT)
        now = time.time_ns()
        i = replace(i, nlink=i.nlink + 1, ctime_ns=now)
        p = replace(p, mtime_ns=now, ctime_ns=now)
        self.vol.commit_nowait([SetDirent(parent, name, ino), set_inode(i), set_inode(p)])
        return self.getattr(ino)

    # -- the kernel's references -----------------------------------------------------
    def remember(self, ino: int, n: int = 1) -> None:
        """The kernel was handed this inode (lookup, create, readdirplus...)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + n

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped `n` references; an unlinked inode nobody uses goes now."""
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._drop_if_unused(ino)

    def _in_use(self, ino: int) -> bool:
        return self._open.get(ino, 0) > 0 or self._lookups.get(ino, 0) > 0

    def _drop_if_unused(self, ino: int) -> None:
        if self._in_use(ino):
            return
        i = self.cat.inode(ino)
        if i is not None and i.nlink == 0:
            self._forget_data(ino)
            self.vol.commit_nowait([DropInode(ino)])

    # -- removing -------------------------------------------------------------------
    def _unlinked(self, i: Inode, now: int) -> list[Op]:
        """Ops for an inode that just lost one name (a directory: its only one)."""
        n = 0 if stat.S_ISDIR(i.mode) else i.nlink - 1
        if n <= 0 and not self._in_use(i.ino):
            self._forget_data(i.ino)
            return [DropInode(i.ino)]
        return [set_inode(replace(i, nlink=max(n, 0), ctime_ns=now))]

    def unlink(self, parent: int, name: bytes) -> None:
        p = self._dir(parent)
        ino = self.cat.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        i = self._inode(ino)
        if stat.S_ISDIR(i.mode):
            raise FsError(errno.EISDIR)
        now = time.time_ns()
        p = replace(p, mtime_ns=now, ctime_ns=now)
        self.vol.commit_nowait([DropDirent(parent, name), *self._unlinked(i, now), set_inode(p)])

    def rmdir(self, parent: int, name: bytes) -> None:
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        p = self._dir(parent)
        ino = self.cat.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        i = self._inode(ino)
        if not stat.S_ISDIR(i.mode):
            raise FsError(errno.ENOTDIR)
        if self.cat.has_children(ino):
            raise FsError(errno.ENOTEMPTY)
        now = time.time_ns()
        p = replace(p, mtime_ns=now, ctime_ns=now, nlink=p.nlink - 1)
        self.vol.commit_nowait([DropDirent(parent, name), *self._unlinked(i, now), set_inode(p)])

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """Is `ancestor` the directory `ino` or above it?"""
        seen = 0
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INO or seen > 10000:
                return False
            parent = self.cat.parent_of(ino)
            if parent is None:
                return False
            ino, seen = parent, seen + 1

    async def rename(
        self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0, uid: int = 0, gid: int = 0
    ) -> None:
        """Move an entry; `uid`/`gid` (the caller's) own the whiteout RENAME_WHITEOUT leaves."""
        # INVARIANT: a closed file's content is committed before any later rename (see
        # release), so a file written, closed and renamed into place never shows its
        # new name with old content after a crash. No await after this one.
        await self.commit_closed()
        known = RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT
        if flags & ~known or (flags & RENAME_EXCHANGE and flags & ~RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        check_name(n2)
        d1, d2 = self._dir(p1), self._live_dir(p2)
        src_ino = self.cat.lookup(p1, n1)
        if src_ino is None:
            raise FsError(errno.ENOENT)
        src = self._inode(src_ino)
        dst_ino = self.cat.lookup(p2, n2)
        dst = self._inode(dst_ino) if dst_ino is not None else None
        src_dir = stat.S_ISDIR(src.mode)
        if src_dir and self._is_ancestor(src_ino, p2):
            raise FsError(errno.EINVAL)
        now = time.time_ns()
        ops: list[Op] = []
        nlink_delta = {p1: 0, p2: 0}  # subdirectory moves change the parents' link counts
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            dst_dir = stat.S_ISDIR(dst.mode)
            if dst_dir and self._is_ancestor(dst.ino, p1):
                raise FsError(errno.EINVAL)
            if src_ino == dst.ino:
                return
            ops += [SetDirent(p1, n1, dst.ino), SetDirent(p2, n2, src_ino)]
            if p1 != p2:
                nlink_delta[p1] += int(dst_dir) - int(src_dir)
                nlink_delta[p2] += int(src_dir) - int(dst_dir)
            ops += [
                set_inode(replace(src, ctime_ns=now)),
                set_inode(replace(dst, ctime_ns=now)),
            ]
        else:
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                if dst.ino == src_ino:
                    return  # two names of one inode: POSIX says do nothing
                dst_dir = stat.S_ISDIR(dst.mode)
                if src_dir and not dst_dir:
                    raise FsError(errno.ENOTDIR)
                if dst_dir and not src_dir:
                    raise FsError(errno.EISDIR)
                if dst_dir and self.cat.has_children(dst.ino):
                    raise FsError(errno.ENOTEMPTY)
                ops += self._unlinked(dst, now)
                if dst_dir:
                    nlink_delta[p2] -= 1
            ops += [DropDirent(p1, n1), SetDirent(p2, n2, src_ino)]
            if src_dir:
                nlink_delta[p1] -= 1
                nlink_delta[p2] += 1
            ops.append(set_inode(replace(src, ctime_ns=now)))
            if flags & RENAME_WHITEOUT:
                if d1.mode & stat.S_ISGID:
                    gid = d1.gid
                wh = self._fresh_inode(stat.S_IFCHR, uid, gid, now)
                ops += [set_inode(wh), SetDirent(p1, n1, wh.ino)]
        del d1, d2
        for pino, delta in nlink_delta.items():
            d = self._inode(pino)
            ops.append(set_inode(replace(d, nlink=d.nlink + delta, mtime_ns=now, ctime_ns=now)))
        self.vol.commit_nowait(ops)

    # -- directories ----------------------------------------------------------------
    def readdir(self, ino: int, offset: int, limit: int = 256) -> list[tuple[bytes, Inode, int]]:
        """Entries after `offset`, each with the offset to resume after it."""
        d = self._dir(ino)
        out: list[tuple[bytes, Inode, int]] = []
        if offset < 1:
            out.append((b".", d, 1))
        if offset < 2:
            parent = self.cat.parent_of(ino) if ino != ROOT_INO else ROOT_INO
            out.append((b"..", self.getattr(parent or ROOT_INO), 2))
        for e, i in self.cat.listdir(ino, max(0, offset - DOT_OFFSETS), limit):
            # An open file's size and times may be ahead of the catalog's: its overlay.
            attrs = self.getattr(e.ino) if e.ino in self.files else i
            out.append((e.name, attrs, e.id + DOT_OFFSETS))
        return out

    # -- attributes changes ------------------------------------------------------------
    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Inode:
        """Change attributes; times the caller gives win (the kernel sends its own).

        What is committed is the catalog's inode, not the dirty overlay: a size that
        only unflushed writes reached must not be made to stick with zeros in it.
        """
        now = time.time_ns()
        atime_ns, mtime_ns = clamp_time(atime_ns), clamp_time(mtime_ns)
        ctime_ns = clamp_time(ctime_ns)
        i = self._inode(ino)
        buf = self.files.get(ino)
        if (
            buf is not None
            and buf.dirty
            and mtime_ns is not None
            and mode is None
            and uid is None
            and gid is None
            and size is None
            and atime_ns is None
        ):
            # The kernel's mtime/ctime before a flush or fsync of written data: carry them
            # in the buffer and commit them with the data, one transaction instead of two.
            buf.mtime_ns = mtime_ns
            buf.ctime_ns = ctime_ns if ctime_ns is not None else now
            return self.getattr(ino)
        if size is not None:
            if stat.S_ISDIR(i.mode):
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(i.mode):
                raise FsError(errno.EINVAL)
            if size > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            await self._truncate(ino, size)
            if not self.kernel_cmtime:
                mtime_ns = now if mtime_ns is None else mtime_ns
                ctime_ns = now if ctime_ns is None else ctime_ns
            i = self._inode(ino)
        changed = False
        if mode is not None:
            i = replace(i, mode=stat.S_IFMT(i.mode) | (mode & 0o7777))
            changed = True
        if uid is not None or gid is not None:
            i = replace(i, uid=i.uid if uid is None else uid, gid=i.gid if gid is None else gid)
            changed = True
        if atime_ns is not None:
            i = replace(i, atime_ns=atime_ns)
            changed = True
        if mtime_ns is not None:
            i = replace(i, mtime_ns=mtime_ns)
            changed = True
        if changed and ctime_ns is None:
            ctime_ns = now
        if ctime_ns is not None:
            i = replace(i, ctime_ns=ctime_ns)
            changed = True
        if changed:
            buf = self.files.get(ino)
            if buf is not None:
                # The overlay's times are older than these: they must not win at flush.
                if mtime_ns is not None:
                    buf.mtime_ns = mtime_ns
                if ctime_ns is not None:
                    buf.ctime_ns = ctime_ns
            self.vol.commit_nowait([set_inode(i)])
        return self.getattr(ino)

    # -- extended attributes -------------------------------------------------------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        check_xattr_name(name)
        self._inode(ino)
        v = self.cat.xattr(ino, name)
        if v is None:
            raise FsError(errno.ENODATA)
        return v

    def listxattr(self, ino: int, privileged: bool = True) -> list[bytes]:
        """All names, but trusted.* only for a privileged caller: the kernel refuses those
        to anyone else, and ext4 does not even list them (it checks CAP_SYS_ADMIN)."""
        self._inode(ino)
        names = sorted(self.cat.xattrs(ino))
        return names if privileged else [n for n in names if not n.startswith(b"trusted.")]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        i = self._inode(ino)
        exists = self.cat.xattr(ino, name) is not None
        if flags & XATTR_CREATE and exists:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and not exists:
            raise FsError(errno.ENODATA)
        i = replace(i, ctime_ns=time.time_ns())
        self.vol.commit_nowait([SetXattr(ino, name, value), set_inode(i)])

    def removexattr(self, ino: int, name: bytes) -> None:
        check_xattr_name(name)
        i = self._inode(ino)
        if self.cat.xattr(ino, name) is None:
            raise FsError(errno.ENODATA)
        i = replace(i, ctime_ns=time.time_ns())
        self.vol.commit_nowait([SetXattr(ino, name, None), set_inode(i)])

    # -- statfs ----------------------------------------------------------------------
    def statfs(self) -> dict[str, int]:
        """Space as the local disk under the state directory sees it, less what the journal
        leaves to the catalog (data writes stop there); inodes unlimited-ish."""
        st = os.statvfs(self.vol.state_dir)
        held = catalog_reserve(st) // st.f_frsize
        st_bfree, st_bavail = max(0, st.f_bfree - held), max(0, st.f_bavail - held)
        _used_bytes, inodes = self.cat.usage()
        total_inodes = max(inodes * 2, 1 << 24)
        return {
            "bsize": self.block_size,
            "frsize": 4096,
            "blocks": st.f_blocks * st.f_frsize // 4096,
            "bfree": st_bfree * st.f_frsize // 4096,
            "bavail": st_bavail * st.f_frsize // 4096,
            "files": total_inodes,
            "ffree": total_inodes - inodes,
            "favail": total_inodes - inodes,
            "namemax": NAME_MAX,
        }

    # -- open files --------------------------------------------------------------------
    def open(self, ino: int, truncate: bool = False) -> Inode:
        i = self._inode(ino)
        if stat.S_ISDIR(i.mode):
            raise FsError(errno.EISDIR)
        self._open[ino] = self._open.get(ino, 0) + 1
        return i

    async def release(self, ino: int) -> None:
        n = self._open.get(ino, 0) - 1
        if n > 0:
            self._open[ino] = n
            return
        self._open.pop(ino, None)
        i = self.cat.inode(ino)
        if i is not None and i.nlink == 0:
            self._drop_if_unused(ino)
            return
        buf = self.files.get(ino)
        if buf is not None and buf.dirty:
            # Committed shortly, with the other files closed meanwhile: one transaction
            # and one hand-off to the encoder for a burst of small files (an untar, a
            # build), and the next request is answered first. Nobody waits for this
            # commit: a close promises no durability (fsync does), and the data stays
            # readable from the buffer until then.
            self._closed[ino] = None
            if not self._closed_task:
                self._closed_task = True
                self._in_background(self._commit_closed_soon())
            return
        await self.flush(ino)  # a flush of it in flight: wait for it, then let go
        self._drop_if_clean(ino)

    async def sync_dir(self) -> None:
        """fsync of a directory (not the root's: see flush_all).

        INVARIANT: the files closed before it are committed first, so the sync makes
        their content durable with their names (see release)."""
        await self.commit_closed()
        await self.vol.sync()

    def touch_atime(self, ino: int) -> None:
        """relatime: update atime on read only when it is older than mtime/ctime or a day."""
        if self.vol.read_only:
            return  # a point in time keeps its times; a fenced volume takes no write
        i = self.cat.inode(ino)
        if i is None:
            return
        now = time.time_ns()
        if i.atime_ns <= i.mtime_ns or i.atime_ns <= i.ctime_ns or now - i.atime_ns > 86400e9:
            self.vol.commit_nowait([set_inode(replace(i, atime_ns=now))])

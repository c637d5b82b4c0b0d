"""POSIX semantics over the volume: what the FUSE adapter asks, answered with errnos.

This module knows nothing of pyfuse3; `fuse/operations.py` translates. Every
namespace change is one transaction, committed at once (not durable until an
fsync); file contents go through `filedata.FileData` buffers and are committed
on flush, fsync, a timer, or memory pressure.

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
import contextlib
import errno
import os
import stat
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import replace
from typing import Any

from vaultsync.engine.catalog import Inode
from vaultsync.engine.filedata import PATCH_RANGES, PATCH_SHARE, FileData, Origin
from vaultsync.engine.volume import ROOT_INO, PreparedChunk, Volume, catalog_reserve
from vaultsync.errors import VaultsyncError, VolumeError
from vaultsync.format.patch import PatchPlan, rebase
from vaultsync.format.txn import (
    DropDirent,
    DropInode,
    Op,
    SetBlocks,
    SetDirent,
    SetInode,
    SetXattr,
    TruncateBlocks,
)

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
# The largest file: ext4's with 4 KiB blocks, so that applications (and conformance
# suites) meet EFBIG where they would on a local disk rather than at 2**63.
MAX_FILE_SIZE = (1 << 44) - 4096
# Timestamps are nanoseconds in a signed 64-bit catalog column. ext4 keeps seconds from
# -2**31 to 2**34 + 2**31 - 1 and clamps what lies outside; we clamp the same way, except
# that our top is where 64-bit nanoseconds end (year 2262), short of ext4's (year 2446).
TIME_MIN_NS = -(2**31) * 10**9
TIME_MAX_NS = 2**63 - 1
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4  # overlayfs's: the old name becomes a whiteout (a 0:0 char device)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
XATTR_CREATE = 1
XATTR_REPLACE = 2
# Linux's "." and ".." readdir offsets; entries follow at their dirent id + 2.
DOT_OFFSETS = 2


class FsError(Exception):
    """An operation refused with a POSIX errno."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def _set_inode(i: Inode) -> SetInode:
    return SetInode(
        ino=i.ino,
        mode=i.mode,
        uid=i.uid,
        gid=i.gid,
        size=i.size,
        nlink=i.nlink,
        rdev=i.rdev,
        atime_ns=i.atime_ns,
        mtime_ns=i.mtime_ns,
        ctime_ns=i.ctime_ns,
        target=i.target,
    )


def _clamp_time(ns: int | None) -> int | None:
    """A time the kernel handed us, cut to what the catalog can hold (utimensat(2) takes
    any 64-bit second count; storing 2**40 s in nanoseconds overflowed into EIO)."""
    return None if ns is None else min(max(ns, TIME_MIN_NS), TIME_MAX_NS)


def without_privs(mode: int) -> int:
    """`mode` as a write or truncate by an unprivileged process leaves it: setuid goes, and
    setgid when group-execute is on (setgid without it marks mandatory locking, and stays).
    This is the rule the kernel's FUSE client applies on write() and truncate()."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


def _check_xattr_name(name: bytes) -> None:
    """Linux's namespaces only, as ext4 and tmpfs answer: anything else is EOPNOTSUPP."""
    if not name or len(name) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE)
    if not name.startswith(XATTR_NAMESPACES):
        raise FsError(errno.EOPNOTSUPP)
    if name in XATTR_NAMESPACES:
        raise FsError(errno.EINVAL)


class ChunkCache:
    """Bounded LRU of decoded chunks, by id: reads of hot blocks skip decompression."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, cid: bytes) -> bytes | None:
        v = self._d.get(cid)
        if v is not None:
            self._d.move_to_end(cid)
        return v

    def put(self, cid: bytes, data: bytes) -> None:
        if len(data) > self.limit // 4 or cid in self._d:
            return
        self._d[cid] = data
        self.size += len(data)
        while self.size > self.limit:
            _, old = self._d.popitem(last=False)
            self.size -= len(old)


class FileSystem:
    def __init__(
        self,
        vol: Volume,
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
    def drop_orphans(self) -> int:
        """Inodes unlinked while open when the last process died: nobody can reach them now."""
        orphans = self.cat.orphans()
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
        fd = self.files.get(ino)
        if fd is not None:
            i = replace(
                i, size=fd.size, mtime_ns=fd.mtime_ns or i.mtime_ns, ctime_ns=self._ctime(fd, i)
            )
        return i

    def _ctime(self, fd: FileData, i: Inode) -> int:
        """A buffered ctime wins outright when it is the kernel's (its clock is coarser)."""
        if self.kernel_cmtime and fd.ctime_ns:
            return fd.ctime_ns
        return max(fd.ctime_ns, i.ctime_ns)

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
        _check_name(name)
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
        self.vol.commit_nowait([_set_inode(node), SetDirent(parent, name, node.ino), _set_inode(p)])
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
        _check_name(name)
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
        self.vol.commit_nowait([SetDirent(parent, name, ino), _set_inode(i), _set_inode(p)])
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
        return [_set_inode(replace(i, nlink=max(n, 0), ctime_ns=now))]

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
        self.vol.commit_nowait([DropDirent(parent, name), *self._unlinked(i, now), _set_inode(p)])

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
        self.vol.commit_nowait([DropDirent(parent, name), *self._unlinked(i, now), _set_inode(p)])

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
        _check_name(n2)
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
                _set_inode(replace(src, ctime_ns=now)),
                _set_inode(replace(dst, ctime_ns=now)),
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
            ops.append(_set_inode(replace(src, ctime_ns=now)))
            if flags & RENAME_WHITEOUT:
                if d1.mode & stat.S_ISGID:
                    gid = d1.gid
                wh = self._fresh_inode(stat.S_IFCHR, uid, gid, now)
                ops += [_set_inode(wh), SetDirent(p1, n1, wh.ino)]
        del d1, d2
        for pino, delta in nlink_delta.items():
            d = self._inode(pino)
            ops.append(_set_inode(replace(d, nlink=d.nlink + delta, mtime_ns=now, ctime_ns=now)))
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
        atime_ns, mtime_ns = _clamp_time(atime_ns), _clamp_time(mtime_ns)
        ctime_ns = _clamp_time(ctime_ns)
        i = self._inode(ino)
        fd = self.files.get(ino)
        if (
            fd is not None
            and fd.dirty
            and mtime_ns is not None
            and mode is None
            and uid is None
            and gid is None
            and size is None
            and atime_ns is None
        ):
            # The kernel's mtime/ctime before a flush or fsync of written data: carry them
            # in the buffer and commit them with the data, one transaction instead of two.
            fd.mtime_ns = mtime_ns
            fd.ctime_ns = ctime_ns if ctime_ns is not None else now
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
            fd = self.files.get(ino)
            if fd is not None:
                # The overlay's times are older than these: they must not win at flush.
                if mtime_ns is not None:
                    fd.mtime_ns = mtime_ns
                if ctime_ns is not None:
                    fd.ctime_ns = ctime_ns
            self.vol.commit_nowait([_set_inode(i)])
        return self.getattr(ino)

    # -- extended attributes -------------------------------------------------------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        _check_xattr_name(name)
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
        _check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        i = self._inode(ino)
        exists = self.cat.xattr(ino, name) is not None
        if flags & XATTR_CREATE and exists:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and not exists:
            raise FsError(errno.ENODATA)
        i = replace(i, ctime_ns=time.time_ns())
        self.vol.commit_nowait([SetXattr(ino, name, value), _set_inode(i)])

    def removexattr(self, ino: int, name: bytes) -> None:
        _check_xattr_name(name)
        i = self._inode(ino)
        if self.cat.xattr(ino, name) is None:
            raise FsError(errno.ENODATA)
        i = replace(i, ctime_ns=time.time_ns())
        self.vol.commit_nowait([SetXattr(ino, name, None), _set_inode(i)])

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
        fd = self.files.get(ino)
        if fd is not None and fd.dirty:
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

    # How long the buffers of closed files wait for others to share their transaction.
    CLOSE_COMMIT_DELAY = 0.01

    async def _commit_closed_soon(self) -> None:
        # A failure leaves the data dirty in its buffer: the flush timer (flush_old)
        # retries it like any other, and the next close starts a task again.
        try:
            await asyncio.sleep(self.CLOSE_COMMIT_DELAY)
            await self.commit_closed()
        finally:
            # No await between commit_closed() finding nothing left and this: a close
            # in between would see a task that is about to end and start none.
            self._closed_task = False

    async def sync_dir(self) -> None:
        """fsync of a directory (not the root's: see flush_all).

        INVARIANT: the files closed before it are committed first, so the sync makes
        their content durable with their names (see release)."""
        await self.commit_closed()
        await self.vol.sync()

    async def commit_closed(self) -> None:
        """Commit the buffers of closed files now: those that fit in one transaction
        together (FLUSH_BATCH bytes), the others each on its own.

        Called by rename and sync_dir too, so that a file written, closed and
        renamed into place is never newer in name than in content.
        """
        async with self._closed_lock:
            await self._commit_closed_now()

    async def _commit_closed_now(self) -> None:
        bs = self.block_size
        while self._closed:
            group: list[tuple[int, FileData, list[int]]] = []
            alone: list[int] = []
            room = self.FLUSH_BATCH
            for ino in list(self._closed):
                fd = self.files.get(ino)
                if fd is None or not fd.dirty:
                    del self._closed[ino]
                    self._drop_if_clean(ino)
                    continue
                need = len(fd.blocks) * bs
                # A lock that exists is held or awaited (they are weak): that file goes
                # through flush(), which waits its turn. The others' locks are made here
                # and free, so taking them below never pauses.
                if fd.inflight or ino in self._locks or need > self.FLUSH_BATCH:
                    del self._closed[ino]
                    alone.append(ino)
                    continue
                if need > room:
                    break  # the next round takes it
                del self._closed[ino]
                room -= need
                group.append((ino, fd, sorted(fd.blocks)))
            locks = [self._lock(ino) for ino, _, _ in group]
            for lk in locks:
                await lk.acquire()  # new and free: returns without a pause
            try:
                if group:
                    await self._flush_batches(group)
            finally:
                for lk in locks:
                    lk.release()
            for ino, _, _ in group:
                self._drop_if_clean(ino)
            for ino in alone:
                await self.flush(ino)

    # -- file contents ------------------------------------------------------------------
    def _lock(self, ino: int) -> asyncio.Lock:
        lk = self._locks.get(ino)
        if lk is None:
            lk = self._locks[ino] = asyncio.Lock()
        return lk

    def _data(self, ino: int) -> FileData:
        fd = self.files.get(ino)
        if fd is None:
            i = self._inode(ino)
            fd = self.files[ino] = FileData(self.block_size, i.size)
        return fd

    def _forget_data(self, ino: int) -> None:
        fd = self.files.pop(ino, None)
        if fd is not None:
            self.dirty_bytes -= fd.dirty_bytes
        self._locks.pop(ino, None)

    READ_AHEAD_BLOCKS = 64

    async def _warm(
        self, ino: int, first: int, last: int, remap: bool = True
    ) -> dict[int, tuple[bytes, int]]:
        """Bring the stored blocks first..last into the chunk cache in one trip.

        Returns the catalog's map of those blocks as it is when this returns
        (unless not `remap`: then as it was when it began).
        """
        fd = self.files.get(ino)
        gen = self.cat.blocks_gen
        stored = self.cat.block_range(ino, first, last)
        want: dict[bytes, None] = {}
        fetching: set[asyncio.Future[None]] = set()
        for b, (cid, _n) in sorted(stored.items()):
            if self.cache.get(cid) is not None or (fd is not None and fd.peek(b) is not None):
                continue
            other = self._fetching.get(cid)
            if other is not None:
                fetching.add(other)  # a read-ahead is bringing it: wait, do not fetch twice
            else:
                want[cid] = None
        if not want and not fetching:
            return stored
        if want:
            done = asyncio.get_running_loop().create_future()
            for cid in want:
                self._fetching[cid] = done
            try:
                got = await self.vol.read_chunks(list(want))
                for cid, data in zip(want, got, strict=True):
                    self.cache.put(cid, data)
            finally:
                for cid in want:
                    if self._fetching.get(cid) is done:
                        del self._fetching[cid]
                done.set_result(None)  # waiters go on; a chunk not cached is read singly
        if fetching:
            await asyncio.gather(*(asyncio.shield(f) for f in fetching))
        if not remap or self.cat.blocks_gen == gen:
            return stored
        return self.cat.block_range(ino, first, last)  # it changed meanwhile

    def _read_ahead(self, ino: int, first: int, last: int) -> None:
        if ino in self._prefetching:
            return
        self._prefetching.add(ino)

        async def go() -> None:
            try:
                await self._warm(ino, first, last, remap=False)
            except Exception:
                pass  # only a hint: the read itself reports errors
            finally:
                self._prefetching.discard(ino)

        self._in_background(go())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on its own, held so it is not collected, its failure consumed: all
        of it is a head start whose errors reach the caller by another road (a failed
        flush leaves its data dirty, and the next fsync or write reports it)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _stored_block(
        self, ino: int, blockno: int, known: dict[int, tuple[bytes, int]] | None = None
    ) -> bytes:
        # `known`: the caller's block map for a range holding this block, or None.
        ref = known.get(blockno) if known is not None else self.cat.block(ino, blockno)
        if ref is None:
            return b""
        cid, length = ref
        data = self.cache.get(cid)
        if data is None:
            data = await self.vol.read_chunk(cid)
            self.cache.put(cid, data)
        return data[:length]

    async def _block(
        self, ino: int, blockno: int, known: dict[int, tuple[bytes, int]] | None = None
    ) -> bytes:
        """Current content of one block (dirty, in flight, or stored); may be short."""
        fd = self.files.get(ino)
        if fd is not None:
            while blockno in fd.unloaded:
                await self._load_bases(fd, [blockno])
            b = fd.peek(blockno)
            if b is not None:
                return b
        return await self._stored_block(ino, blockno, known)

    async def _load_bases(self, fd: FileData, blocks: Iterable[int]) -> None:
        """Put their stored bytes under the writes to these blocks, where unloaded: the
        chunks not cached in one `read_chunks` trip (the volume reads neighbours together)."""
        todo = {b: u for b in blocks if (u := fd.unloaded.get(b)) is not None}
        have: dict[bytes, bytes] = {}
        want: list[bytes] = []
        for u in todo.values():
            if u.cid not in have and u.cid not in want:
                data = self.cache.get(u.cid)
                if data is None:
                    want.append(u.cid)
                else:
                    have[u.cid] = data
        if want:
            have.update(zip(want, await self.vol.read_chunks(want), strict=True))
        for b, u in todo.items():
            if fd.unloaded.get(b) is u:  # else written whole, cut away or loaded meanwhile
                fd.load_base(b, have[u.cid])

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        i = self.getattr(ino)
        if not stat.S_ISREG(i.mode):
            raise FsError(errno.EINVAL if not stat.S_ISDIR(i.mode) else errno.EISDIR)
        end = min(i.size, offset + size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        # One map for the whole read; a block whose chunk left the cache since is
        # fetched below by that map's chunk id, which is still the block's content
        # as of when the read began. Unless a flush commits meanwhile: the blocks it
        # takes out of the buffer are then only in the new map (see the loop).
        stored = await self._warm(ino, first, last)
        gen = self.cat.blocks_gen
        if self._read_end.get(ino) == offset:  # sequential: fetch ahead, in the background
            self._read_ahead(ino, last + 1, last + self.READ_AHEAD_BLOCKS)
        self._read_end[ino] = end
        parts = []
        pos = offset
        while pos < end:
            b, inner = divmod(pos, bs)
            take = min(bs - inner, end - pos)
            if self.cat.blocks_gen != gen:  # a block flushed while we waited for another
                gen = self.cat.blocks_gen
                stored = self.cat.block_range(ino, first, last)
            data = await self._block(ino, b, stored)
            # A view, not a slice: the join below is then the only copy of the data.
            piece: bytes | memoryview = memoryview(data)[inner : inner + take]
            if len(piece) < take:
                piece = bytes(piece) + bytes(take - len(piece))
            parts.append(piece)
            pos += take
        # The file may have been truncated while we awaited a chunk: never return stale tail.
        size_now = self.getattr(ino).size if ino in self.files or self.cat.inode(ino) else 0
        out = b"".join(parts)
        if offset + len(out) > size_now:
            out = out[: max(0, size_now - offset)]
        return out

    STREAM_BATCH = 8 << 20

    async def stream(self, ino: int) -> AsyncIterator[bytes]:
        """The whole file in order, in pieces of about STREAM_BATCH bytes, for bulk copies.

        `read` serves small random reads through the chunk cache and a read-ahead;
        several bulk copies at once through that path evict each other's
        read-ahead and fetch every chunk many times over. Here each block is
        fetched once, a batch per `read_chunks` call (the volume groups neighbours
        into one read), the next batch while the caller writes this one, and
        nothing goes into the chunk cache. Blocks with unflushed writes come from
        the buffer, as in `read`; a file truncated meanwhile ends early.
        """
        i = self.getattr(ino)
        if not stat.S_ISREG(i.mode):
            raise FsError(errno.EINVAL if not stat.S_ISDIR(i.mode) else errno.EISDIR)
        size, bs = i.size, self.block_size
        per = max(1, self.STREAM_BATCH // bs)
        nblocks = -(-size // bs)

        async def batch(first: int) -> bytes:
            last = min(first + per, nblocks) - 1
            fd = self.files.get(ino)
            while fd is not None and any(b in fd.unloaded for b in range(first, last + 1)):
                await self._load_bases(fd, range(first, last + 1))
            refs = self.cat.block_range(ino, first, last)
            held = {b: fd.peek(b) for b in range(first, last + 1)} if fd is not None else {}
            want = list(dict.fromkeys(ref[0] for b, ref in refs.items() if held.get(b) is None))
            got = dict(zip(want, await self.vol.read_chunks(want), strict=True)) if want else {}
            parts = []
            for b in range(first, last + 1):
                span = min(bs, size - b * bs)
                data = held.get(b)
                if data is None:
                    ref = refs.get(b)
                    data = got[ref[0]][: ref[1]] if ref is not None else b""
                data = data[:span]
                parts.append(data if len(data) == span else data + bytes(span - len(data)))
            return b"".join(parts)

        nxt: asyncio.Future[bytes] | None = asyncio.ensure_future(batch(0)) if nblocks else None
        first = start = 0
        try:
            while nxt is not None:
                data = await nxt
                first += per
                nxt = asyncio.ensure_future(batch(first)) if first < nblocks else None
                now = self.getattr(ino).size if ino in self.files or self.cat.inode(ino) else 0
                piece = data[: max(0, now - start)]
                if piece:
                    yield piece
                if len(piece) < len(data):
                    return  # truncated while we read
                start += len(data)
        finally:
            if nxt is not None:
                nxt.cancel()
                nxt.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        if offset < 0:
            raise FsError(errno.EINVAL)
        if offset + len(data) > MAX_FILE_SIZE:
            if offset >= MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            data = data[: MAX_FILE_SIZE - offset]  # a short write up to the limit, as ext4
        if self.dirty_bytes > self.dirty_limit:
            # Earlier flushes failed (a full disk): refuse rather than buffer without
            # bound. Raised here, nothing of this write is taken.
            await self.flush_some()
        fd = self._data(ino)
        bs = self.block_size
        pos, view = offset, memoryview(data)
        while view:
            b, inner = divmod(pos, bs)
            take = min(bs - inner, len(view))
            if inner == 0 and take == bs:  # the whole block: nothing of it to keep
                self.dirty_bytes += fd.put_whole(b, view[:take])
                pos += take
                view = view[take:]
                continue
            while not fd.has_dirty(b):
                epoch = fd.epoch
                origin = None
                if b * bs >= fd.stored_size and b not in fd.inflight:
                    # Nothing stored there yet, and no flush holds it: a fresh block.
                    # (A block in flight has content the catalog does not show yet.)
                    base = b""
                elif inner == 0 and b not in fd.inflight and take >= self._stored_len(ino, b):
                    base = b""  # the write replaces everything the block holds
                elif fd.peek(b) is not None:
                    base = await self._block(ino, b)
                else:  # the stored chunk: the block may go back as a patch of it
                    ref = self.cat.block(ino, b)
                    if ref is not None and self.cache.get(ref[0]) is None:
                        # Not in memory: write now, read it when the whole block is
                        # needed, with others (FileData.unloaded). No await since the
                        # loop's test: the block is still not dirty.
                        self.dirty_bytes += fd.start_unloaded(b, ref[0], ref[1])
                        break
                    base = await self._stored_block(ino, b, {b: ref} if ref else {})
                    origin = ref[0] if ref is not None and len(base) == ref[1] else None
                cur = self._data(ino)  # it may have been flushed and dropped meanwhile
                if cur is fd and fd.epoch == epoch:
                    if not fd.has_dirty(b):
                        self.dirty_bytes += fd.start_block(b, base, origin)
                    break
                fd = cur  # a flush or truncate ran while we read: `base` may be stale
            self.dirty_bytes += fd.patch(b, inner, view[:take])
            pos += take
            view = view[take:]
        fd.extend_to(offset + len(data), None if self.kernel_cmtime else time.time_ns())
        touched = range(offset // bs, (offset + max(len(data), 1) - 1) // bs + 1)
        if any(len(fd.unloaded[b].ranges) > PATCH_RANGES for b in touched if b in fd.unloaded):
            await self._load_bases(fd, touched)  # many small writes into one: merge them now
        fd.writes_since_fsync += 1
        if self._kick_due(fd, len(data)):
            with contextlib.suppress(Exception):  # a head start: the fsync reports for itself
                await self.flush(ino)
                self.vol.ship_now()
            return len(data)
        if self.dirty_bytes > self.dirty_limit:
            # This write is taken (buffered): a failure here is reported by the next
            # write, which refuses above, or by the fsync.
            with contextlib.suppress(OSError):
                await self.flush_some()
        elif len(fd.blocks) * bs >= self.flush_bytes:
            lock = self._locks.get(ino)
            if not fd.inflight and not (lock is not None and lock.locked()):
                # None running (it may be reading bases before it takes the blocks): one
                # flush of them all, not a task per write each taking a few.
                self._in_background(self.flush(ino))
            elif len(fd.blocks) * bs >= 2 * self.flush_bytes:
                await self.flush(ino)  # the writer outruns the encoder: make it wait
        return len(data)

    def _stored_len(self, ino: int, blockno: int) -> int:
        ref = self.cat.block(ino, blockno)
        return 0 if ref is None else ref[1]

    async def flush(self, ino: int) -> None:
        """Commit the file's dirty blocks and size (not durable: see fsync)."""
        fd = self.files.get(ino)
        # Blocks in flight belong to a flush that has not committed yet: wait for it
        # (via the lock), or an fsync could return before that data is in the journal.
        if fd is None or (not fd.dirty and not fd.inflight):
            return
        async with self._lock(ino):
            fd = self.files.get(ino)
            if fd is None or not fd.dirty:
                return
            # In batches of FLUSH_BATCH bytes: memory, event-loop stalls and transaction
            # (hence segment) sizes stay bounded however much a file has buffered. Only
            # the blocks dirty now are owed: a busy writer cannot keep an fsync waiting.
            todo = sorted(fd.blocks)
            per_batch = max(1, self.FLUSH_BATCH // self.block_size)
            while True:
                batch, todo = todo[:per_batch], todo[per_batch:]
                await self._flush_batch(ino, fd, batch)
                todo = [b for b in todo if b in fd.blocks]
                if not todo or self.files.get(ino) is not fd:
                    break
            self._drop_if_clean(ino)

    FLUSH_BATCH = 4 << 20
    WARM_AFTER_FLUSH = 1 << 20

    async def _flush_batch(self, ino: int, fd: FileData, batch: list[int]) -> None:
        await self._flush_batches([(ino, fd, batch)])

    async def _flush_batches(self, items: list[tuple[int, FileData, list[int]]]) -> None:
        """Commit these blocks of these files in one transaction; the caller holds the
        lock of each file."""
        while True:
            unloaded = [(fd, b) for _, fd, b in items if any(x in fd.unloaded for x in b)]
            if not unloaded:
                break
            for fd, batch in unloaded:
                await self._load_bases(fd, batch)
        # No await from the test above to here: no block taken is unloaded.
        bs = self.block_size
        taken: list[tuple[int, FileData, dict[int, bytes], dict[int, Origin], int]] = []
        for ino, fd, batch in items:
            snap, origins = fd.take_dirty(batch)
            # The size these blocks make: writes that land while we encode are not in
            # the snapshot, and committing their size now would expose zeros after a
            # crash. Neither may a size reaching past a block still dirty (a later
            # batch's) that lies beyond what is stored: that block would read as a hole
            # after a crash.
            gaps = [max(b * bs, fd.stored_size) for b in fd.blocks if (b + 1) * bs > fd.stored_size]
            size = min([fd.size, *gaps])
            self.dirty_bytes -= sum(len(v) for v in snap.values())
            taken.append((ino, fd, snap, origins, size))
        committed = False
        try:
            plans: list[PatchPlan | None] = []
            for _, _, snap, origins, _ in taken:
                if not origins:  # a streaming writer's whole blocks, a new file's
                    plans += [None] * len(snap)
                    continue
                plans += [await self._patch_plan(origins.get(b), d) for b, d in snap.items()]
            data = [d for _, _, snap, _, _ in taken for d in snap.values()]
            prepared = await self.vol.prepare_chunks(data, plans)
            ops: list[Op] = []
            chunks: list[PreparedChunk] = []
            kept: list[tuple[FileData, dict[int, bytes], int, list[PreparedChunk]]] = []
            k = 0
            for ino, fd, snap, _, size in taken:
                mine, k = prepared[k : k + len(snap)], k + len(snap)
                i = self.cat.inode(ino)
                if i is None:
                    continue  # unlinked and released meanwhile: nothing to keep
                blocks = tuple((b, p.id.hex(), p.length) for b, p in zip(snap, mine, strict=True))
                i = replace(
                    i,
                    size=size,
                    mtime_ns=fd.mtime_ns or i.mtime_ns,
                    ctime_ns=self._ctime(fd, i),
                )
                ops += [SetBlocks(ino, blocks), _set_inode(i)]
                chunks += mine
                kept.append((fd, snap, size, mine))
            if ops:
                self.vol.commit_nowait(ops, chunks)
            committed = True
            for fd, snap, size, mine in kept:
                fd.stored_size = size
                # The next partial write of these blocks reads them back: keep them warm.
                # Not a streaming writer's full blocks: nobody rewrites them soon, and
                # they would push everything else out of the cache (and hold memory for
                # nothing).
                small = len(snap) * bs <= self.WARM_AFTER_FLUSH
                for d, p in zip(snap.values(), mine, strict=True):
                    if small or len(d) < bs:
                        self.cache.put(p.id, d)
        finally:
            for _, fd, snap, _, _ in taken:
                if committed:
                    fd.done_flushing(snap)
                else:  # keep the data readable and dirty: a later flush retries it
                    self.dirty_bytes += fd.flush_failed(snap)

    async def _patch_plan(self, origin: Origin | None, data: bytes) -> PatchPlan | None:
        """How to store `data` as a patch of the chunk it was loaded from, when that is
        worth it (far fewer bytes than the block); None: store it whole."""
        if origin is None or origin.keep == 0 or not getattr(self.vol, "writes_patches", False):
            return None
        plan = PatchPlan(origin.cid, origin.keep, tuple(origin.ranges))
        inner = await self.vol.patch_plan(origin.cid)
        if inner is not None:  # patch the origin's base, never a patch (format §6.3)
            plan = replace(rebase(plan, inner.keep, inner.ranges), base=inner.base)
        small = plan.patched_bytes * 2 <= len(data)
        if not small or plan.patched_bytes * PATCH_SHARE > self.block_size:
            return None
        return plan if len(plan.ranges) <= PATCH_RANGES else None

    def _drop_if_clean(self, ino: int) -> None:
        """Forget a closed file's buffer once nothing in it is unflushed."""
        fd = self.files.get(ino)
        if fd is None or fd.dirty or fd.inflight or self._open.get(ino, 0):
            return
        del self.files[ino]

    async def _truncate(self, ino: int, size: int) -> None:
        """Cut or extend the stored file to `size`; times are the caller's business."""
        await self.flush(ino)
        async with self._lock(ino):
            i = self._inode(ino)
            bs = self.block_size
            ops: list[Op] = []
            keep_blocks = -(-size // bs)
            if size < i.size:
                ops.append(TruncateBlocks(ino, keep_blocks))
                tail = size % bs
                prepared = []
                ref = self.cat.block(ino, size // bs) if tail else None
                if ref is not None:
                    last = await self._stored_block(ino, size // bs, {size // bs: ref})
                    if len(last) > tail:
                        # Cut inside a block: a patch keeping its first `tail` bytes.
                        plan = await self._patch_plan(Origin(ref[0], tail), last[:tail])
                        prepared = await self.vol.prepare_chunks([last[:tail]], [plan])
                        ops.append(SetBlocks(ino, ((size // bs, prepared[0].id.hex(), tail),)))
            else:
                prepared = []
            i = self._inode(ino)
            ops.append(_set_inode(replace(i, size=size)))
            self.vol.commit_nowait(ops, prepared)
            fd = self.files.get(ino)
            if fd is not None:
                before = fd.dirty_bytes
                fd.truncated(size)
                self.dirty_bytes -= before - fd.dirty_bytes

    # An application that fsyncs a file after every write (a database's log) pays,
    # before the upload to a sync target can start, the FSYNC request's round trip and
    # the commit. Once that file's last KICK_STREAK fsyncs each followed exactly one
    # write, its next small write is committed and its tail sent before the write is
    # answered: the fsync that follows finds the upload on its way. (Committing first
    # and answering after, not the other way round: the application waits for the
    # upload anyway, and the reply and a background task would only delay its start.)
    # A second write before the fsync breaks the rhythm; nothing changes without sync
    # targets. (Sending data before it is asked to be durable promises nothing more:
    # it is just early.)
    KICK_STREAK = 2
    KICK_MAX = 256 * 1024

    async def fsync(self, ino: int) -> None:
        fd = self.files.get(ino)
        if fd is not None:
            fd.fsync_streak = fd.fsync_streak + 1 if fd.writes_since_fsync == 1 else 0
            fd.writes_since_fsync = 0
        await self.flush(ino)
        await self.vol.sync()

    def _kick_due(self, fd: FileData, size: int) -> bool:
        return (
            fd.fsync_streak >= self.KICK_STREAK
            and fd.writes_since_fsync == 1  # only the first write after an fsync
            and size <= self.KICK_MAX
            and getattr(self.vol, "replicate_soon", None) is not None
        )

    async def flush_some(self) -> None:
        """Under memory pressure: flush the files holding the most dirty bytes first."""
        for ino in sorted(self.files, key=lambda k: -self.files[k].dirty_bytes):
            if self.dirty_bytes <= self.dirty_limit // 2:
                break
            await self.flush(ino)

    async def flush_old(self) -> None:
        """Timer: commit buffers older than `flush_after` so a crash loses little."""
        cutoff = time.monotonic() - self.flush_after
        for ino in [k for k, f in self.files.items() if f.dirty and f.dirty_since <= cutoff]:
            await self.flush(ino)

    async def flush_all(self) -> None:
        """Commit every buffer and sync; one file that cannot be saved does not stop the
        others from trying (each may fit where the first did not)."""
        failed: list[tuple[int, Exception]] = []
        with contextlib.suppress(OSError, VaultsyncError):
            await self.commit_closed()  # together first; whatever fails is retried below
        for ino in list(self.files):
            try:
                await self.flush(ino)
            except (OSError, VaultsyncError) as e:
                failed.append((ino, e))
        await self.vol.sync()
        if failed:
            inos = ", ".join(str(ino) for ino, _ in failed[:10])
            more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
            raise VolumeError(
                f"the unsynced changes of {len(failed)} file(s) (inodes {inos}{more}) could "
                f"not be written to the journal: {failed[0][1]}. They were never fsynced; "
                "what was fsynced before is safe"
            )

    def touch_atime(self, ino: int) -> None:
        """relatime: update atime on read only when it is older than mtime/ctime or a day."""
        if self.vol.read_only:
            return  # a point in time keeps its times; a fenced volume takes no write
        i = self.cat.inode(ino)
        if i is None:
            return
        now = time.time_ns()
        if i.atime_ns <= i.mtime_ns or i.atime_ns <= i.ctime_ns or now - i.atime_ns > 86400e9:
            self.vol.commit_nowait([_set_inode(replace(i, atime_ns=now))])

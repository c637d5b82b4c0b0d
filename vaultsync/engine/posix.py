"""POSIX's terms, as both parts of `FileSystem` answer in them.

The namespace (filesystem.py) and the file contents (filewrites.py,
filereads.py) refuse with the same `FsError`, meet the same limits (ext4's,
so that applications find them where they would on a local disk) and build
the same catalog ops from an inode. Nothing here holds state.
"""

from __future__ import annotations

import errno
import os
import stat

from vaultsync.engine.catalog import Inode
from vaultsync.format.txn import SetInode

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


def set_inode(i: Inode) -> SetInode:
    """The op that stores `i` as it stands: SetInode replaces every attribute, so a
    change is committed as the inode read with its changed fields `replace`d."""
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


def clamp_time(ns: int | None) -> int | None:
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


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


def check_xattr_name(name: bytes) -> None:
    """Linux's namespaces only, as ext4 and tmpfs answer: anything else is EOPNOTSUPP."""
    if not name or len(name) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE)
    if not name.startswith(XATTR_NAMESPACES):
        raise FsError(errno.EOPNOTSUPP)
    if name in XATTR_NAMESPACES:
        raise FsError(errno.EINVAL)

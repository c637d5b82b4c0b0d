"""FUSE mounts: what is mounted where, fusermount, stale mounts, mounting and tuning one.

Nothing here knows what is served: the mount daemon (vaultsync/daemon/) wires
the volume, replication and the API behind the operations it mounts here.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from vaultsync.errors import VaultsyncError

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


def fusermount() -> str:
    """The FUSE unmount helper (fuse3's fusermount3, else the older fusermount).

    /usr/bin and /bin are searched even when PATH leaves them out.
    """
    for name in ("fusermount3", "fusermount"):
        for d in [*os.environ.get("PATH", "/usr/bin:/bin").split(":"), "/usr/bin", "/bin"]:
            p = os.path.join(d, name)
            if os.access(p, os.X_OK):
                return p
    raise MountError("fusermount3 not found; install the fuse3 package (apt-get install fuse3)")


def lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(
        [fusermount(), "-u", "-z", str(mountpoint)],
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


def init_fuse(ops: Operations, mountpoint: Path, name: str, *, read_only: bool) -> None:
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


class StopSignal:
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

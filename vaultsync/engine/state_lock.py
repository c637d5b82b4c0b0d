"""One process at a time has a state directory open: the lock and the name of its holder.

`mount.lock` is held with flock() for the life of the process that has the
volume open (a mount daemon, salvage, GC of an unmounted volume); the kernel
drops it when the process dies, so a kill -9 never leaves a lock that blocks
the next one. `mount.pid` names the mount daemon that holds it: for the
message a second opener gets, and for the commands that signal the daemon
(`gc` on a mounted volume, `targets`, `migrate`).
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from vaultsync.errors import VaultsyncError
from vaultsync.format.state_layout import StateDir


class VolumeInUseError(VaultsyncError):
    """Another process holds the state directory (a mount, most often)."""


def take_lock(state_dir: Path) -> IO[str]:
    """Hold the state directory for this process, or say who holds it.

    The lock lasts until the returned file is closed (or the process ends).
    """
    f = open(StateDir(state_dir).lock, "a+")  # noqa: SIM115 - held for the whole mount
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        pid = read_pid(state_dir)
        who = f" by process {pid}" if pid else ""
        raise VolumeInUseError(
            f"the volume in {state_dir} is already mounted{who}; "
            "unmount it first (vaultsync umount MOUNTPOINT)"
        ) from None
    return f


def read_pid(state_dir: Path) -> int | None:
    """The PID `mount.pid` names; None when there is no such file or it is unreadable.

    Only a hint: the process may have died since. A held lock is the proof.
    """
    try:
        text = StateDir(state_dir).pid.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def lock_holder(state_dir: Path) -> int | None:
    """The PID of the process holding the state directory now; None when none does.

    A free lock means no holder, whatever a stale `mount.pid` says; a held one
    is named by `mount.pid` (None if that file cannot tell).
    """
    try:
        f = open(StateDir(state_dir).lock)  # noqa: SIM115 - closed below
    except OSError:
        return None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_pid(state_dir)
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
    finally:
        f.close()

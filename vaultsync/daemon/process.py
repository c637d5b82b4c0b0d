"""The mount daemon seen from outside: start one, unmount and wait for it, signal it.

What the command line does to a daemon it does not run in: `mount --daemon`
starts one and returns once the mount answers; `umount` has it save what it
buffers, unmounts, and waits until the process has finished; `targets` and
`migrate` ask it to re-read its targets. The daemon is found by its command
line (the mount point is its last argument) or by the state directory's lock
and `mount.pid`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vaultsync.engine.state_lock import lock_holder
from vaultsync.errors import OUT_OF_SPACE
from vaultsync.fuse.mount import MountError, fusermount, mounted_at


def point_runtime_file(mountpoint: Path, suffix: str) -> Path:
    """Default log or PID file of a point-in-time mount daemon: it has no state
    directory, so a file in the temp directory named after the mount point."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"vaultsync-point-{digest}.{suffix}"


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
        [fusermount(), "-u", str(mountpoint)], capture_output=True, text=True, timeout=60
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

    The daemon holds the state directory's lock for its whole life: whoever
    holds it is the daemon.
    """
    pid = lock_holder(state_dir)
    if pid is None or not _running(pid):
        return None
    os.kill(pid, signal.SIGHUP)
    return pid

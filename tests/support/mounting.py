"""A real vaultsync mount in a subprocess, for tests: start, kill -9, unmount, remount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vaultsync.fuse.mount import lazy_unmount, mounted_at


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`vaultsync ARGS...` in a child process, as an operator runs it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "vaultsync", *args], capture_output=True, text=True, timeout=timeout
    )


def fsync_path(path: Path) -> None:
    """fsync a file by name (through the mount: the daemon commits and syncs it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_mount(
    config: Path, mountpoint: Path, log: Path, timeout: float = 30
) -> subprocess.Popen[bytes]:
    """`vaultsync mount CONFIG MOUNTPOINT` in a child process, its output appended to `log`;
    returns once the mountpoint answers (AssertionError with the log's end otherwise)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vaultsync", "mount", str(config), str(mountpoint)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mount exited: {log.read_text(errors='replace')[-3000:]}")
        if mounted_at(mountpoint) is not None:
            try:
                os.stat(mountpoint)
                return proc
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"mount did not come up: {log.read_text(errors='replace')[-3000:]}")


@dataclass
class Mount:
    """One volume (state + config) and, while mounted, its daemon process."""

    root: Path
    config: Path
    mountpoint: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, root: Path, volume_toml: str = "") -> Mount:
        root.mkdir(parents=True, exist_ok=True)
        cfg = root / "vs.toml"
        cfg.write_text(f'[volume]\nname = "t"\nstate_dir = "state"\n{volume_toml}')
        res = subprocess.run(
            [sys.executable, "-m", "vaultsync", "init", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        mnt = root / "mnt"
        mnt.mkdir()
        return cls(root, cfg, mnt)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "mount.log"

    def start(self, timeout: float = 30) -> None:
        self.proc = start_mount(self.config, self.mountpoint, self.log, timeout)

    def umount(self) -> None:
        res = subprocess.run(
            [sys.executable, "-m", "vaultsync", "umount", str(self.mountpoint)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        if self.proc is not None:
            self.proc.wait(30)
            self.proc = None

    def kill9(self) -> None:
        """SIGKILL the daemon (the crash drill), then detach the dead mount."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None
        lazy_unmount(self.mountpoint)

    def cleanup(self) -> None:
        """Teardown: never leave a mount or a process behind, whatever state we are in."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.umount()
            except Exception:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None
        if mounted_at(self.mountpoint) is not None:
            lazy_unmount(self.mountpoint)


class PointMount:
    def __init__(self, config: Path, mountpoint: Path, target: str, at: str | None) -> None:
        args = [sys.executable, "-m", "vaultsync", "mount", str(config), str(mountpoint)]
        args += ["--from", target] + (["--at", at] if at else [])
        self.mountpoint = mountpoint
        self.log = mountpoint.parent / f"point-{uuid.uuid4().hex[:6]}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.log.read_text())
            if mounted_at(mountpoint) is not None:
                return
            time.sleep(0.05)
        raise AssertionError("point mount did not come up: " + self.log.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if mounted_at(self.mountpoint) is not None:
            lazy_unmount(self.mountpoint)


def tree_of(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(p.relative_to(root)) + "/"] = oct(p.lstat().st_mode)
        for f in filenames:
            p = Path(dirpath) / f
            st = p.lstat()
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            else:
                out[str(p.relative_to(root))] = (oct(st.st_mode), st.st_size, p.read_bytes())
    return out

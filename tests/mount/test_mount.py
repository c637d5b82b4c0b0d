"""Mount lifecycle: umount flushes, a second mount is refused, stale mounts are cleaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.mounting import Mount
from vaultsync.fuse.mount import READ_AHEAD_KB, mounted_at


def test_data_survives_umount_and_remount(mounted: Mount) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (mounted.mountpoint / "f").write_bytes(data)
    (mounted.mountpoint / "d").mkdir()
    os.symlink("../f", mounted.mountpoint / "d" / "link")
    mounted.umount()
    assert mounted_at(mounted.mountpoint) is None
    mounted.start()
    assert (mounted.mountpoint / "f").read_bytes() == data
    assert (mounted.mountpoint / "d" / "link").read_bytes() == data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_flushes_and_unmounts(mounted: Mount, sig: signal.Signals) -> None:
    """SIGTERM and SIGINT flush and unmount: no mount is left behind (stale, ENOTCONN)."""
    (mounted.mountpoint / "f").write_bytes(b"closed, not fsynced")
    assert mounted.proc is not None
    os.kill(mounted.proc.pid, sig)
    assert mounted.proc.wait(60) == 0, mounted.log.read_text()[-2000:]
    mounted.proc = None
    assert mounted_at(mounted.mountpoint) is None
    mounted.start()
    assert (mounted.mountpoint / "f").read_bytes() == b"closed, not fsynced"


def test_second_mount_of_the_same_volume_is_refused(mounted: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "vaultsync", "mount", str(mounted.config), str(other)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "already mounted" in res.stderr and "Traceback" not in res.stderr


def test_fsynced_data_survives_kill9_and_stale_mount_is_cleaned(mounted: Mount) -> None:
    data = os.urandom(200_000)
    with open(mounted.mountpoint / "durable", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert mounted.proc is not None
    os.kill(mounted.proc.pid, 9)
    mounted.proc.wait(30)
    mounted.proc = None
    # The dead mount is still in the mount table; the next mount must clean it up itself.
    assert mounted_at(mounted.mountpoint) is not None
    mounted.start()
    assert (mounted.mountpoint / "durable").read_bytes() == data


def test_mount_errors_are_one_line(tmp_path: Path) -> None:
    m = Mount.create(tmp_path / "v")
    res = subprocess.run(
        [sys.executable, "-m", "vaultsync", "mount", str(m.config), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr


def test_mount_raises_the_kernel_read_ahead(mounted: Mount) -> None:
    """128 KiB read-ahead would cut sequential reads into 128 KiB round trips."""
    dev = os.stat(mounted.mountpoint).st_dev
    ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    if os.geteuid() != 0:
        pytest.skip("raising read-ahead needs root")
    # The daemon raises it from a thread just after the kernel's INIT, which can be a
    # moment after the mount first answers: give it that moment, no more.
    deadline = time.monotonic() + 5
    while int(ra.read_text()) != READ_AHEAD_KB and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(ra.read_text()) == READ_AHEAD_KB

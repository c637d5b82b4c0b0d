"""Fault drill: the disk under the state directory fills up while the mount is in use.

The state directory lives on a small tmpfs, next to a ballast file that the test
deletes to give space back. What a full disk must not do: lose or tear anything
an fsync acknowledged, hand out EIO or a traceback where ext4 says ENOSPC, grow
the daemon's buffers without bound, or let `vaultsync umount` throw away what
it could still save. What it must do: carry on by itself once space is back.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mounting import Mount, cli, fsync_path

MIB = 1 << 20
PAGE = 4096


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path, limit: int) -> tuple[list[bytes], OSError | None]:
    """Write 1 MiB pieces of fresh random bytes (no dedup, no compression) until the disk
    refuses, then fsync; the pieces handed to write() and the error that stopped us."""
    pieces: list[bytes] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(limit):
            piece = os.urandom(MIB)
            os.write(fd, piece)
            pieces.append(piece)
        os.fsync(fd)
    except OSError as e:
        return pieces, e
    finally:
        os.close(fd)
    return pieces, None


def test_a_full_disk_says_enospc_loses_nothing_fsynced_and_recovers(small_disk: Path) -> None:
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(8 * MIB))
    m = Mount.create(small_disk / "v")
    m.start()
    try:
        keep = m.mountpoint / "keep"
        keep.write_bytes(b"acknowledged" * 1000)
        fsync_path(keep)
        pieces, err = _fill(m.mountpoint / "big", limit=80)
        assert err is not None, "80 MiB fitted on a 40 MiB disk"
        assert err.errno == errno.ENOSPC, f"a full disk said {err!r}, not ENOSPC"
        # The daemon is alive and serves what it has; fsynced data is intact.
        assert keep.read_bytes() == b"acknowledged" * 1000
        assert sorted(os.listdir(m.mountpoint)) == ["big", "keep"]
        # Refused while the disk is full: unmounting now would drop the buffered changes.
        res = cli("umount", str(m.mountpoint), timeout=60)
        assert res.returncode == 1 and "stays mounted" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert os.path.ismount(m.mountpoint)
        # Space comes back: writing goes on without a remount.
        ballast.unlink()
        after = m.mountpoint / "after"
        after.write_bytes(b"later" * 100)
        fsync_path(after)
        # The daemon still holds more of `big` than fits: the operator gives it up.
        res = cli("umount", "--force", str(m.mountpoint), timeout=60)
        assert res.returncode == 0, res.stderr
        assert m.proc is not None and m.proc.wait(30) is not None
        m.proc = None
        assert not os.path.ismount(m.mountpoint)
    finally:
        m.cleanup()
    log = m.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "disk is full" in log
    m.start()
    try:
        assert (m.mountpoint / "keep").read_bytes() == b"acknowledged" * 1000
        assert (m.mountpoint / "after").read_bytes() == b"later" * 100
        # What the disk refused may be missing (zeros, or cut short), never torn or garbage.
        big = (m.mountpoint / "big").read_bytes()
        assert len(big) <= len(pieces) * MIB + MIB
        for off in range(0, len(big), PAGE):
            page = big[off : off + PAGE]
            i = off // MIB
            wrote = pieces[i][off % MIB : off % MIB + len(page)] if i < len(pieces) else b""
            assert page in (wrote, bytes(len(page))), f"garbage at offset {off}"
    finally:
        m.cleanup()


def test_mount_on_a_full_disk_explains_itself(small_disk: Path) -> None:
    m = Mount.create(small_disk / "v")
    m.start()
    (m.mountpoint / "f").write_bytes(b"x" * 1000)
    m.umount()
    with open(small_disk / "ballast", "wb") as f:  # every byte the disk has left
        with pytest.raises(OSError) as e:
            while True:
                f.write(bytes(MIB))
                f.flush()
        assert e.value.errno == errno.ENOSPC
    res = subprocess.run(
        [sys.executable, "-m", "vaultsync", "mount", str(m.config), str(m.mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Free some space" in res.stderr, res.stderr  # and nothing else to read
    assert "Traceback" not in res.stderr, res.stderr
    assert not os.path.ismount(m.mountpoint)
    (small_disk / "ballast").unlink()
    m.start()
    try:
        assert (m.mountpoint / "f").read_bytes() == b"x" * 1000
    finally:
        m.cleanup()

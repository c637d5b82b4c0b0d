"""Disaster drill: site A writes; its local state is destroyed; site B mounts any point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.mounting import Mount, PointMount, tree_of
from tests.support.targets import sync_and_async_targets
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.fuse.mount import lazy_unmount, mounted_at


def _keys(p: LocalProvider, bucket: str) -> list[str]:
    c = p.client()
    try:
        page = c.list_objects_v2(Bucket=bucket, MaxKeys=1000)
        return [o["Key"] for o in page.get("Contents", [])]
    finally:
        c.close()


@pytest.mark.parametrize("checkpoints", [False, True], ids=["replay", "checkpoints"])
def test_any_point_mounts_from_each_target_after_site_a_is_destroyed(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider, checkpoints: bool
) -> None:
    bucket = f"dr-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    targets = sync_and_async_targets(seaweedfs, rclone, bucket)
    repl = (
        "[replication]\ncheckpoint_every = 5\ncheckpoint_check = 0.2\n"
        if checkpoints
        else "[replication]\ncheckpoint_every = 0\n"
    )
    a = Mount.create(
        tmp_path / "siteA", 'segment_size = "1MiB"\nsegment_max_age = 0.3\n' + repl + targets
    )
    a.start()
    recorded: list[tuple[str, dict[str, object]]] = []
    try:
        mnt = a.mountpoint
        for round_no in range(3):
            (mnt / f"dir{round_no}").mkdir()
            for i in range(5):
                (mnt / f"dir{round_no}" / f"f{i}").write_bytes(os.urandom(1000 * (i + 1)))
            (mnt / "shared").write_bytes(f"version {round_no}".encode() * 100)
            os.symlink(f"dir{round_no}", mnt / f"link{round_no}")
            if round_no == 1:
                os.rename(mnt / "dir0" / "f0", mnt / "dir1" / "moved")
                os.unlink(mnt / "dir0" / "f1")
            fd = os.open(mnt / "shared", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            time.sleep(1.0 if checkpoints else 0.05)  # shipped, then checkpointed
            now = time.time_ns()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9))
            stamp += f".{now % 10**9:09d}Z"
            recorded.append((stamp, tree_of(mnt)))
            time.sleep(0.05)
        a.umount()
    finally:
        a.cleanup()
    if checkpoints:
        for p in (seaweedfs, rclone):
            c = p.client()
            listed = c.list_objects_v2(Bucket=bucket, Prefix="v/checkpoints/").get("Contents", [])
            c.close()
            assert listed, f"no checkpoint reached {p.kind}"
    # Site A is gone: its whole local state.
    import shutil

    shutil.rmtree(a.state_dir)
    b_root = tmp_path / "siteB"
    b_root.mkdir()
    b_cfg = b_root / "vs.toml"
    b_cfg.write_text('[volume]\nname = "t"\nstate_dir = "unused"\n' + targets)
    used_checkpoint = False
    for target in ("sw", "rc"):
        for stamp, tree in recorded:
            mp = b_root / f"mnt-{target}-{len(stamp)}-{uuid.uuid4().hex[:4]}"
            mp.mkdir()
            pm = PointMount(b_cfg, mp, target, stamp)
            try:
                assert tree_of(mp) == tree, f"{target} at {stamp}"
                used_checkpoint |= "from checkpoint" in pm.log.read_text()
                # Read-only: a point in time cannot be changed.
                try:
                    (mp / "new").write_bytes(b"x")
                    raise AssertionError("write to a point-in-time mount succeeded")
                except OSError as e:
                    assert e.errno == 30  # EROFS
            finally:
                pm.close()
    assert used_checkpoint == checkpoints


def test_bad_points_are_clear_errors(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    bucket = f"dr-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    targets = sync_and_async_targets(seaweedfs, rclone, bucket)
    a = Mount.create(tmp_path / "siteA", targets)
    a.start()
    try:
        (a.mountpoint / "x").write_bytes(b"x")
        a.umount()
    finally:
        a.cleanup()
    mp = tmp_path / "mp"
    mp.mkdir()
    for at, needle in (
        ("1999-01-01T00:00:00Z", "before the first point"),
        ("no-such-snap", "no snapshot named 'no-such-snap'"),
        ("999999", "holds points up to LSN"),
    ):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "vaultsync",
                "mount",
                str(a.config),
                str(mp),
                "--from",
                "sw",
                "--at",
                at,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 1, res.stderr
        assert needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    # A site whose config names another volume than the bucket holds (a wrong bucket or
    # prefix): refused by every command that recovers, and promote takes no lease.
    other = tmp_path / "other.toml"
    other.write_text(a.config.read_text().replace('name = "t"', 'name = "payroll"', 1))
    leases = sorted(k for k in _keys(seaweedfs, bucket) if "lease" in k)
    for args in (
        ["mount", str(other), str(mp), "--from", "sw"],
        ["restore", str(other), "/x", str(tmp_path / "out"), "--from", "sw"],
        ["promote", str(other), "--from", "sw"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "vaultsync", *args], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 1, (args, res.stderr)
        assert "holds volume 't'" in res.stderr and "'payroll'" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert sorted(k for k in _keys(seaweedfs, bucket) if "lease" in k) == leases
    assert not (tmp_path / "out").exists()


def test_snapshots_and_points(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    import json

    bucket = f"dr-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    a = Mount.create(tmp_path / "siteA", sync_and_async_targets(seaweedfs, rclone, bucket))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vaultsync", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    a.start()
    try:
        (a.mountpoint / "f").write_bytes(b"before")
        a.umount()
        assert cli("snapshot", "create", str(a.config), "first").returncode == 0
        dup = cli("snapshot", "create", str(a.config), "first")
        assert dup.returncode == 1 and "already exists" in dup.stderr
        bad = cli("snapshot", "create", str(a.config), "../evil")
        assert bad.returncode == 1 and "invalid" in bad.stderr
        a.start()
        (a.mountpoint / "f").write_bytes(b"after")
        a.umount()
    finally:
        a.cleanup()
    snaps = json.loads(cli("snapshot", "list", str(a.config), "--json").stdout)
    assert [(s["name"], sorted(s["targets"])) for s in snaps] == [("first", ["rc", "sw"])]
    pts = json.loads(cli("points", str(a.config), "--json").stdout)
    assert {p["target"] for p in pts} == {"sw", "rc"}
    assert all(p["first_lsn"] == 1 and p["last_lsn"] > snaps[0]["lsn"] for p in pts)
    mp = tmp_path / "mp"
    mp.mkdir()
    for at, want in (("first", b"before"), (None, b"after")):
        pm = PointMount(a.config, mp, "rc", at)
        try:
            assert (mp / "f").read_bytes() == want
        finally:
            pm.close()
    assert cli("snapshot", "delete", str(a.config), "first").returncode == 0
    gone = cli("snapshot", "delete", str(a.config), "first")
    assert gone.returncode == 1 and "no snapshot named" in gone.stderr


def test_restore_a_tree_as_it_was(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    bucket = f"dr-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    a = Mount.create(tmp_path / "siteA", sync_and_async_targets(seaweedfs, rclone, bucket))
    ref = tmp_path / "ref"
    big = b"B" * 3_000_000 + os.urandom(100_000)
    a.start()
    try:
        for root in (a.mountpoint, ref):
            (root / "proj" / "sub").mkdir(parents=True)
            (root / "proj" / "big").write_bytes(big)
            (root / "proj" / "sub" / "small").write_bytes(b"hello")
            os.link(root / "proj" / "sub" / "small", root / "proj" / "hard")
            os.symlink("sub/small", root / "proj" / "sym")
            os.setxattr(root / "proj" / "big", "user.tag", b"kept")
            os.chmod(root / "proj" / "sub", 0o750)
            os.utime(
                root / "proj" / "big", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321)
            )
        a.umount()
    finally:
        a.cleanup()

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "vaultsync",
                "restore",
                str(a.config),
                "/proj",
                str(tmp_path / "out"),
                "--from",
                "rc",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    res = run()
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert tree_of(out) == tree_of(ref / "proj")
    assert os.stat(out / "big").st_mtime_ns == 1_600_000_000_987_654_321
    assert os.getxattr(out / "big", "user.tag") == b"kept"
    assert os.stat(out / "hard").st_ino == os.stat(out / "sub" / "small").st_ino
    # Resumable: a second run finds everything in place; a changed file is refused.
    again = run()
    assert again.returncode == 0 and "already there" in again.stdout
    (out / "sub" / "small").write_bytes(b"changed locally")
    refused = run()
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert run("--force").returncode == 0
    assert (out / "sub" / "small").read_bytes() == b"hello"
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaultsync",
            "restore",
            str(a.config),
            "/nope",
            str(tmp_path / "o2"),
            "--from",
            "rc",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_point_mount_as_a_daemon_and_its_umount(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    """`mount --from --daemon` returns once mounted, with a PID file and a log file,
    like the writer's daemon mode; `vaultsync umount` stops it and waits for it."""
    bucket = f"dr-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    a = Mount.create(tmp_path / "siteA", sync_and_async_targets(seaweedfs, rclone, bucket))
    a.start()
    try:
        (a.mountpoint / "f").write_bytes(b"as it was")
        a.umount()
    finally:
        a.cleanup()
    mp, pid_file, log = tmp_path / "mp", tmp_path / "run" / "pt.pid", tmp_path / "pt.log"
    mp.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vaultsync", *args], capture_output=True, text=True, timeout=120
        )

    pid = None
    try:
        res = cli(
            "mount", str(a.config), str(mp), "--from", "rc", "--daemon",
            "--pid-file", str(pid_file), "--log-file", str(log),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert mounted_at(mp) is not None, "returned before the mount was up"
        pid = int(pid_file.read_text().split()[0])
        assert f"pid {pid}" in res.stdout
        assert (mp / "f").read_bytes() == b"as it was"
        assert "rebuilt" in log.read_text()
        res = cli("umount", str(mp))
        assert res.returncode == 0, res.stderr
        assert mounted_at(mp) is None
        # umount waited for the daemon: gone (not even a zombie), its PID file removed.
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
        assert not pid_file.exists()
        # The default places, when none are given.
        res = cli("mount", str(a.config), str(mp), "--from", "sw", "--at", "1", "--daemon")
        assert res.returncode == 0, res.stderr
        assert "pid file" in res.stdout and "log" in res.stdout
        assert not (mp / "f").exists(), "LSN 1 is the empty root"
        assert cli("umount", str(mp)).returncode == 0
        # A bad point is an error of the command itself, with the daemon's reason.
        res = cli("mount", str(a.config), str(mp), "--from", "sw", "--at", "nosuch", "--daemon")
        assert res.returncode == 1 and "no snapshot named 'nosuch'" in res.stderr, res.stderr
    finally:
        if mounted_at(mp) is not None:
            lazy_unmount(mp)
        if pid is not None and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

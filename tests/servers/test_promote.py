"""Failover: site B promotes while site A still runs; A is fenced, B's history continues."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.mounting import Mount, PointMount, cli
from tests.support.targets import sync_and_async_targets
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.control.lease import TEST_WINDOW_ENV

# A short lease window for the writer and the promoter alike (docs/format.md §2.4):
# the promotion below waits 2 x this for the old writer's lease to run out.
WINDOW = 1.5


def _fsync_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _targets(sw: LocalProvider, rc: LocalProvider, bucket: str) -> str:
    return "\n[replication]\nprobe_interval = 0.3\n" + sync_and_async_targets(sw, rc, bucket)


def test_promotion_fences_the_old_writer(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_WINDOW_ENV, str(WINDOW))
    bucket = f"pr-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    targets = _targets(seaweedfs, rclone, bucket)
    a = Mount.create(tmp_path / "siteA", "segment_max_age = 600\n" + targets)
    b_root = tmp_path / "siteB"
    b_root.mkdir()
    (b_root / "mnt").mkdir()
    b_cfg = b_root / "vs.toml"
    b_cfg.write_text('[volume]\nname = "t"\nstate_dir = "state"\n' + targets)
    b = Mount(b_root, b_cfg, b_root / "mnt")
    a.start()
    try:
        # A's fsynced write lives only in tail pieces of its open segment at sw.
        _fsync_write(a.mountpoint / "before", b"written by A before the failover")
        t0 = time.monotonic()
        res = cli("promote", str(b_cfg), "--from", "sw", timeout=120)
        assert res.returncode == 0, res.stderr
        assert "epoch 1" in res.stdout and "sealed here" in res.stdout
        # sw held tail pieces of A's open segment: B waited A's lease out before reading.
        waited = re.search(r"waiting \d+ s for the old writer's lease to expire", res.stderr)
        assert waited, res.stderr
        assert time.monotonic() - t0 >= 2 * WINDOW
        # A notices the lease within a few probes; its writes are then refused.
        deadline = time.monotonic() + 15
        refused = None
        while time.monotonic() < deadline and refused is None:
            try:
                _fsync_write(a.mountpoint / "after", b"A after being fenced")
            except OSError as e:
                refused = e.errno
            time.sleep(0.2)
        assert refused in (30, 5), "the old writer was never fenced"  # EROFS (or EIO)
        assert (a.mountpoint / "before").read_bytes().startswith(b"written by A")  # reads work
        b.start()
        assert (b.mountpoint / "before").read_bytes() == b"written by A before the failover"
        _fsync_write(b.mountpoint / "from_b", b"B continues the history")
        b.umount()
    finally:
        a.cleanup()
        b.cleanup()
    # The targets hold B's history: A's post-fence write is nowhere.
    mp = tmp_path / "check"
    mp.mkdir()
    for target in ("sw", "rc"):
        pm = PointMount(b_cfg, mp, target, None)
        try:
            assert (mp / "from_b").read_bytes() == b"B continues the history", target
            assert (mp / "before").exists(), target
            after = mp / "after"
            assert not after.exists() or after.read_bytes() != b"A after being fenced", target
        finally:
            pm.close()
    # A's salvage: what it committed that no target received as a whole segment.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaultsync",
            "salvage",
            str(a.config),
            "--json",
            "--out",
            str(tmp_path / "salvaged"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    salvaged = json.loads(res.stdout)
    assert "/before" in [f[0] for f in salvaged["files"]]
    assert (tmp_path / "salvaged" / "before").read_bytes() == b"written by A before the failover"
    status = json.loads((a.state_dir / "replication.json").read_text())
    assert status["targets"]  # A wrote its last status; its journal keeps the salvage
    assert any((a.state_dir / "journal").glob("*.seg"))


def test_a_promotion_that_could_not_rebuild_takes_no_lease(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    bucket = f"pr-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    targets = _targets(seaweedfs, rclone, bucket)
    a = Mount.create(tmp_path / "siteA", "segment_max_age = 0.2\n" + targets)
    a.start()
    try:
        for i in range(3):
            _fsync_write(a.mountpoint / f"f{i}", b"x" * 1000)
            time.sleep(0.5)
    finally:
        a.umount()
    # As after garbage collection: the first segment is gone from the source.
    client = seaweedfs.client()
    try:
        client.delete_object(Bucket=bucket, Key="v/segments/0000000000000001.seg")
        b_root = tmp_path / "siteB"
        b_root.mkdir()
        b_cfg = b_root / "vs.toml"
        b_cfg.write_text('[volume]\nname = "t"\nstate_dir = "state"\n' + targets)
        res = cli("promote", str(b_cfg), "--from", "sw", timeout=120)
        assert res.returncode == 1 and "nothing was changed" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        keys = client.list_objects_v2(Bucket=bucket, Prefix="v/lease/").get("Contents", [])
        assert keys == [], "a lease was taken by a promotion that could not finish"
    finally:
        client.close()

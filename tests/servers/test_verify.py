"""Integrity: a copy damaged or deleted behind vaultsync's back is found and healed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from minio import Minio

from tests.support.mounting import Mount
from tests.support.targets import target_block
from vaultsync.commands.local_servers import LocalProvider


def _minio(p: LocalProvider) -> Minio:
    return Minio(
        p.endpoint.removeprefix("http://"),
        access_key=p.access_key,
        secret_key=p.secret_key,
        secure=False,
    )


def _two_target_volume(root: Path, sw: LocalProvider, rc: LocalProvider) -> tuple[Mount, str]:
    bucket = f"v-{uuid.uuid4().hex[:12]}"
    sw.create_bucket(bucket)
    rc.create_bucket(bucket)
    toml = 'segment_size = "1MiB"\n'
    toml += target_block("sw", sw, bucket, "sync") + target_block("rc", rc, bucket, "async")
    return Mount.create(root, toml), bucket


def _verify(m: Mount, *extra: str) -> tuple[int, dict[str, Any]]:
    res = subprocess.run(
        [sys.executable, "-m", "vaultsync", "verify", str(m.config), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def _segments(c: Minio, bucket: str) -> list[str]:
    return sorted(o.object_name for o in c.list_objects(bucket, prefix="v/segments/"))


def test_verify_finds_and_heals_damaged_and_missing_copies(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    m, bucket = _two_target_volume(tmp_path / "vol", seaweedfs, rclone)
    m.start()
    try:
        for i in range(6):
            (m.mountpoint / f"f{i}").write_bytes(os.urandom(400_000))
        m.umount()
    finally:
        m.cleanup()
    sw, rc = _minio(seaweedfs), _minio(rclone)
    segs = _segments(sw, bucket)
    assert len(segs) >= 2 and segs == _segments(rc, bucket)
    # Behind vaultsync's back: one copy damaged at rclone, one deleted at SeaweedFS.
    obj = rc.get_object(bucket, segs[0])
    good = obj.read()
    obj.close()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    rc.put_object(bucket, segs[0], io.BytesIO(bytes(bad)), len(bad))
    sw.remove_object(bucket, segs[1])

    rc_code, report = _verify(m, "--no-heal")
    assert rc_code == 2
    by_name = {t["name"]: t for t in report["targets"]}
    assert by_name["rc"]["corrupt"] == [1] and by_name["sw"]["missing"] == [2]

    code, report = _verify(m)
    assert code == 0, report
    assert report["clean"] is False  # it found problems ...
    code, report = _verify(m)
    assert code == 0 and report["clean"] is True  # ... and healed them all
    obj = rc.get_object(bucket, segs[0])
    assert obj.read() == good
    obj.close()
    assert _segments(sw, bucket) == segs


def test_read_falls_back_to_a_target_and_restores_the_local_segment(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    m, bucket = _two_target_volume(tmp_path / "vol", seaweedfs, rclone)
    data = os.urandom(300_000)
    m.start()
    try:
        (m.mountpoint / "precious").write_bytes(data)
        m.umount()
        local = m.state_dir / "journal" / "0000000000000001.seg"
        original = local.read_bytes()
        local.unlink()  # the local copy is lost
        sw = _minio(seaweedfs)
        sw.remove_object(bucket, "v/segments/0000000000000001.seg")  # and one target's too
        m.start()
        assert (m.mountpoint / "precious").read_bytes() == data
        m.umount()
    finally:
        m.cleanup()
    assert local.read_bytes() == original  # restored from the surviving target
    code, _report = _verify(m)
    assert code == 0

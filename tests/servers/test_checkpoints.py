"""Checkpoints describe only what their target holds, arrive promptly, and end every clean unmount.

Checked against the buckets themselves with the S3 client (not the writer's
view): every checkpoint key's LSN is at most the newest LSN in the sealed
segments the same target holds, sampled while a writer keeps writing; after a
clean unmount (umount or SIGTERM) each target has a checkpoint of the last
LSN and recovery from it replays no segment; and recovery from a checkpoint
still applies the fsynced tail pieces a sync target got after it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.mounting import Mount
from tests.support.targets import sync_and_async_targets, target_for
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.config import Config, load_config
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.volume import Volume
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import parse_checkpoint_key, parse_segment_key
from vaultsync.format.txn import ROOT_INO
from vaultsync.points.recovery import PointSpec, SegmentCache, rebuild
from vaultsync.replication.replicator import Replicator
from vaultsync.store.objectstore import ObjectStore
from vaultsync.store.targets import init_volume

PREFIX = "v/"


class Bucket:
    """One target's bucket read with the S3 client: checkpoints and the LSNs its segments hold."""

    def __init__(self, p: LocalProvider, bucket: str) -> None:
        self.p, self.bucket = p, bucket
        self._last: dict[str, int] = {}  # segment key -> last LSN (segments never change)

    def keys(self, c: Any, sub: str) -> list[str]:
        out = []
        for page in c.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=PREFIX + sub
        ):
            out += [o["Key"][len(PREFIX) :] for o in page.get("Contents", [])]
        return out

    def checkpoints_and_held(self) -> tuple[list[int], int]:
        """(LSNs of the checkpoints, newest LSN in whole segments), listed in that order:
        a checkpoint seen first had its segments uploaded before it, so they are listed."""
        c = self.p.client()
        try:
            ckpts = [parse_checkpoint_key(k) for k in self.keys(c, "checkpoints/")]
            held = 0
            for k in self.keys(c, "segments/"):
                if parse_segment_key(k) is None:
                    continue
                if k not in self._last:
                    body = c.get_object(Bucket=self.bucket, Key=PREFIX + k)["Body"].read()
                    scan = seg.scan_segment(body, k)
                    assert scan.sealed and not scan.stop_reason, k
                    txns = [r.lsn for _, r in scan.records if r.type is seg.RecordType.TXN]
                    self._last[k] = max(txns, default=0)
                held = max(held, self._last[k])
        finally:
            c.close()
        return sorted(x[0] for x in ckpts if x is not None), held


async def _replayed(cfg_target: Any, scratch: Path) -> tuple[int | None, int, list[int]]:
    """Rebuild the newest point from one target: (checkpoint LSN, LSN, segments replayed)."""
    async with ObjectStore(cfg_target) as store:
        cache = SegmentCache(scratch / "segments", 1 << 30)
        rebuilt, _ = await rebuild(store, scratch, None, PointSpec(), cache)
        rebuilt.catalog.close()
        return rebuilt.checkpoint, rebuilt.lsn, rebuilt.segments


@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_clean_unmount_leaves_a_checkpoint_of_the_last_lsn_everywhere(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider, how: str
) -> None:
    bucket = f"ck-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    targets = sync_and_async_targets(seaweedfs, rclone, bucket)
    # Frequent checkpoints while writing; the sampler checks each one it sees.
    m = Mount.create(
        tmp_path / "a",
        'segment_size = "1MiB"\nsegment_max_age = 0.3\n'
        "[replication]\ncheckpoint_every = 4\ncheckpoint_check = 0.1\n" + targets,
    )
    buckets = {"sw": Bucket(seaweedfs, bucket), "rc": Bucket(rclone, bucket)}
    stop = threading.Event()
    seen: dict[str, set[int]] = {"sw": set(), "rc": set()}
    problems: list[str] = []

    def sample() -> None:
        while not stop.is_set():
            for name, b in buckets.items():
                ckpts, held = b.checkpoints_and_held()
                seen[name].update(ckpts)
                ahead = [c for c in ckpts if c > held]
                if ahead:
                    problems.append(f"{name}: checkpoints {ahead} ahead of segments to {held}")
            time.sleep(0.05)

    m.start()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for i in range(40):
            (m.mountpoint / f"f{i % 7}").write_bytes(os.urandom(20_000 + i))
            if i % 10 == 9:
                os.sync()
            time.sleep(0.05)
        time.sleep(1.5)  # the last periodic checkpoints reach both targets
        if how == "umount":
            m.umount()
        else:
            assert m.proc is not None
            os.kill(m.proc.pid, signal.SIGTERM)
            assert m.proc.wait(60) == 0, m.log.read_text()[-2000:]
            m.proc = None
    finally:
        stop.set()
        sampler.join(60)
        m.cleanup()
    assert not problems, problems[:5]
    assert all(len(s) >= 2 for s in seen.values()), f"few checkpoints seen while writing: {seen}"
    conf = load_config(m.config)
    for t in conf.targets:
        ckpts, held = buckets[t.name].checkpoints_and_held()
        assert ckpts and max(ckpts) == held, f"{t.name}: checkpoints {ckpts[-3:]}, held {held}"
        ck, lsn, replayed = asyncio.run(_replayed(t, tmp_path / f"r-{t.name}"))
        assert ck == lsn == held, (t.name, ck, lsn, held)
        assert replayed == [], f"{t.name}: replayed segments {replayed}"


def test_recovery_from_a_checkpoint_keeps_the_fsynced_tail_after_it(
    tmp_path: Path, seaweedfs: LocalProvider
) -> None:
    """A sync target holds tail pieces of the segment after a checkpoint's last whole one;
    rebuilding from that checkpoint must apply them (they are fsynced writes)."""
    cfg = Config.model_validate(
        {
            "volume": {"name": "tl", "state_dir": str(tmp_path / "state")},
            "targets": [target_for(seaweedfs, "sw", mode="sync").model_dump(mode="json")],
            "replication": {"checkpoint_every": 1, "checkpoint_check": 3600},
        }
    )

    async def go() -> tuple[int, int]:
        await init_volume(cfg, None)
        vol = await Volume.open(cfg.volume.state_dir, segment_max_age=3600)
        repl = Replicator(cfg, vol)
        await repl.start()
        fs = FileSystem(vol)
        try:
            node = fs.mknod(ROOT_INO, b"f", 0o100644, 0, 0, 0)
            await fs.write(node.ino, 0, b"before the checkpoint")
            await fs.fsync(node.ino)
            # The unmount path, here mid-life: seal, ship, checkpoint at LSN L.
            await vol.maybe_seal(force=True)
            await repl.drain()
            assert await repl.final_checkpoint() == ["sw"]
            ckpt_lsn = vol.last_lsn
            await fs.write(node.ino, 0, b"after, fsynced: in tail pieces only")
            await fs.fsync(node.ino)  # sync target: returns once the tail is there
            return ckpt_lsn, vol.last_lsn
        finally:
            await repl.stop()  # no unmount path: nothing more is sealed or shipped
            await vol.close()

    ckpt_lsn, last = asyncio.run(go())
    assert last > ckpt_lsn
    ck, lsn, replayed = asyncio.run(_replayed(cfg.targets[0], tmp_path / "r"))
    assert ck == ckpt_lsn and replayed == []
    assert lsn == last, "the fsynced transactions after the checkpoint were recovered"

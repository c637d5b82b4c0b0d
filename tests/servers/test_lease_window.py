"""Time-bounded writer leases (docs/format.md §2.4): what a sync writer may count as held
at a target, what a promoter must wait, and the race they close.

The race: a sync writer's fsync uploads a tail piece of its open segment while, at
another site, a promoter takes the next lease, lists the tail pieces and seals the
segment from them. If the piece lands after that listing and the writer still lets
the fsync return, an acknowledged write is not in the new history. The tests with
real mounts hold the writer's PUT in the fault proxy until the promotion is over,
so that ordering happens every time; with the old barrier (a HEAD of segments/N
beside the PUT) the held fsync returned and its record was missing at site B.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.mounting import Mount, cli
from tests.support.targets import target_block, target_for
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.config import Config
from vaultsync.control.lease import (
    LEASE_WINDOW,
    TEST_WINDOW_ENV,
    FencedError,
    lease_clock,
    lease_doc,
    lease_window,
    take_lease,
)
from vaultsync.control.promote import wait_out_old_lease
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.volume import Volume
from vaultsync.errors import ReadOnlyVolumeError
from vaultsync.format.bucket_layout import LEASES, segment_key, tail_key
from vaultsync.format.txn import ROOT_INO
from vaultsync.replication.replicator import Replicator
from vaultsync.replication.shipper import Shipper
from vaultsync.store.objectstore import ObjectStore
from vaultsync.store.targets import init_volume

# -- the acknowledgement rule, on one shipper ----------------------------------------------


@dataclass
class Rig:
    vol: Volume
    fs: FileSystem
    store: ObjectStore
    sh: Shipper
    ino: int
    lease_lists: int = 0  # listings of lease/ through the shipper's store
    written: int = 0

    async def fsync_more(self) -> None:
        """A committed, locally durable transaction: new bytes in the open segment."""
        await self.fs.write(self.ino, self.written, os.urandom(300))
        self.written += 300
        await self.fs.fsync(self.ino)

    def counted(self) -> bool:
        return bool(self.sh.holds(self.vol.durable_pos))


@pytest.fixture
async def rig(tmp_path: Path, seaweedfs: LocalProvider) -> AsyncIterator[Rig]:
    """A volume with one sync target and its shipper, driven by hand (no replicator:
    no health monitor checks the lease behind the test's back)."""
    cfg = Config.model_validate(
        {
            "volume": {"name": "lw", "state_dir": str(tmp_path / "state")},
            "targets": [target_for(seaweedfs, "sw", mode="sync").model_dump(mode="json")],
        }
    )
    await init_volume(cfg, None)
    vol = await Volume.open(cfg.volume.state_dir, segment_max_age=3600)
    async with ObjectStore(cfg.targets[0]) as store:
        sh = Shipper(cfg.targets[0], store, vol)
        fs = FileSystem(vol)
        node = fs.mknod(ROOT_INO, b"f", 0o100644, 0, 0, 0)
        r = Rig(vol, fs, store, sh, node.ino)
        real_list = store.list

        def counting_list(prefix: str = "", start_after: str = "") -> Any:
            if prefix == LEASES:
                r.lease_lists += 1
            return real_list(prefix, start_after)

        store.list = counting_list  # type: ignore[method-assign]
        try:
            await sh.resume()
            yield r
        finally:
            await vol.close()


async def test_resume_is_vouched_for_by_a_check_before_anything_counts(rig: Rig) -> None:
    # The fixture's resume() ran one check: a sync target counts nothing before it.
    assert rig.lease_lists == 1
    assert rig.sh.lease_checked_at > float("-inf")


async def test_first_piece_and_whole_segments_need_a_check_begun_after_the_upload(
    rig: Rig,
) -> None:
    rig.sh.lease_checked(lease_clock())  # fresh, but it began before the upload
    await rig.fsync_more()
    before = rig.lease_lists
    assert await rig.sh.step()
    assert rig.counted()
    assert rig.lease_lists == before + 1, "the first piece of a segment needs rule B"
    # Later pieces of the same segment: a check begun less than the window ago is enough.
    await rig.fsync_more()
    assert await rig.sh.step()
    assert rig.counted()
    assert rig.lease_lists == before + 1, "rule A: no request of its own"
    # A whole segment: rule B again, whatever the age of the last check.
    rig.sh.lease_checked(lease_clock())
    await rig.vol.maybe_seal(force=True)
    assert await rig.sh.step()
    assert rig.sh.sealed_wm == 1
    assert rig.lease_lists == before + 2
    # And the first piece of the next segment.
    await rig.fsync_more()
    assert await rig.sh.step()
    assert rig.counted()
    assert rig.lease_lists == before + 3


async def test_a_check_begun_too_long_ago_does_not_count(rig: Rig) -> None:
    await rig.fsync_more()
    assert await rig.sh.step()  # anchors the open segment (rule B)
    # The newest check began more than the window ago: the next piece is checked
    # inline, and counts because that check finds no newer lease.
    rig.sh.lease_checked_at = lease_clock() - lease_window() - 0.5
    await rig.fsync_more()
    before = rig.lease_lists
    assert await rig.sh.step()
    assert rig.counted() and rig.lease_lists == before + 1
    # Stale again, and now another site holds epoch 1: the piece is uploaded but
    # never counted, and the writer is fenced.
    rig.sh.lease_checked_at = lease_clock() - lease_window() - 0.5
    assert await take_lease(rig.store, lease_doc(1, 0, "sw"))
    await rig.fsync_more()
    held = rig.sh.tail_off
    with pytest.raises(FencedError, match="epoch 1"):
        await rig.sh.step()
    assert rig.sh.tail_off == held
    assert not rig.counted()
    pieces = [o.key async for o in rig.store.list("tails/")]
    assert tail_key(1, held, rig.vol.durable_pos[1]) in pieces, "the PUT itself happened"


async def test_a_check_begun_after_the_put_counts(rig: Rig) -> None:
    """Rule B: any check that began after the upload completed vouches for it, whatever
    its age (the shipper's own inline check, or the health monitor's)."""
    done = lease_clock()  # an upload completed now
    rig.sh.lease_checked_at = done - 0.001  # the newest check began just before
    before = rig.lease_lists
    await rig.sh._vouch(done, rule_a=False)
    assert rig.lease_lists == before + 1, "checked inline"
    assert rig.sh.lease_checked_at > done
    # A check that began after `done` is enough: no request, even long after.
    await rig.sh._vouch(done, rule_a=False)
    rig.sh.lease_checked_at = done + 0.001
    await rig.sh._vouch(done, rule_a=False)
    assert rig.lease_lists == before + 1
    # Rule A needs a check begun at most the window before now, B one begun after `done`.
    old = lease_clock() - lease_window() - 0.5
    rig.sh.lease_checked_at = old
    await rig.sh._vouch(old + 0.1, rule_a=True)  # the upload completed after it began
    assert rig.lease_lists == before + 2, "a check begun too long ago does not count"
    rig.sh.lease_checked_at = lease_clock() - lease_window() + 1.0
    await rig.sh._vouch(lease_clock(), rule_a=True)
    assert rig.lease_lists == before + 2, "one begun less than the window ago does"


async def test_a_fresh_check_counts_a_piece_landing_after_a_newer_lease(rig: Rig) -> None:
    """Rule A is a promise about time, not about the bucket: within the window the
    writer counts a piece although a promoter took a lease meanwhile. That is safe
    because the promoter waits 2 x the window before it reads the target (the race
    tests below), and the writer's next check fences it."""
    await rig.fsync_more()
    assert await rig.sh.step()
    rig.sh.lease_checked(lease_clock())
    assert await take_lease(rig.store, lease_doc(1, 0, "sw"))
    await rig.fsync_more()
    before = rig.lease_lists
    assert await rig.sh.step()
    assert rig.counted() and rig.lease_lists == before
    with pytest.raises(FencedError):
        await rig.sh.check_lease()


async def test_a_segment_sealed_by_another_writer_fences(rig: Rig) -> None:
    """With no HEAD on the tail path, the writer learns that a promoter sealed its open
    segment when it uploads that segment itself (conditional create)."""
    await rig.fsync_more()
    assert await rig.sh.step()
    await rig.store.put(segment_key(1), b"another writer's segment 1")
    await rig.fsync_more()
    assert await rig.sh.step()  # a tail piece: nothing asks about segments/1
    await rig.vol.maybe_seal(force=True)
    with pytest.raises(FencedError, match="another writer"):
        await rig.sh.step()
    assert rig.sh.sealed_wm == 0


# -- the health monitor keeps the check fresh ------------------------------------------------


async def test_monitor_checks_every_third_of_the_window_and_fences(
    tmp_path: Path, seaweedfs: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_WINDOW_ENV, "0.9")
    cfg = Config.model_validate(
        {
            "volume": {"name": "lm", "state_dir": str(tmp_path / "state")},
            "targets": [target_for(seaweedfs, "sw", mode="sync").model_dump(mode="json")],
            "replication": {"probe_interval": 60, "checkpoint_every": 0},
        }
    )
    await init_volume(cfg, None)
    vol = await Volume.open(cfg.volume.state_dir, segment_max_age=3600)
    repl = Replicator(cfg, vol)
    await repl.start()
    try:
        sh = repl.shippers[0]
        ages = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            ages.append(lease_clock() - sh.lease_checked_at)
        # A check every 0.3 s (plus its own duration), although probe_interval is 60 s.
        assert max(ages[10:]) < 0.9, ages
        async with ObjectStore(cfg.targets[0]) as store:
            assert await take_lease(store, lease_doc(1, 0, "sw"))
        deadline = time.monotonic() + 3
        while not vol.fenced and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert vol.fenced
    finally:
        await repl.stop()
        with contextlib.suppress(ReadOnlyVolumeError):  # fenced: nothing more is written
            await vol.close()


def test_window_is_a_constant_with_a_test_only_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_WINDOW_ENV, raising=False)
    assert lease_window() == LEASE_WINDOW == 10.0
    monkeypatch.setenv(TEST_WINDOW_ENV, "1.5")
    assert lease_window() == 1.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(TEST_WINDOW_ENV, bad)
        assert lease_window() == LEASE_WINDOW


# -- the promoter's wait -----------------------------------------------------------------------


async def test_promoter_waits_only_when_tail_pieces_follow_the_last_whole_segment(
    seaweedfs: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_WINDOW_ENV, "0.5")
    t = target_for(seaweedfs, "sw", mode="sync")
    said: list[str] = []
    async with ObjectStore(t) as store:
        # Nothing at all, then tail pieces of a segment that is whole already: no wait.
        assert await wait_out_old_lease(store, lease_clock(), said.append) == 0.0
        await store.put(segment_key(1), b"s1")
        await store.put(tail_key(1, 0, 100), b"x" * 100)
        assert await wait_out_old_lease(store, lease_clock(), said.append) == 0.0
        assert said == []
        # A piece of the segment after the last whole one: 2 x the window from the lease.
        await store.put(tail_key(2, 0, 100), b"x" * 100)
        leased = lease_clock() - 0.4
        waited = await wait_out_old_lease(store, leased, said.append)
        assert 0.5 <= waited <= 0.9
        assert lease_clock() - leased >= 1.0
        assert len(said) == 1 and "for the old writer's lease to expire" in said[0]
        # Already 2 x the window since the lease: nothing left to wait.
        assert await wait_out_old_lease(store, lease_clock() - 1.0, said.append) == 0.0


# -- the race, with real mounts -------------------------------------------------------------------

WINDOW = 2.0  # the test window: the promoter waits 4 s where tail pieces are open


def _fsync_append(fd: int, record: bytes) -> None:
    os.write(fd, record)
    os.fsync(fd)


def _record(i: int) -> bytes:
    return f"record {i:06d} acknowledged by fsync at site A\n".encode()


def _replication(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / "replication.json").read_text())["targets"]["sw"])
    except (OSError, ValueError, KeyError):
        return {}


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize(
    "open_tail",
    [True, False],
    ids=["piece-of-an-open-tail", "first-piece-of-a-segment"],
)
def test_promotion_loses_no_fsync_the_old_writer_acknowledged(
    tmp_path: Path,
    seaweedfs: LocalProvider,
    monkeypatch: pytest.MonkeyPatch,
    open_tail: bool,
) -> None:
    """Site A fsyncs records to a sync target through the fault proxy; the proxy holds one
    of A's tail PUTs while site B promotes, and lets it land only once the promotion is
    over, so it lands after B listed the tail pieces. Every record whose fsync returned
    at A must be in B's history.

    `open_tail`: the held piece extends a segment whose earlier pieces are at the
    target, so B must wait 2 x the window. Otherwise the held piece is the first of a
    new segment (the previous one sealed and shipped whole), B sees no open tail and
    does not wait; A must then not count that first piece without a check begun
    after its upload."""
    monkeypatch.setenv(TEST_WINDOW_ENV, str(WINDOW))  # A's daemon and B's promote alike
    bucket = f"lw-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)

    def targets(endpoint: str) -> str:
        return target_block("sw", seaweedfs, bucket, "sync", endpoint=endpoint, on_failure="block")

    # probe_interval 60: A's health probe would not notice B's lease during the test;
    # only the lease checks this design adds (every WINDOW/3) do.
    repl = "\n[replication]\nprobe_interval = 60\ncheckpoint_every = 0\nblock_timeout = 60\n"
    age = "600" if open_tail else "0.3"
    with FaultProxy.for_url(seaweedfs.endpoint) as proxy:
        a_toml = f"segment_max_age = {age}\n{repl}" + targets(proxy.endpoint)
        a = Mount.create(tmp_path / "siteA", a_toml)
        b_root = tmp_path / "siteB"
        (b_root / "mnt").mkdir(parents=True)
        b_cfg = b_root / "vs.toml"
        b_cfg.write_text(
            '[volume]\nname = "t"\nstate_dir = "state"\n' + repl + targets(seaweedfs.endpoint)
        )
        b = Mount(b_root, b_cfg, b_root / "mnt")
        acked: list[int] = []
        failed: list[BaseException] = []
        a.start()
        try:
            fd = os.open(a.mountpoint / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                for i in range(5):
                    _fsync_append(fd, _record(i))
                    acked.append(i)
                if not open_tail:
                    # The open segment ages out, is sealed and shipped whole, and its tail
                    # pieces go: nothing of an open segment is left at the target.
                    _wait_for(
                        lambda: (
                            _replication(a.state_dir).get("watermark_segment", 0) >= 1
                            and _replication(a.state_dir).get("lag_lsn") == 0
                        ),
                        30,
                        "A's segment to be shipped whole",
                    )
                    _wait_for(
                        lambda: not [k for k in _keys(seaweedfs, bucket) if "/tails/" in k],
                        30,
                        "A's tail pieces to be deleted",
                    )
                proxy.hold_requests("PUT", "/tails/")
                i = len(acked)

                def held_fsync() -> None:
                    try:
                        _fsync_append(fd, _record(i))
                        acked.append(i)
                    except OSError as e:
                        failed.append(e)

                writer = threading.Thread(target=held_fsync)
                writer.start()
                assert proxy.wait_held(1, 15), "A's tail PUT never reached the proxy"
                t0 = time.monotonic()
                res = cli("promote", str(b_cfg), "--from", "sw", timeout=120)
                took = time.monotonic() - t0
                assert res.returncode == 0, res.stderr
                assert "epoch 1" in res.stdout
                # The piece lands now, after B listed the tails (and sealed from them).
                proxy.release()
                writer.join(90)
                assert not writer.is_alive()
                # A goes on trying; nothing it acknowledges from now on may be lost either.
                for j in range(i + 1, i + 4):
                    try:
                        _fsync_append(fd, _record(j))
                        acked.append(j)
                    except OSError as e:
                        failed.append(e)
                        break
            finally:
                with contextlib.suppress(OSError):  # EROFS: close flushes, A is fenced
                    os.close(fd)
        finally:
            proxy.release()
            a.cleanup()
        assert proxy.held_total >= 1
        b.start()
        try:
            log = (b.mountpoint / "log").read_bytes()
        finally:
            b.cleanup()
    lost = [k for k in acked if _record(k) not in log]
    assert not lost, f"records acknowledged at A and missing at B's history: {lost}"
    assert log == b"".join(_record(k) for k in range(len(log) // len(_record(0))))
    # The held fsync was not acknowledged (its piece landed after B's rebuild), and A,
    # fenced, refused what came after.
    assert i not in acked and failed
    # B waited out A's lease only where it had to.
    if open_tail:
        assert "waiting" in res.stderr and "lease to expire" in res.stderr, res.stderr
        assert took >= 2 * WINDOW
    else:
        assert "waiting" not in res.stderr, res.stderr


def _keys(p: LocalProvider, bucket: str) -> list[str]:
    from minio import Minio

    host = p.endpoint.split("://", 1)[1]
    mc = Minio(host, access_key=p.access_key, secret_key=p.secret_key, secure=False)
    return [str(o.object_name) for o in mc.list_objects(bucket, prefix="v/", recursive=True)]

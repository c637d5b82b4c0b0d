"""Garbage collection against real targets: every retained point still recovers, exactly.

Random histories (hypothesis) of writes, overwrites with shared content (so
GC meets deduplication), patches (blocks stored as the bytes that differ from
another chunk, whose base GC must keep), deletes, snapshots, checkpoints and
GC runs, with GC
running concurrently with the writes. Afterwards, at each target, every point
`retained.json` promises rebuilds from that target alone and holds exactly
the tree the writer had at that LSN; every other point is refused with a
clear error; the live volume still reads everything; and the targets hold
fewer segments than were written.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.mounting import Mount, PointMount, cli
from tests.support.targets import sync_and_async_targets, target_for
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.config import Config
from vaultsync.engine.served import ServedVolume
from vaultsync.engine.volume import Volume
from vaultsync.format.bucket_layout import checkpoint_key, parse_segment_key
from vaultsync.format.patch import PatchPlan
from vaultsync.format.txn import (
    ROOT_INO,
    DropDirent,
    DropInode,
    SetBlocks,
    SetDirent,
    SetInode,
    TruncateBlocks,
)
from vaultsync.points.gc_documents import read_retained
from vaultsync.points.recovered import RecoveredVolume
from vaultsync.points.recovery import PointError, PointSpec, SegmentCache, rebuild
from vaultsync.points.snapshots import create_snapshot, delete_snapshot
from vaultsync.replication.gc import GcReport
from vaultsync.replication.replicator import Replicator
from vaultsync.store.objectstore import ObjectStore
from vaultsync.store.targets import init_volume

Tree = dict[bytes, bytes]
POOL = [random.Random(i).randbytes(30_000) for i in range(6)]

steps = st.lists(
    st.one_of(
        *[st.tuples(st.just("write"), st.integers(0, 4), st.lists(st.integers(0, 5), max_size=3))]
        * 4,
        st.tuples(st.just("delete"), st.integers(0, 4)),
        *[st.tuples(st.just("patch"), st.integers(0, 4), st.integers(0, 5), st.integers(0, 29_900))]
        * 2,
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("checkpoint")),
        st.tuples(st.just("gc")),
    ),
    min_size=8,
    max_size=30,
)


async def read_tree(vol: ServedVolume) -> Tree:
    out: Tree = {}
    for d, _ in vol.catalog.listdir(ROOT_INO, 0, 10_000):
        blocks = vol.catalog.blocks(d.ino)
        data = await vol.read_chunks([blocks[b][0] for b in sorted(blocks)])
        out[d.name] = b"".join(data)
    return out


class Writer:
    def __init__(self, vol: Volume, repl: Replicator, cfg: Config) -> None:
        self.vol, self.repl, self.cfg = vol, repl, cfg
        self.tree: Tree = {}
        self.history: dict[int, Tree] = {}  # LSN -> the tree right after it
        self.gc_tasks: list[asyncio.Task[object]] = []
        self.snapshots = 0

    def record(self) -> None:
        self.history[self.vol.last_lsn] = dict(self.tree)

    async def write(self, slot: int, blocks: list[int]) -> None:
        ino, name = 100 + slot, f"f{slot}".encode()
        datas = [POOL[b] for b in blocks]
        prepared = await self.vol.prepare_chunks(datas)
        ops = [
            SetInode(ino=ino, mode=0o100644, size=sum(map(len, datas)), nlink=1),
            SetDirent(parent=ROOT_INO, name=name, ino=ino),
            SetBlocks(
                ino=ino,
                blocks=tuple(
                    (i, p.id.hex(), len(d))
                    for i, (p, d) in enumerate(zip(prepared, datas, strict=True))
                ),
            ),
            TruncateBlocks(ino=ino, first=len(datas)),
        ]
        self.vol.commit_nowait(ops, prepared)
        self.tree[name] = b"".join(datas)
        self.record()

    async def patch(self, slot: int, base: int, off: int) -> None:
        """File `slot` becomes POOL[base] with 100 bytes changed, stored as a patch of that
        chunk if the catalog still has it (else whole: the volume's own fallback)."""
        ino, name = 100 + slot, f"f{slot}".encode()
        data = bytearray(POOL[base])
        data[off : off + 100] = bytes((off + k) % 256 for k in range(100))
        plan = PatchPlan(self.vol.codec.chunk_id(POOL[base]), len(data), ((off, 100),))
        prepared = await self.vol.prepare_chunks([bytes(data)], [plan])
        ops = [
            SetInode(ino=ino, mode=0o100644, size=len(data), nlink=1),
            SetDirent(parent=ROOT_INO, name=name, ino=ino),
            SetBlocks(ino=ino, blocks=((0, prepared[0].id.hex(), len(data)),)),
            TruncateBlocks(ino=ino, first=1),
        ]
        self.vol.commit_nowait(ops, prepared)
        self.tree[name] = bytes(data)
        self.record()

    async def delete(self, slot: int) -> None:
        name = f"f{slot}".encode()
        if name not in self.tree:
            return
        self.vol.commit_nowait([DropDirent(ROOT_INO, name), DropInode(100 + slot)])
        del self.tree[name]
        self.record()

    async def checkpoint(self) -> None:
        await self.vol.maybe_seal(force=True)
        built = await self.vol.build_checkpoint()
        assert built is not None
        lsn, when, body = built
        assert await self.repl.wait_shipped(self.vol.journal.segno - 1, 60)
        for sh in self.repl.shippers:
            await sh.store.put_new(checkpoint_key(lsn, when), body)

    async def snapshot(self) -> None:
        await self.vol.sync()
        self.snapshots += 1
        await create_snapshot(self.cfg, f"s{self.snapshots}", self.vol.last_lsn)

    async def step(self, s: tuple[object, ...]) -> None:
        match s:
            case ("write", int(slot), list(blocks)):
                await self.write(slot, blocks)
            case ("delete", int(slot)):
                await self.delete(slot)
            case ("patch", int(slot), int(base), int(off)):
                await self.patch(slot, base, off)
            case ("snapshot",):
                await self.snapshot()
            case ("checkpoint",):
                await self.checkpoint()
            case ("gc",):  # concurrently with what follows
                self.gc_tasks.append(asyncio.ensure_future(self.repl.run_gc()))
        await self.vol.sync()
        await self.vol.maybe_seal(force=True)  # many small segments: much to collect


async def check_target(store: ObjectStore, history: dict[int, Tree], scratch: Path) -> int:
    kept = await read_retained(store)
    assert kept is not None, "GC ran, so the target says what it retains"
    recovered = 0
    for lsn, want in sorted(history.items()):
        cache = SegmentCache(scratch / uuid.uuid4().hex, 1)  # nothing stays cached
        state = scratch / uuid.uuid4().hex
        if not kept.covers(lsn):
            with pytest.raises(PointError, match=r"no longer retained|before the first"):
                await rebuild(store, state, None, PointSpec(lsn=lsn), cache)
            continue
        rebuilt, keys = await rebuild(store, state, None, PointSpec(lsn=lsn), cache)
        rv = RecoveredVolume(state, rebuilt, keys, store, cache)
        try:
            got = await read_tree(rv)
        finally:
            await rv.close()
        assert got == want, f"LSN {lsn} at {store.name}"
        recovered += 1
    return recovered


@pytest.mark.timeout(600)
@settings(
    max_examples=int(os.environ.get("VAULTSYNC_GC_EXAMPLES", "5")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=steps,
    keep_all=st.sampled_from([0.0, 0.3]),
    hourly=st.integers(0, 2),
    compact_below=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_gc_keeps_every_retained_point(
    plan: list[tuple[object, ...]],
    keep_all: float,
    hourly: int,
    compact_below: float,
    seaweedfs: LocalProvider,
    rclone: LocalProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("gc")
    cfg = _config(
        root, seaweedfs, rclone, keep_all=keep_all, hourly=hourly, compact_below=compact_below
    )
    asyncio.run(_drive(cfg, plan, root))


def _config(root: Path, sw: LocalProvider, rc: LocalProvider, **retention: float) -> Config:
    policy = {"keep_all": 0, "hourly": 0, "daily": 0, "weekly": 0, "monthly": 0}
    return Config.model_validate(
        {
            "volume": {"name": "gc", "state_dir": str(root / "state")},
            "targets": [
                target_for(sw, "sw", mode="sync").model_dump(mode="json"),
                target_for(rc, "rc").model_dump(mode="json"),
            ],
            "replication": {"checkpoint_every": 0, "probe_interval": 0.5},
            "retention": {**policy, "gc_interval": 0, **retention},
        }
    )


def test_compaction_moves_live_chunks_and_old_points_follow(
    seaweedfs: LocalProvider, rclone: LocalProvider, tmp_path: Path
) -> None:
    """A retained snapshot refers to a chunk in a segment GC compacts: after the move
    and the deletion, the snapshot still reads it, through relocations/<segno>.json."""
    cfg = _config(tmp_path, seaweedfs, rclone, compact_below=0.9)
    plan: list[tuple[object, ...]] = [
        ("write", 0, [0, 1]),
        ("snapshot",),
        ("write", 0, [0]),
        ("write", 1, [2, 3]),
        ("checkpoint",),
        ("write", 1, [3]),
    ]
    reports = asyncio.run(_drive(cfg, plan, tmp_path))
    assert reports[0].segments_compacted and reports[0].chunks_moved
    assert reports[0].checkpoints_dropped


def test_relocation_records_go_once_no_retained_point_needs_them(
    seaweedfs: LocalProvider, rclone: LocalProvider, tmp_path: Path
) -> None:
    """A snapshot older than a compaction reads its moved chunks through the relocation
    records, so GC keeps them; once the snapshot is deleted and the oldest retained point
    is newer than the compaction, GC deletes them, and every retained point still reads."""
    cfg = _config(tmp_path, seaweedfs, rclone, compact_below=0.9)
    asyncio.run(_relocations(cfg, tmp_path))


async def _relocations(cfg: Config, root: Path) -> None:
    await init_volume(cfg, None)
    vol = await Volume.open(cfg.volume.state_dir)
    repl = Replicator(cfg, vol)
    await repl.start()
    w = Writer(vol, repl, cfg)
    w.record()
    stores = [sh.store for sh in repl.shippers]

    async def records(st: ObjectStore) -> list[dict[str, object]]:
        return [json.loads(await st.get(o.key)) async for o in st.list("relocations/")]

    try:
        await w.checkpoint()
        for s in [
            ("write", 0, [0, 1]),
            ("snapshot",),
            ("write", 0, [0]),
            ("write", 1, [2, 3]),
            ("checkpoint",),
            ("write", 1, [3]),
        ]:
            await w.step(s)
        await w.checkpoint()
        first = [await repl.run_gc(), await repl.run_gc()]
        assert first[0].chunks_moved and not any(r.relocations_dropped for r in first)
        before: dict[str, list[dict[str, object]]] = {}
        for st in stores:
            recs = before[st.name] = await records(st)
            assert recs, "snapshot s1 reads its moved chunks through them"
            assert all(int(str(r["lsn"])) > 1 for r in recs)
            await check_target(st, w.history, root / "p1")
        # Still needed: a dry run keeps them.
        assert (await repl.run_gc(dry_run=True)).relocations_dropped == 0
        await delete_snapshot(cfg, "s1")
        await w.step(("write", 2, [4]))
        await w.checkpoint()  # the keep-everything window now starts after the compaction
        old = sum(len(r) for r in before.values())
        assert (await repl.run_gc(dry_run=True)).relocations_dropped == old
        assert (await repl.run_gc()).relocations_dropped == old
        for st in stores:
            kept = await read_retained(st)
            assert kept is not None
            now = await records(st)
            # The old ones are gone; any left (this run compacted more) are still needed.
            assert not [r for r in now if r in before[st.name]]
            assert all(int(str(r["lsn"])) > kept.oldest_lsn() for r in now)
            assert await check_target(st, w.history, root / "p2") >= 1
        assert await read_tree(vol) == w.tree
    finally:
        await repl.drain()
        await repl.stop()
        await vol.close()


async def _drive(cfg: Config, plan: list[tuple[object, ...]], root: Path) -> list[GcReport]:
    await init_volume(cfg, None)
    vol = await Volume.open(cfg.volume.state_dir)
    repl = Replicator(cfg, vol)
    await repl.start()
    w = Writer(vol, repl, cfg)
    w.record()
    written = 0
    try:
        await w.checkpoint()
        for s in plan:
            await w.step(s)
        await asyncio.gather(*w.gc_tasks)
        await w.checkpoint()
        written = vol.journal.segno - 1
        # Twice: the second deletes what the first compacted once it reached everyone.
        reports = [await repl.run_gc(), await repl.run_gc()]
        assert not reports[-1].waiting
        assert await read_tree(vol) == w.tree, "the live volume reads everything after GC"
        stores = [sh.store for sh in repl.shippers]
        for st_ in stores:
            await check_target(st_, w.history, root / "points")
            held = [parse_segment_key(o.key) async for o in st_.list("segments/")]
            assert len([n for n in held if n]) <= written
            if reports[0].chunks_moved:
                assert [o async for o in st_.list("relocations/")]
        return reports
    finally:
        await repl.drain()
        await repl.stop()
        await vol.close()


def test_gc_command_on_a_mounted_and_an_unmounted_volume(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    bucket = f"gc-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    m = Mount.create(
        tmp_path / "a",
        'segment_size = "1MiB"\nsegment_max_age = 0.2\n'
        "[replication]\ncheckpoint_every = 3\ncheckpoint_check = 0.2\n"
        "[retention]\nkeep_all = 0\nhourly = 0\ndaily = 0\nweekly = 0\nmonthly = 0\n"
        "gc_interval = 0\n" + sync_and_async_targets(seaweedfs, rclone, bucket),
    )
    m.start()
    try:
        for round_no in range(4):
            for i in range(4):
                (m.mountpoint / f"f{i}").write_bytes(os.urandom(20_000) * (round_no + 1))
            os.sync()
            time.sleep(1.0)  # sealed, shipped, checkpointed
        res = cli("gc", str(m.config), "--json")
        assert res.returncode == 0, res.stderr
        mounted_report = json.loads(res.stdout)
        assert mounted_report["ok"] and mounted_report["segments_deleted"], mounted_report
        res = cli("gc", str(m.config), "--dry-run")
        assert res.returncode == 1 and "--dry-run needs the volume unmounted" in res.stderr
        want = {p.name: p.read_bytes() for p in m.mountpoint.iterdir()}
    finally:
        m.umount()
    res = cli("gc", str(m.config), "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["dry_run"]
    res = cli("gc", str(m.config))
    assert res.returncode == 0 and "retained:" in res.stdout, res.stderr
    res = cli("points", str(m.config), "--json")
    assert res.returncode == 0, res.stderr
    for target in ("sw", "rc"):
        mnt = tmp_path / f"pt-{target}"
        mnt.mkdir()
        pm = PointMount(m.config, mnt, target, None)
        try:
            assert {p.name: p.read_bytes() for p in mnt.iterdir()} == want
        finally:
            pm.close()
    res = cli("mount", str(m.config), str(tmp_path / "pt-sw"), "--from", "sw", "--at", "2")
    assert res.returncode == 1 and "no longer retained" in res.stderr, res.stderr
